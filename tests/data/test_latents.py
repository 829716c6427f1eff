"""fastlcm.data.LatentShardLoader (the Rust loader's raw mode) on latent shards written here by hand.

Sample i of a dataset holds tensors whose every value is derived from i (mean = i, std = i/100 + 1, embeddings
= -i), so each test can tell exactly which sample landed where and that values survive the dtype round trip.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from fastlcm.data import LatentBatch, LatentFormatError, LatentShardLoader, LoaderError
from fastlcm.testing import write_tar

R = 32  # pixels; latents are 4 x 4 x 4


def sample_members(i: int, family: str = "sd", resolution: int = R, dtype=torch.float16, fmt="fastlcm-latents-1",
                   drop=()) -> list[tuple[str, bytes]]:
    lat = (4, resolution // 8, resolution // 8)
    tensors = {"mean": torch.full(lat, float(i)), "std": torch.full(lat, i / 100 + 1),
               "prompt_embeds": torch.full((77, 8), -float(i))}
    if family == "sdxl":
        tensors["pooled_embeds"] = torch.arange(6, dtype=torch.float32) + i
    tensors = {k: v.to(dtype) for k, v in tensors.items() if k not in drop}
    meta = {"format": fmt, "family": family, "resolution": str(resolution), "teacher": "t", "scaling_factor": "0.18"}
    info = {"caption": f"caption {i}", "original_size": [100 + i, 200 + i], "crop": [i, 2 * i],
            "flipped": i % 2 == 1, "resolution": resolution, "source_shard": "src.tar", "source_key": f"s{i}"}
    return [(f"{i:05d}.latent.safetensors", save(tensors, metadata=meta)),
            (f"{i:05d}.json", json.dumps(info).encode()), (f"{i:05d}.txt", info["caption"].encode())]


def write_dataset(d, n=20, per=5, **kw) -> str:
    for s in range(0, n, per):
        write_tar(d / f"l-{s // per:03d}.tar", [m for i in range(s, min(n, s + per)) for m in sample_members(i, **kw)])
    return str(d / f"l-{{000..{(n - 1) // per:03d}}}.tar")


def drain(loader) -> list[LatentBatch]:
    return list(loader)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


@pytest.fixture(scope="module")
def sd_spec(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("lat-sd"))


def test_values_shapes_and_metadata_round_trip(sd_spec):
    (b, *rest) = drain(LatentShardLoader(sd_spec, 4, shuffle_buffer=0, threads=2))
    assert len(rest) == 4 and isinstance(b, LatentBatch) and len(b) == 4
    assert b.keys == ["00000", "00001", "00002", "00003"]
    assert b.latent_mean.dtype == torch.float32 and b.latent_mean.shape == (4, 4, R // 8, R // 8)
    ids = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(b.latent_mean[:, 0, 0, 0], ids, rtol=0, atol=0)
    # i/100 + 1 stored as float16, read back as float32: exactly the fp16 rounding of the value.
    torch.testing.assert_close(b.latent_std[:, 1, 2, 3], (ids / 100 + 1).half().float(), rtol=0, atol=0)
    assert b.prompt_embeds.shape == (4, 77, 8) and b.prompt_embeds[2].eq(-2).all()
    assert b.pooled_embeds is None
    assert b.captions == [f"caption {i}" for i in range(4)]
    assert b.original_sizes.dtype == torch.int64 and b.original_sizes[3].tolist() == [103, 203]
    assert b.crop_coords[3].tolist() == [3, 6]
    assert b.flipped.tolist() == [False, True, False, True]
    assert b.json[1]["source_key"] == "s1" and b.shards[0].endswith("l-000.tar")


def test_sdxl_pooled_and_float32_exact(tmp_path):
    spec = write_dataset(tmp_path, n=6, per=3, family="sdxl", dtype=torch.float32)
    batches = drain(LatentShardLoader(spec, 3, shuffle_buffer=0, expect_family="sdxl", expect_resolution=R))
    b = batches[1]
    assert b.pooled_embeds.shape == (3, 6)
    torch.testing.assert_close(b.pooled_embeds[0], torch.arange(6, dtype=torch.float32) + 3, rtol=0, atol=0)
    torch.testing.assert_close(b.latent_std[:, 0, 0, 0], torch.tensor([1.03, 1.04, 1.05]), rtol=0, atol=0)


def test_ranks_split_without_duplicates(sd_spec):
    seen = []
    for rank in range(2):
        seen += keys(drain(LatentShardLoader(sd_spec, 1, rank=rank, world_size=2, shuffle_buffer=3)))
    assert sorted(seen) == [f"{i:05d}" for i in range(20)]


def test_shuffle_is_deterministic_and_thread_independent(sd_spec):
    def order(seed, threads):
        return keys(drain(LatentShardLoader(sd_spec, 2, seed=seed, shuffle_buffer=6, threads=threads)))

    a = order(1, 1)
    assert a == order(1, 3)
    assert a != order(2, 1) and a != sorted(a)
    assert sorted(a) == [f"{i:05d}" for i in range(20)]


def test_exact_resume_via_state_dict(sd_spec):
    def make():
        return LatentShardLoader(sd_spec, 3, seed=5, shuffle_buffer=4, epochs=2)

    full = keys(drain(make()))
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    assert keys(head) + keys(drain(second)) == full
    other = LatentShardLoader(sd_spec, 3, seed=6, shuffle_buffer=4, epochs=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_corrupt_latent_is_skipped_or_raised_with_shard_and_member(tmp_path):
    members = sample_members(0) + sample_members(1) + sample_members(2)
    name, data = members[3]
    members[3] = (name, data[: len(data) - 10])  # sample 1's tensors are cut short
    members += [("00003.txt", b"no latent here"), ("00003.json", b"{}")]
    shard = write_tar(tmp_path / "bad.tar", members)
    loader = LatentShardLoader(str(shard), 1, shuffle_buffer=0)
    assert keys(drain(loader)) == ["00000", "00002"]
    skipped = loader.stats()["skipped"]
    assert skipped["corrupt_latent"] == 1 and skipped["missing_latent"] == 1
    assert "corrupt_image" not in skipped
    raising = LatentShardLoader(str(shard), 1, shuffle_buffer=0, on_error="raise")
    it = iter(raising)
    next(it)
    with pytest.raises(LatentFormatError, match=r"bad\.tar.*00001\.latent\.safetensors") as e:
        next(it)
    assert isinstance(e.value, LoaderError)


@pytest.mark.parametrize("kw, expect, match", [
    (dict(family="sdxl"), dict(expect_family="sd"), r"'00000'.*family 'sdxl' but the loader expects 'sd'"),
    (dict(resolution=64), dict(expect_resolution=R), r"'00000'.*resolution 64 but the loader expects 32"),
    (dict(fmt="something-else"), {}, r"'00000'.*format is 'something-else'"),
    (dict(drop=("std",)), {}, r"'00000'.*missing tensor\(s\) \['std'\]"),
])
def test_mismatches_always_raise_naming_shard_and_key(tmp_path, kw, expect, match):
    spec = write_dataset(tmp_path, n=2, per=2, **kw)
    loader = LatentShardLoader(spec, 1, shuffle_buffer=0, on_error="skip", **expect)
    with pytest.raises(LatentFormatError, match=match) as e:
        next(iter(loader))
    assert "l-000.tar" in str(e.value)


def test_mixed_resolutions_in_one_dataset_are_refused(tmp_path):
    write_tar(tmp_path / "a.tar", sample_members(0) + sample_members(1, resolution=64))
    with pytest.raises(LatentFormatError, match=r"'00001'.*does not match the earlier samples"):
        drain(LatentShardLoader(str(tmp_path / "a.tar"), 1, shuffle_buffer=0))


def test_missing_json_is_an_error_and_arguments_are_checked(tmp_path):
    write_tar(tmp_path / "a.tar", sample_members(0)[:1])
    with pytest.raises(LatentFormatError, match=r"a\.tar.*'00000'.*json"):
        drain(LatentShardLoader(str(tmp_path / "a.tar"), 1))
    with pytest.raises(ValueError, match="expect_family"):
        LatentShardLoader(str(tmp_path / "a.tar"), 1, expect_family="sd3")
    with pytest.raises(ValueError, match="batch_size"):
        LatentShardLoader(str(tmp_path / "a.tar"), 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            LatentShardLoader(str(tmp_path / "a.tar"), 1, pin_memory=True)
