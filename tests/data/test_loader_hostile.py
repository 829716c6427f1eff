"""ShardLoader on hostile shards: every skip counted by reason, errors name shard and member, nothing hangs."""

from __future__ import annotations

import io
import json
import resource
import tarfile
import threading

import numpy as np
import pytest

from fastlcm import testing
from fastlcm.data import (
    DecodeError,
    LoaderError,
    NoDataError,
    ShardLoader,
    ShardSourceError,
    TarFormatError,
    TooManyRejectionsError,
)
from fastlcm.data import reference as ref

REASONS = ("corrupt_image", "missing_image", "missing_caption", "filtered", "truncated_tar", "source_error")


def bounded(fn, timeout_s=60.0):
    """Run ``fn()`` in a thread; fail (instead of hanging the suite) if it has not finished in ``timeout_s``."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"loader did not finish within {timeout_s} s (hang or spin)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def run_all(spec, **kw):
    """All samples (batch size 1, no shuffle) as (keys, captions, stats)."""
    kw.setdefault("shuffle_buffer", 0)
    loader = ShardLoader(spec, 1, 16, pin_memory=False, **kw)

    def go():
        keys, captions = [], []
        for batch in loader:
            keys += batch.keys
            captions += batch.captions
        return keys, captions

    keys, captions = bounded(go)
    return keys, captions, loader.stats()


def skipped(stats):
    return {r: stats["skipped"][r] for r in REASONS if stats["skipped"][r]}


def _img(seed, fmt="jpg", h=24, w=20):
    return testing.encode_image(testing.synthetic_image(np.random.default_rng(seed), h, w)[0], fmt)


def _good(key, seed=0, fmt="jpg"):
    return [(f"{key}.{fmt}", _img(seed, fmt)), (f"{key}.txt", f"caption {key}".encode())]


def test_corrupt_and_zero_byte_images(tmp_path):
    shard = testing.write_tar(
        tmp_path / "bad.tar",
        _good("a")
        + [("b.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("b.txt", b"garbage")]
        + [("c.png", b""), ("c.txt", b"zero bytes")]
        + [("d.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 junk"), ("d.txt", b"bad webp")]
        + _good("e", 1, "png"),
    )
    keys, _, stats = run_all(str(shard))
    assert keys == ["a", "e"]
    assert skipped(stats) == {"corrupt_image": 3}
    assert stats["samples_yielded"] == 2 and stats["batches_yielded"] == 2
    assert ref.read_shard(str(shard)).skipped == {"corrupt_image": 3}, "oracle agrees"
    with pytest.raises(DecodeError) as info:
        run_all(str(shard), on_error="raise")
    assert isinstance(info.value, LoaderError)
    assert str(shard) in str(info.value) and "b.jpg" in str(info.value)


def test_huge_declared_dimensions_are_rejected_without_allocating(tmp_path):
    shard = testing.write_tar(
        tmp_path / "huge.tar",
        _good("a")
        + [("b.png", testing.png_with_declared_size(60000, 60000)), ("b.txt", b"png bomb")]
        + [("c.jpg", testing.jpeg_with_declared_size(65000, 65000)), ("c.txt", b"jpeg bomb")]
        + [("d.png", testing.png_with_declared_size(2**31 - 1, 1)), ("d.txt", b"png 2^31 wide")]
        + _good("e", 1),
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    keys, _, stats = run_all(str(shard))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert keys == ["a", "e"]
    assert skipped(stats) == {"corrupt_image": 3}
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB on images declaring billions of pixels"
    with pytest.raises(DecodeError, match="b.png"):
        run_all(str(shard), on_error="raise")


def test_missing_captions_and_images(tmp_path):
    shard = testing.write_tar(
        tmp_path / "s.tar",
        _good("a")
        + [("b.jpg", _img(2))]  # no caption
        + [("c.txt", b"no image"), ("c.json", b"{}")]
        + [("d.jpg", _img(3)), ("d.json", b"{}")]  # no caption either
        + _good("e", 4),
    )
    keys, _, stats = run_all(str(shard))
    assert keys == ["a", "e"]
    assert skipped(stats) == {"missing_caption": 2, "missing_image": 1}
    assert ref.read_shard(str(shard)).skipped == {"missing_caption": 2, "missing_image": 1}


def test_duplicate_keys_make_separate_samples(tmp_path):
    members = (
        [("a.jpg", _img(0)), ("a.txt", b"first a")]
        + [("a.jpg", _img(1)), ("a.txt", b"second a")]  # repeated extension: a new sample with the same key
        + [("b.jpg", _img(2)), ("b.txt", b"b")]
        + [("a.jpg", _img(3)), ("a.txt", b"third a")]  # the key comes back later: another sample
    )
    keys, captions, stats = run_all(str(testing.write_tar(tmp_path / "dup.tar", members)))
    assert keys == ["a", "a", "b", "a"]
    assert captions == ["first a", "second a", "b", "third a"]
    assert skipped(stats) == {}


def test_non_utf8_captions_use_replacement_characters(tmp_path):
    raw = b"caf\xe9 na\xefve \xff\xfe \xe2\x82x end"
    shard = testing.write_tar(tmp_path / "s.tar", [("a.jpg", _img(0)), ("a.txt", raw)])
    keys, captions, stats = run_all(str(shard))
    assert captions == [raw.decode("utf-8", errors="replace")] == ["caf\ufffd na\ufffdve \ufffd\ufffd \ufffdx end"]
    assert skipped(stats) == {}


def test_meta_members_and_extensions(tmp_path):
    members = (
        [("__index__", b"meta"), ("__key__", b"meta")]
        + [("a.JPG", _img(0)), ("__key__", b"between members"), ("a.Txt", b"upper-case extensions")]
        + [("b.x.jpg", _img(1)), ("b.txt", b"the image's ext is x.jpg: no image")]
        + [("dir/c.jpg", _img(2)), ("dir/c.txt", b"in a directory")]
    )
    shard = testing.write_tar(tmp_path / "s.tar", members)
    keys, captions, stats = run_all(str(shard))
    oracle = ref.read_shard(str(shard))
    assert keys == [s.key for s in oracle.samples] == ["a", "dir/c"]
    assert captions == ["upper-case extensions", "in a directory"]
    assert skipped(stats) == dict(oracle.skipped) == {"missing_image": 1}


def _numbered(n, prefix, seed=0):
    members = []
    for i in range(n):
        members += _good(f"{prefix}{i:03d}", seed + i)
    return members


def test_truncated_tar_keeps_complete_samples_and_moves_on(tmp_path):
    full = testing.write_tar(tmp_path / "full.tar", _numbered(4, "a"))
    start, size = testing.tar_member_offsets(full)["a002.jpg"]
    cut = testing.truncated_copy(full, tmp_path / "cut.tar", start + size // 2)
    good = testing.write_tar(tmp_path / "good.tar", _numbered(2, "b", 10))
    spec = [str(cut), str(good)]
    keys, _, stats = run_all(spec)
    assert keys == ["a000", "a001", "b000", "b001"]
    assert skipped(stats) == {"truncated_tar": 1}
    with pytest.raises(TarFormatError) as info:
        run_all(spec, on_error="raise")
    assert str(cut) in str(info.value)


def test_missing_shard_is_a_counted_source_error(tmp_path):
    good = testing.write_tar(tmp_path / "good.tar", _numbered(3, "g"))
    missing = tmp_path / "missing.tar"
    keys, _, stats = run_all([str(missing), str(good)])
    assert keys == ["g000", "g001", "g002"]
    assert skipped(stats) == {"source_error": 1} and stats["shards_failed"] == 1 and stats["shards_opened"] >= 1
    with pytest.raises(ShardSourceError, match="missing.tar"):
        run_all([str(missing), str(good)], on_error="raise")


@pytest.mark.parametrize("epochs", [1, None])
def test_nothing_decodes_raises_no_data(tmp_path, epochs):
    shard = testing.write_tar(tmp_path / "bad.tar", [("a.jpg", b"junk"), ("a.txt", b"x"), ("b.jpg", b""), ("b.txt", b"y")])
    with pytest.raises(NoDataError):
        run_all(str(shard), epochs=epochs)
    with pytest.raises(NoDataError):
        run_all([str(tmp_path / "nope-1.tar"), str(tmp_path / "nope-2.tar")], epochs=epochs)


def _with_json(key, seed, meta):
    return _good(key, seed) + [(f"{key}.json", json.dumps(meta).encode())]


def test_metadata_filters_are_counted(tmp_path):
    metas = [
        {"original_width": 1024, "original_height": 1024, "pwatermark": 0.1},  # kept
        {"original_width": 500, "original_height": 1024, "pwatermark": 0.1},  # too narrow
        {"original_width": 1024, "original_height": 500, "pwatermark": 0.1},  # too short
        {"original_width": 1024, "original_height": 1024, "pwatermark": 0.9},  # watermark
        {"original_width": 2048, "original_height": 768, "pwatermark": 0.0},  # kept
    ]
    members = [m for i, meta in enumerate(metas) for m in _with_json(f"k{i}", i, meta)]
    shard = str(testing.write_tar(tmp_path / "s.tar", members))
    filters = dict(min_original_width=768, min_original_height=768, max_pwatermark=0.5)
    keys, _, stats = run_all(shard, **filters)
    want = [f"k{i}" for i, meta in enumerate(metas) if ref.passes_filters(meta, 768, 768, 0.5)]
    assert keys == want == ["k0", "k4"]
    assert skipped(stats) == {"filtered": 3}


def test_too_many_consecutive_rejections(tmp_path):
    members = [m for i in range(6) for m in _with_json(f"k{i}", i, {"original_width": 10, "original_height": 10})]
    shard = str(testing.write_tar(tmp_path / "small.tar", members))
    with pytest.raises(TooManyRejectionsError, match="small.tar"):
        run_all(shard, min_original_width=512, max_consecutive_rejections=3)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(resolution=0), "resolution"),
        (dict(crop="diagonal"), "crop"),
        (dict(dtype="int7"), "dtype"),
        (dict(on_error="ignore"), "on_error"),
        (dict(shuffle_buffer=-1), "shuffle_buffer"),
        (dict(threads=0), "threads"),
        (dict(world_size=0), "world_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(prefetch_batches=0), "prefetch_batches"),
        (dict(http_timeout_s=0.0), "http_timeout_s"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    shard = testing.write_tar(tmp_path / "s.tar", _good("a"))
    args = dict(shards=str(shard), batch_size=1, resolution=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        loader = ShardLoader(args.pop("shards"), args.pop("batch_size"), args.pop("resolution"), **args)
        next(iter(loader))


def test_empty_spec_is_rejected():
    with pytest.raises(ValueError, match="shards"):
        ShardLoader([], 1, 16)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_non_regular_members(tmp_path, fmt):
    long_key = "d" * 60 + "/" + "k" * 120  # > 100 bytes: needs a pax header or a GNU long-name record
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:

        def add(name, data=b"", kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("dir", kind=tarfile.DIRTYPE)
        add(f"{long_key}.jpg", _img(0))
        add(f"{long_key}.txt", "caption with a long name, é".encode())
        add("s.jpg", kind=tarfile.SYMTYPE, link=f"{long_key}.jpg")  # not a regular file: ignored
        add("s.txt", b"symlinked image")
        add("h.jpg", kind=tarfile.LNKTYPE, link=f"{long_key}.jpg")  # hard link: ignored as well
        add("h.txt", b"hard-linked image")
    keys, captions, stats = run_all(str(path))
    oracle = ref.read_shard(str(path))
    assert keys == [s.key for s in oracle.samples] == [long_key]
    assert captions == ["caption with a long name, é"]
    assert skipped(stats) == dict(oracle.skipped) == {"missing_image": 2}


def test_a_shard_that_is_not_a_tar(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 3000).astype(np.uint8).tobytes())
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    good = testing.write_tar(tmp_path / "good.tar", _numbered(2, "g"))
    keys, _, stats = run_all([str(junk), str(empty), str(good)])
    assert keys == ["g000", "g001"]
    assert stats["shards_failed"] == 1, "the junk shard failed; an empty file is an empty archive"
    assert sum(stats["skipped"].values()) == 1  # counted once, as a tar-level failure
    with pytest.raises(TarFormatError, match="junk.tar"):
        run_all([str(junk), str(good)], on_error="raise")
