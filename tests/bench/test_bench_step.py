"""`fastlcm bench step` on CPU with the tiny teacher (the code path the GPU run takes), and gpu_check.sh syntax."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fastlcm.cli import main

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"samples_per_s", "step_s", "peak_mem_gib", "parts", "gpu", "config"}
PARTS = {"loader_wait", "vae_encode", "text_encode", "teacher_forward", "target_forward", "student_forward_backward",
         "optimizer", "ema", "other"}  # fmt: skip


def _bench(capsys, *extra) -> dict:
    argv = ["bench", "step", "--steps", "2", "--warmup", "1", "--parts-steps", "1", "--batch-size", "2",
            "--mixed-precision", "no", "--device", "cpu", "--json", *extra]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _check(out: dict, batch_size: int = 2) -> None:
    assert KEYS <= out.keys()
    assert set(out["parts"]) == PARTS
    assert all(v >= 0 for v in out["parts"].values()), out["parts"]
    assert out["step_s"] > 0 and out["samples_per_s"] == pytest.approx(batch_size / out["step_s"])
    assert out["peak_mem_gib"] is None  # CPU: no CUDA allocator to read
    assert out["gpu"].startswith("cpu")
    assert out["compile_cache"] is None and not out["config"]["compile"]  # recorded for compiled runs only
    # "other" is the instrumented step minus the named parts, clamped at 0: the named parts must not exceed the
    # step they were measured in (a part timed twice would), and together they account for all of it
    named = sum(v for k, v in out["parts"].items() if k != "other")
    assert named <= out["instrumented_step_s"] * 1.01 + 1e-3
    assert sum(out["parts"].values()) == pytest.approx(out["instrumented_step_s"], rel=0.01, abs=1e-3)
    # the instrumented step runs the same work as a timed one, plus synchronizations (no-ops on CPU)
    assert out["instrumented_step_s"] < 3 * out["step_s"] + 0.5
    assert out["nonfinite_losses"] == 0


def test_bench_step_tiny_rust_loader(capsys, tmp_path, one_torch_thread):
    csv_path = tmp_path / "step.csv"
    out = _bench(capsys, "--family", "tiny", "--out-csv", str(csv_path))
    _check(out)
    assert out["config"]["input"] == "rust loader" and out["config"]["resolution"] == 64
    assert out["loader_stats"]["batches_yielded"] >= 4  # warmup 1 + timed 2 + instrumented 1
    assert out["parts"]["vae_encode"] > 0 and out["parts"]["student_forward_backward"] > 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["family"] == "tiny" and float(rows[0]["step_s"]) == pytest.approx(out["step_s"], rel=1e-4)
    assert rows[0]["commit"] and rows[0]["date"] and rows[0]["gpu"].startswith("cpu")


def test_bench_step_synthetic_input_local_teacher(capsys, tiny_teacher_factory, one_torch_thread):
    teacher = tiny_teacher_factory("sdxl", "epsilon")  # the SDXL path: two encoders, time ids from the fixed batch
    out = _bench(capsys, "--teacher", str(teacher), "--synthetic-input")
    _check(out)
    assert out["config"]["input"].startswith("synthetic") and out["loader_stats"] is None
    assert out["config"]["resolution"] == 64  # 8 × the tiny UNet's sample_size


def test_bench_step_rejects_bad_flags(capsys, tmp_path):
    assert main(["bench", "step", "--steps", "0", "--device", "cpu"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["bench", "step", "--teacher", str(tmp_path), "--device", "cpu"]) == 2
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    script = ROOT / "benches" / "gpu_check.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    for needle in ("pip install", "--no-index", "bench step", "bench kernels", "bench loader", "$OUT", "timeout"):
        assert needle in text, needle


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_random_teacher_has_the_published_architecture(family, tmp_path):
    """Built on the meta device (no memory, no init cost). Golden parameter counts are those of the published
    checkpoints: SD1.5 UNet 859,520,964 and SDXL UNet 2,567,463,684; SD VAE 83,653,863; CLIP ViT-L text
    123,060,480 and OpenCLIP bigG text + projection 694,659,840, each less (49408 − V) × hidden for the local
    tokenizer's V-token vocabulary instead of CLIP's 49,408."""
    import torch

    from fastlcm.bench.step_models import build_random_teacher

    with torch.device("meta"):
        teacher = build_random_teacher(family, tmp_path)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    vocab = teacher.text_encoder.config.vocab_size
    assert vocab == len(teacher.tokenizer)
    assert count(teacher.unet) == {"sd15": 859_520_964, "sdxl": 2_567_463_684}[family]
    assert count(teacher.vae) == 83_653_863
    assert count(teacher.text_encoder) == 123_060_480 - (49408 - vocab) * 768
    if family == "sdxl":
        assert teacher.family.name == "sdxl" and teacher.unet.config.addition_time_embed_dim == 256
        assert count(teacher.text_encoders[1]) == 694_659_840 - (49408 - len(teacher.tokenizers[1])) * 1280
    else:
        assert teacher.family.name == "sd" and len(teacher.text_encoders) == 1
    assert all(not p.requires_grad for p in teacher.unet.parameters())  # frozen like a family's load leaves it


def test_bench_step_cached_latents_input_skips_vae_and_text(capsys, one_torch_thread):
    out = _bench(capsys, "--family", "tiny", "--input", "latents", "--optimizer-impl", "foreach", "--channels-last",
                 "--teacher-cfg", "split", "--attention", "classic")  # fmt: skip
    _check(out)
    c = out["config"]
    assert (c["teacher_cfg"], c["attention"], c["kernels"]) == ("split", "classic", "auto")
    assert c["input"].startswith("cached latents") and out["loader_stats"] is None
    assert (c["optimizer_impl"], c["channels_last"], c["levers"]) == ("foreach", True, "flags")
    assert out["parts"]["vae_encode"] == 0 and out["parts"]["text_encode"] < out["parts"]["student_forward_backward"]


def test_bench_step_lora_trains_only_the_adapters(capsys, tmp_path, one_torch_thread):
    csv_path = tmp_path / "lora.csv"
    full = _bench(capsys, "--family", "tiny", "--input", "latents")
    lora = _bench(capsys, "--family", "tiny", "--input", "latents", "--lora-rank", "4", "--out-csv", str(csv_path))
    for out in (full, lora):
        _check(out)
    assert full["config"]["lora_rank"] is None and lora["config"]["lora_rank"] == 4
    # rank-4 adapters are a small fraction of the tiny UNet (which the full student trains whole, plus its
    # guidance projection)
    assert 0 < lora["config"]["trainable_params"] < full["config"]["trainable_params"] / 4
    assert lora["reference"]["matching"] is None
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    assert (row["lora_rank"], row["trainable_params"]) == ("4", str(lora["config"]["trainable_params"]))
    capsys.readouterr()
    assert main(["bench", "step", "--family", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                 "--parts-steps", "0", "--batch-size", "2", "--input", "latents", "--lora-rank", "4"]) == 0
    assert "LoRA rank 4, bf16" in capsys.readouterr().out  # the report names it
    assert main(["bench", "step", "--family", "tiny", "--device", "cpu", "--lora-rank", "4", "--matrix", "+latents"]) == 2
    assert "--lora-rank is for single runs" in capsys.readouterr().err
    assert main(["bench", "step", "--family", "tiny", "--device", "cpu", "--lora-rank", "-1"]) == 2
    assert "--lora-rank must be >= 0, got -1" in capsys.readouterr().err


def test_bench_step_matrix_runs_each_lever_set_once(capsys, tmp_path, one_torch_thread):
    csv_path = tmp_path / "matrix.csv"
    argv = ["bench", "step", "--family", "tiny", "--batch-size", "2", "--steps", "2", "--warmup", "1",
            "--parts-steps", "1", "--device", "cpu", "--input", "synthetic", "--out-csv", str(csv_path),
            "--matrix", "reference-bf16,+uint8-prefetch", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    sets = json.loads(capsys.readouterr().out)["sets"]
    assert [s["config"]["levers"] for s in sets] == ["reference-bf16", "+uint8-prefetch"]
    ref, cum = (s["config"] for s in sets)
    assert (ref["optimizer_impl"], ref["loader_dtype"], ref["device_prefetch"]) == ("foreach", "float32", False)
    # cumulative: +uint8-prefetch carries +fused-adam's change too
    assert (cum["optimizer_impl"], cum["loader_dtype"], cum["device_prefetch"]) == ("fused", "uint8", True)
    for s in sets:
        _check(s)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["levers"] for r in rows] == ["reference-bf16", "+uint8-prefetch"]
    assert rows[1]["loader_dtype"] == "uint8" and float(rows[0]["warmup_s"]) > 0
    capsys.readouterr()
    assert main(argv[:-1]) == 0  # the table
    table = capsys.readouterr().out
    assert "reference-bf16" in table and "+uint8-prefetch" in table and "vs base" in table


def test_bench_csvs_refuse_a_file_with_other_columns_before_measuring(capsys, tmp_path):
    from fastlcm.bench.common import append_csv

    old = tmp_path / "old.csv"
    old.write_text("date,commit,samples_per_s\r\n2026-01-01,abc,1.0\r\n")
    before = old.read_bytes()
    assert main(["bench", "step", "--family", "tiny", "--device", "cpu", "--out-csv", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"--out-csv {old}: its header does not match" in err and "'compile_cache'" in err
    assert main(["bench", "kernels", "--wrapper-overhead", "--record", str(old), "--calls", "1", "--rounds", "1"]) == 2
    assert f"--record {old}: its header does not match" in capsys.readouterr().err
    assert main(["bench", "loader", "--synthetic", "8", "--out-csv", str(old)]) == 2
    assert f"--out-csv {old}: its header does not match" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown none, different order"):
        append_csv(str(old), [{"date": "x"}], ["commit", "date", "samples_per_s"])
    assert old.read_bytes() == before  # nothing appended, nothing rewritten
    append_csv(str(old), [{"date": "2026-01-02", "samples_per_s": 2.0}], ["date", "commit", "samples_per_s"])
    assert old.read_text().splitlines()[-1] == "2026-01-02,,2.0"


def test_bench_step_matrix_rejects_unknown_sets(capsys):
    assert main(["bench", "step", "--family", "tiny", "--device", "cpu", "--matrix", "reference-bf16,+turbo"]) == 2
    assert "+turbo" in capsys.readouterr().err
    assert main(["bench", "step", "--family", "tiny", "--device", "cpu", "--matrix", "reference-fp16-ckpt"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_images_plus_compile_set_is_the_compile_set_on_images():
    from fastlcm.bench.step_matrix import lever_set, parse_sets

    assert "images+compile" in parse_sets("all")
    on_images, on_latents = lever_set("images+compile", "loader"), lever_set("+compile", "loader")
    assert on_latents["input"] == "latents" and on_images["input"] == "loader"
    assert {k: v for k, v in on_images.items() if k != "input"} == {k: v for k, v in on_latents.items() if k != "input"}


def test_variant_sets_are_their_base_with_one_change():
    from fastlcm.bench.step_matrix import VARIANTS, base_set, lever_set

    assert base_set("reference-bf16") is None and base_set("+fused-adam") == "reference-bf16"
    assert base_set("+compile-ro") == "+compile"
    for name, (base, change) in VARIANTS.items():
        assert base_set(name) == base
        levers, of_base = lever_set(name, "synthetic"), lever_set(base, "synthetic")
        differs = {k for k in levers if levers[k] != of_base[k]}
        expected = {k for k, v in change.items() if v != "images"} | ({"input"} if change.get("input") else set())
        assert differs == expected, name
    assert lever_set("latents:torch-kernels", "loader")["kernels"] == "torch"
    assert lever_set("reference-bf16-ckpt", "loader")["gradient_checkpointing"] is True


def test_ablations_switch_levers_off_for_the_measurement_and_restore_the_teacher(tiny_teacher_factory):
    """The bench's ablation context: FASTLCM_KERNELS=torch, the teacher's guidance as two forwards and diffusers'
    classic attention inside; the shared teacher's processors and the kernel mode are back afterwards."""
    import os
    from types import SimpleNamespace

    from diffusers.models.attention_processor import AttnProcessor

    from fastlcm.bench.step_core import ablations
    from fastlcm.families import load_teacher
    from fastlcm.kernels import kernel_mode
    from fastlcm.lcd.step import LCDSettings
    from fastlcm.training.models import build_student

    teacher = load_teacher(tiny_teacher_factory("sd", "epsilon"))
    student = build_student(teacher.unet, 8)
    before = {k: type(v) for k, v in teacher.unet.attn_processors.items()}
    assert before and AttnProcessor not in before.values()
    st = SimpleNamespace(teacher=teacher, unwrap=student, target=None, settings=LCDSettings())
    env = os.environ.pop("FASTLCM_KERNELS", None)
    try:
        with ablations(st, {"kernels": "torch", "teacher_cfg": "split", "attention": "classic"}):
            assert kernel_mode() == "torch" and st.settings.teacher_cfg_batched is False
            for unet in (teacher.unet, student):
                assert {type(v) for v in unet.attn_processors.values()} == {AttnProcessor}
        assert kernel_mode() == "auto" and st.settings.teacher_cfg_batched is True
        assert {k: type(v) for k, v in teacher.unet.attn_processors.items()} == before
        with ablations(st, {"kernels": "auto", "teacher_cfg": "batched", "attention": "sdpa"}):
            assert {k: type(v) for k, v in teacher.unet.attn_processors.items()} == before
    finally:
        if env is not None:
            os.environ["FASTLCM_KERNELS"] = env


def test_bench_step_matrix_ablations_compare_with_their_base(capsys, one_torch_thread):
    argv = ["bench", "step", "--family", "tiny", "--batch-size", "2", "--steps", "2", "--warmup", "1",
            "--parts-steps", "0", "--device", "cpu", "--json",
            "--matrix", "latents:split-cfg,+latents,latents:classic-attention,+latents"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    sets = json.loads(capsys.readouterr().out)["sets"]
    assert [s["config"]["levers"] for s in sets] == ["latents:split-cfg", "+latents", "latents:classic-attention",
                                                     "+latents"]  # fmt: skip
    split, base, classic, again = sets
    assert split["config"]["teacher_cfg"] == "split" and classic["config"]["attention"] == "classic"
    assert split["base"] == "+latents" and split["vs_base"] is None  # its base ran after it
    assert classic["vs_base"] == pytest.approx(base["step_s"] / classic["step_s"])
    # +latents' own base (+channels-last) was not measured; a set named twice gets two rows
    assert base["base"] == "+channels-last" and base["vs_base"] is None and again["vs_base"] is None
    assert again["step_s"] > 0
    assert all(s["nonfinite_losses"] == 0 for s in sets)
