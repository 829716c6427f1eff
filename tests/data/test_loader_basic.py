"""Basic behaviour of fastlcm.data.ShardLoader on tiny shards made here (parity/hostile/HTTP live elsewhere)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastlcm.data import (
    Batch,
    DecodeError,
    LoaderError,
    NoDataError,
    ShardLoader,
    ShardSourceError,
    TooManyRejectionsError,
)
from fastlcm.testing import make_tiny_shards, write_tar

R = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    paths = make_tiny_shards(d, num_samples=24, samples_per_shard=8, image_format="mixed", seed=1)
    return [str(p) for p in paths]


def spec_of(paths):
    return os.path.dirname(paths[0]) + "/shard-{00000..%05d}.tar" % (len(paths) - 1)


def drain(loader):
    return list(loader)


def test_shapes_dtypes_ranges(shards):
    ref = None
    for dtype, tdtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("uint8", torch.uint8)]:
        batches = drain(ShardLoader(spec_of(shards), 5, R, dtype=dtype, threads=2, seed=4, pin_memory=False))
        assert len(batches) == 24 // 5
        for b in batches:
            assert isinstance(b, Batch) and len(b) == 5
            assert b.pixels.shape == (5, 3, R, R) and b.pixels.dtype == tdtype
            if dtype == "uint8":
                assert int(b.pixels.min()) >= 0 and int(b.pixels.max()) <= 255
            else:
                assert float(b.pixels.min()) >= -1.0 and float(b.pixels.max()) <= 1.0
        pixels = torch.cat([b.pixels for b in batches]).float()
        if dtype == "float32":
            ref = pixels
        elif dtype == "uint8":
            assert torch.equal(pixels / 127.5 - 1.0, ref) or torch.allclose(pixels / 127.5 - 1.0, ref, atol=1e-6)
        else:
            assert torch.allclose(pixels, ref, atol=1e-2)
    assert ref.std() > 0.1, "real image content, not a blank fill"


def test_metadata_fields(shards):
    loader = ShardLoader(shards, 4, R, threads=2, random_flip=True, seed=2)
    seen = []
    for b in loader:
        assert b.original_sizes.dtype == torch.int64 and b.original_sizes.shape == (4, 2)
        assert b.crop_coords.dtype == torch.int64 and b.flipped.dtype == torch.bool
        for i, key in enumerate(b.keys):
            meta = b.json[i]
            assert meta["key"] == key
            h, w = b.original_sizes[i].tolist()
            assert (h, w) == (meta["original_height"], meta["original_width"])
            # Crop inside the resized image (short side R, long side int(R * long / short)).
            nh, nw = (int(R * h / w), R) if w <= h else (R, int(R * w / h))
            top, left = b.crop_coords[i].tolist()
            assert 0 <= top <= nh - R and 0 <= left <= nw - R
            assert b.captions[i].startswith("a ") and b.shards[i] in shards
            seen.append(key)
    assert sorted(seen) == [f"{i:08d}" for i in range(24)]
    stats = loader.stats()
    assert stats["samples_yielded"] == 24 and stats["batches_yielded"] == 6 and stats["shards_opened"] == 3
    assert stats["bytes_read"] == sum(os.path.getsize(p) for p in shards)
    assert set(stats["skipped"]) == {"corrupt_image", "missing_image", "missing_caption", "filtered", "truncated_tar", "source_error", "partial_batch"}


def test_center_crop_coordinates(shards):
    for b in ShardLoader(shards, 4, R, crop="center", threads=1):
        for (h, w), (top, left) in zip(b.original_sizes.tolist(), b.crop_coords.tolist()):
            nh, nw = (int(R * h / w), R) if w <= h else (R, int(R * w / h))
            assert (top, left) == ((nh - R) // 2, (nw - R) // 2)


def test_same_batches_for_any_thread_count(shards):
    runs = []
    for threads in (1, 3):
        loader = ShardLoader(spec_of(shards), 3, R, threads=threads, seed=7, shuffle_buffer=6, random_flip=True, epochs=2)
        runs.append([(b.keys, b.pixels, b.crop_coords, b.flipped) for b in loader])
    assert len(runs[0]) == 2 * 8
    for a, b in zip(*runs):
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert runs[0][0][0] != runs[0][8][0], "each epoch reshuffled"


def test_state_dict_resume_is_exact(shards):
    kwargs = dict(batch_size=5, resolution=R, seed=3, shuffle_buffer=7, epochs=2, threads=2, random_flip=True)
    full = [(b.keys, b.pixels) for b in ShardLoader(shards, **kwargs)]
    assert len(full) == 2 * (24 // 5)
    for k in (1, 4, 5, len(full) - 1):
        loader = ShardLoader(shards, **kwargs)
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))  # JSON round trip
        resumed = ShardLoader(shards, **kwargs)
        resumed.load_state_dict(state)
        rest = [(b.keys, b.pixels) for b in resumed]
        assert [r[0] for r in rest] == [f[0] for f in full[k:]], f"after {k} batches"
        assert all(torch.equal(r[1], f[1]) for r, f in zip(rest, full[k:]))
    other = ShardLoader(shards, **{**kwargs, "batch_size": 4})
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_iterating_again_starts_over_and_partial_batches_are_counted(shards):
    loader = ShardLoader(shards, 5, R, seed=1)
    first = [b.keys for b in loader]
    second = [b.keys for b in loader]
    assert first == second and len(first) == 4
    assert loader.stats()["skipped"]["partial_batch"] == 2 * (24 - 20)


def test_pipe_source(shards):
    direct = [b.keys for b in ShardLoader(shards[0], 2, R, shuffle_buffer=0)]
    piped = [b.keys for b in ShardLoader(f"pipe:cat {shards[0]}", 2, R, shuffle_buffer=0)]
    assert piped == direct and len(direct) == 4
    assert direct[0] == ["00000000", "00000001"], "no shuffle: member order"
    with pytest.raises(ShardSourceError, match="exited"):
        drain(ShardLoader(f"pipe:cat {shards[0]}; exit 7", 2, R, on_error="raise"))


def test_rank_split(shards):
    keys = []
    for rank in range(3):
        keys += [k for b in ShardLoader(shards, 1, R, rank=rank, world_size=3) for k in b.keys]
    assert sorted(keys) == [f"{i:08d}" for i in range(24)]


def test_errors_name_the_shard(tmp_path, shards):
    missing = str(tmp_path / "nope-000.tar")
    with pytest.raises(ShardSourceError, match="nope-000.tar"):
        drain(ShardLoader([missing, shards[0]], 2, R, on_error="raise"))
    skipped = ShardLoader([missing, shards[0]], 2, R)
    assert len(drain(skipped)) == 4 and skipped.stats()["skipped"]["source_error"] == 1
    with pytest.raises(NoDataError):
        drain(ShardLoader(str(tmp_path / "gone-{0..3}.tar"), 2, R, epochs=None))

    bad = write_tar(tmp_path / "bad.tar", [("k1.jpg", b"\xff\xd8\xff\x00broken"), ("k1.txt", b"x")])
    with pytest.raises(DecodeError) as err:
        drain(ShardLoader(str(bad), 1, R, on_error="raise"))
    assert "bad.tar" in str(err.value) and "k1.jpg" in str(err.value)
    assert isinstance(err.value, LoaderError)

    captions_only = write_tar(tmp_path / "caps.tar", [(f"k{i}.txt", b"x") for i in range(10)])
    with pytest.raises(TooManyRejectionsError, match="caps.tar"):
        drain(ShardLoader(str(captions_only), 1, R, max_consecutive_rejections=3))


def test_filters(shards):
    loader = ShardLoader(shards, 1, R, min_original_width=100)
    widths = [b.json[0]["original_width"] for b in loader]
    assert widths and all(w >= 100 for w in widths)
    assert loader.stats()["skipped"]["filtered"] == 24 - len(widths)


def test_bad_arguments_name_the_argument(shards):
    for kwargs, name in [
        (dict(batch_size=0), "batch_size"),
        (dict(dtype="int8"), "dtype"),
        (dict(crop="left"), "crop"),
        (dict(on_error="ignore"), "on_error"),
        (dict(threads=0), "threads"),
        (dict(rank=3, world_size=2), "rank"),
    ]:
        args = {"batch_size": 2, "resolution": R, **kwargs}
        with pytest.raises(ValueError, match=name):
            ShardLoader(shards, **args)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_use_after_fork_is_refused(shards):
    loader = ShardLoader(shards, 2, R, threads=1)
    next(iter(loader))
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            next(iter(loader))
        except LoaderError as e:
            code = 0 if "fork" in str(e) else 4
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(next(iter(loader)).keys) == 2, "parent keeps working"


def test_buffer_pool_reuses_only_unreferenced_tensors():
    from fastlcm.data.loader import _BufferPool

    pool = _BufferPool(3)
    make = lambda: torch.zeros(4)  # noqa: E731
    a = pool.get(make)
    first = id(a)
    assert id(pool.get(make)) != first, "held tensor is not handed out again"
    del a
    c = pool.get(make)
    assert id(c) == first, "released tensor is reused"
    view = c[1:]
    del c
    assert id(pool.get(make)) != first, "a live view keeps it"
    del view
    arr = pool.get(make).numpy()
    assert id(pool.get(make)) != first, "a numpy array keeps it"
    del arr


def test_recycled_buffers_never_overwrite_held_batches(shards):
    loader = ShardLoader(shards, 2, R, threads=2, pin_memory=False, epochs=2)
    held, copies, views = [], [], []
    for i, b in enumerate(loader):
        if i % 3 == 0:
            held.append(b)
            copies.append(b.pixels.clone())
        elif i % 3 == 1:
            views.append((b.pixels[1], b.pixels[1].clone()))
    assert len(held) == 8
    assert all(torch.equal(b.pixels, c) for b, c in zip(held, copies))
    assert all(torch.equal(v, c) for v, c in views)
