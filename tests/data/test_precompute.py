"""`fastlcm precompute` on tiny teachers and shards: the cached latents must equal what training would compute.

The reference is the training path: the family's `load` + its text conditioner and the teacher's VAE
applied to the crops `ShardLoader` yields with the same seed / crop / flip settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlcm.cli import main
from fastlcm.config import TrainConfig
from fastlcm.data import LatentShardLoader, ShardLoader
from fastlcm.families import load_teacher
from fastlcm.data.precompute import (Encoder, PrecomputeOptions, ShardWriter, finalize, precompute, prepare_out,
                                write_rank)
from fastlcm.testing import make_tiny_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_tiny_shards(d, num_samples=6, samples_per_shard=2, seed=3)
    return str(d / "shard-{00000..00002}.tar")


def reference(teacher: Path, spec: str, **loader_kw):
    """Per sample (key -> mean, std, prompt_embeds, pooled, original_size, crop) via the training code path."""
    cfg = TrainConfig(pretrained_teacher_model=str(teacher), resolution=64)
    t = load_teacher(cfg.teacher_source())
    text = t.conditioner("cpu", cfg.resolution)
    out = {}
    for b in ShardLoader(spec, 3, 64, shuffle_buffer=0, pin_memory=False, **loader_kw):
        with torch.no_grad():
            dist = t.vae.encode(b.pixels).latent_dist
            cond = text.encode(b.captions, b)
        for i, key in enumerate(b.keys):
            pooled = cond.added["text_embeds"][i] if cond.added else None
            out[(b.shards[i], key)] = (dist.mean[i], dist.std[i], cond.prompt_embeds[i], pooled,
                                       b.original_sizes[i].tolist(), b.crop_coords[i].tolist(), bool(b.flipped[i]))
    return out


def by_source(spec: str, **kw) -> dict:
    out = {}
    for b in LatentShardLoader(spec, 1, shuffle_buffer=0, **kw):
        j = b.json[0]
        out[(j["source_shard"], j["source_key"])] = b
    return out


@pytest.mark.parametrize("family, dtype", [("sd", "float32"), ("sdxl", "float16")])
def test_round_trip_equals_the_training_path(tiny_teacher_factory, src, tmp_path, family, dtype):
    teacher = tiny_teacher_factory(family)
    opts = PrecomputeOptions(teacher=str(teacher), shards=src, out=str(tmp_path / "out"), batch_size=4,
                             samples_per_shard=4, latent_dtype=dtype, random_flip=True, seed=1, device="cpu")
    manifest = precompute(opts)
    assert manifest["count"] == 6 and manifest["family"] == family and manifest["resolution"] == 64
    assert manifest["shards"] == ["00000.tar", "00001.tar"] and manifest["dtype"] == dtype
    assert json.loads((tmp_path / "out" / "precompute.json").read_text())["spec"] == manifest["spec"]
    got = by_source(manifest["spec"], expect_family=family, expect_resolution=64)
    want = reference(teacher, src, seed=1, random_flip=True)
    assert got.keys() == want.keys()
    # float32: same crops through the same VAE (only batch composition differs); float16: storage rounding.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3)
    flips = set()
    for k, (mean, std, emb, pooled, size, crop, flipped) in want.items():
        b = got[k]
        torch.testing.assert_close(b.latent_mean[0], mean, **tol)
        torch.testing.assert_close(b.latent_std[0], std, **tol)
        torch.testing.assert_close(b.prompt_embeds[0], emb, **tol)
        if family == "sdxl":
            torch.testing.assert_close(b.pooled_embeds[0], pooled, **tol)
        else:
            assert b.pooled_embeds is None
        assert b.original_sizes[0].tolist() == size and b.crop_coords[0].tolist() == crop
        assert bool(b.flipped[0]) == flipped
        flips.add(flipped)
    assert flips == {True, False}, "the seed exercises both flip outcomes"


def test_rank_split_writes_every_source_sample_once(tiny_sd_teacher, src, tmp_path):
    out = tmp_path / "out"
    opts = PrecomputeOptions(teacher=str(tiny_sd_teacher), shards=src, out=str(out), batch_size=2,
                             samples_per_shard=1, device="cpu", center_crop=True)
    prepare_out(out, overwrite=False)
    enc = Encoder(opts, "cpu")
    for rank in (1, 0):
        write_rank(opts, enc, rank, 2, progress=False)
    with pytest.raises(Exception, match="rank 2 did not finish"):
        finalize(opts, enc.family.name, enc.resolution, 3)
    m = finalize(opts, enc.family.name, enc.resolution, 2)
    assert all(n.startswith(("r000-", "r001-")) for n in m["shards"]) and "::" in m["spec"]
    assert sum(m["counts_per_rank"]) == m["count"] == 6 and min(m["counts_per_rank"]) >= 2
    assert not list(out.glob(".precompute.rank*"))
    got = by_source(m["spec"])
    assert len(got) == 6 and len({b.keys[0] for b in got.values()}) == 6


def test_out_is_refused_unless_overwrite(tiny_sd_teacher, src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    (out / "00009.tar").write_bytes(b"old run")
    args = ["precompute", "--teacher", str(tiny_sd_teacher), "--shards", src, "--out", str(out), "--device", "cpu",
            "--batch-size", "3", "--max-samples", "4", "--latent-dtype", "float32"]
    assert main(args) == 1
    assert "not empty" in capsys.readouterr().err and (out / "00009.tar").exists()
    assert main(args + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 samples" in printed and "--precomputed_latents" in printed
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "keep.txt", "precompute.json"]
    assert str(out.resolve() / "00000.tar") in printed


def test_shards_appear_only_when_complete_and_crash_leaves_no_partial_tar(tiny_sd_teacher, src, tmp_path,
                                                                          monkeypatch):
    w = ShardWriter(tmp_path, "", samples_per_shard=2)
    w.add("a", [("txt", b"x")])
    assert [p.name for p in tmp_path.iterdir()] == [".00000.tar.tmp"]
    w.add("b", [("txt", b"y")])
    w.add("c", [("txt", b"z")])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".00001.tar.tmp", "00000.tar"]
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar"]

    out = tmp_path / "crash"
    opts = PrecomputeOptions(teacher=str(tiny_sd_teacher), shards=src, out=str(out), batch_size=2,
                             samples_per_shard=3, device="cpu")
    prepare_out(out, overwrite=False)
    enc = Encoder(opts, "cpu")
    real, calls = enc.encode, []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*a)

    monkeypatch.setattr(enc, "encode", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_rank(opts, enc, progress=False)
    # 4 samples were written: shard 0 (3) completed, shard 1 (1 of 3) was in progress and is dropped.
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar"]


def test_bad_options_name_the_flag(tiny_sd_teacher, tmp_path, capsys):
    for kw, flag in [(dict(resolution=60), "--resolution"), (dict(batch_size=0), "--batch-size"),
                     (dict(latent_dtype="int8"), "--latent-dtype"), (dict(device="tpu"), "--device"),
                     (dict(teacher=str(tmp_path / "nope")), "--teacher: no such folder")]:
        with pytest.raises(ValueError, match=flag):
            PrecomputeOptions(**{"teacher": str(tiny_sd_teacher), "shards": "s", "out": str(tmp_path), **kw}).validate()
    assert main(["precompute", "--teacher", str(tmp_path / "nope"), "--shards", "s", "--out", str(tmp_path)]) == 1
    assert "--teacher: no such folder" in capsys.readouterr().err


def test_cli_parser_stays_torch_free_and_lists_precompute():
    code = ("import sys; from fastlcm.cli import build_parser; p = build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'precompute' in p.format_help(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
def test_cuda_precompute_matches_cpu_and_loader_pins(tiny_sd_teacher, src, tmp_path):
    common = dict(teacher=str(tiny_sd_teacher), shards=src, batch_size=4, latent_dtype="float32", seed=1)
    cpu = precompute(PrecomputeOptions(out=str(tmp_path / "cpu"), device="cpu", **common))
    gpu = precompute(PrecomputeOptions(out=str(tmp_path / "gpu"), device="cuda", **common))
    a, b = by_source(cpu["spec"]), by_source(gpu["spec"], pin_memory=True)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        assert b[k].latent_mean.is_pinned()
        torch.testing.assert_close(b[k].latent_mean, a[k].latent_mean, rtol=1e-3, atol=1e-3)  # TF32 / cuDNN
        torch.testing.assert_close(b[k].prompt_embeds, a[k].prompt_embeds, rtol=1e-3, atol=1e-3)
