"""The trainer on CUDA in mixed precision (opt-in: -m gpu; slow CPU variant: -m slow)."""

from __future__ import annotations

import json

import pytest
import torch

from .test_train import FakeLoader, _cfg, shards  # noqa: F401  (fixture re-used)

from fastlcm.training.loop import train


def _run(teacher, shards, out, precision, *extra):
    cfg = _cfg(teacher, shards, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "3",
               "--mixed_precision", precision, "--export_pipeline", *extra)
    summary = train(cfg, loader_factory=FakeLoader)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and len(rows) == 3
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert (out / "checkpoint-2" / "fastlcm_state.json").is_file() and (out / "pipeline" / "model_index.json").is_file()
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("precision,extra", [("fp16", ()), ("fp16", ("--cast_teacher_unet",)), ("bf16", ("--allow_tf32",))])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_mixed_precision_on_cuda(tiny_teacher_factory, shards, tmp_path, precision, extra, ptype):  # noqa: F811
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run(tiny_teacher_factory("sd", ptype), shards, tmp_path, precision, *extra, "--gradient_checkpointing")


@pytest.mark.slow
def test_bf16_autocast_on_cpu(tiny_teacher_factory, shards, tmp_path):  # noqa: F811
    _run(tiny_teacher_factory("sd", "v_prediction"), shards, tmp_path, "bf16")


# ---- LCM-LoRA and SDXL in mixed precision (SDXL with --use_fix_crop_and_size: FakeLoader has no sizes/crops) ----

LORA = ("--lora_rank", "4")
SDXL_FIX = ("--use_fix_crop_and_size",)


@pytest.mark.gpu
@pytest.mark.parametrize("family,extra", [("sd", LORA), ("sdxl", SDXL_FIX), ("sdxl", SDXL_FIX + LORA)])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lora_and_sdxl_mixed_precision_on_cuda(tiny_teacher_factory, shards, tmp_path, family, extra,  # noqa: F811
                                               precision):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run(tiny_teacher_factory(family, "epsilon"), shards, tmp_path, precision, *extra, "--gradient_checkpointing")


@pytest.mark.slow
@pytest.mark.parametrize("family,extra", [("sd", LORA), ("sdxl", SDXL_FIX + LORA)])
def test_lora_and_sdxl_bf16_autocast_on_cpu(tiny_teacher_factory, shards, tmp_path, family, extra):  # noqa: F811
    _run(tiny_teacher_factory(family, "epsilon"), shards, tmp_path, "bf16", *extra)


# ---- speed levers on CUDA: the same losses with each lever on as with all off (fp32, TF32 off) ----

_BASE: dict = {}
OFF = ("--optimizer_impl", "foreach", "--no-device_prefetch", "--loader_dtype", "float32", "--compile_unets", "none")


def _losses_with(teacher, shards, out, loader, *levers):  # noqa: F811
    cfg = _cfg(teacher, shards, out, "--max_train_steps", "3", "--checkpointing_steps", "100",
               "--mixed_precision", "no", *levers)
    train(cfg, loader_factory=loader)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
@pytest.mark.parametrize("levers", [
    ("--optimizer_impl", "fused", "--device_prefetch", "--channels_last"),
    ("--compile_unets", "student"),  # includes the inductor compile of the tiny UNet's forward + backward
    # CUDA graphs (cudagraph trees) for all three UNets: outputs of one replay must not be overwritten while used
    # (its own time limit: the cold compile and autotuning outlast gpu_check.sh's 90 s per test)
    pytest.param(("--compile_unets", "all", "--compile_mode", "reduce-overhead"), marks=pytest.mark.timeout(420)),
], ids=["fused-adam+uint8-prefetch+channels-last", "compile-student", "compile-all-reduce-overhead"])
def test_levers_keep_the_losses_on_cuda(tiny_teacher_factory, shards, tmp_path, monkeypatch, levers):  # noqa: F811
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from .test_train import QuantizedFloatLoader, Uint8Loader

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    teacher = tiny_teacher_factory("sd", "epsilon")
    if "base" not in _BASE:  # all levers off: computed once for both cases
        _BASE["base"] = _losses_with(teacher, shards, tmp_path / "off", QuantizedFloatLoader, *OFF)
    base = _BASE["base"]
    # uint8 pixels normalized on the GPU (on the side stream with --device_prefetch) stand in for the float ones
    got = _losses_with(teacher, shards, tmp_path / "on", Uint8Loader, *OFF[:-2], *levers)
    assert len(got) == len(base) == 3
    assert got == pytest.approx(base, rel=2e-3), (levers, got, base)


@pytest.mark.gpu
def test_side_stream_copy_is_complete_before_use():
    """Many batches through the side stream, each checked right away on the compute stream: a missing
    wait_stream would let the check read a half-copied buffer."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from types import SimpleNamespace

    from fastlcm.training.step import BatchMover

    mover = BatchMover("cuda", side_stream=True)
    assert mover.stream is not None
    for i in range(20):
        host = torch.full((8, 3, 256, 256), i * 12, dtype=torch.uint8).pin_memory()
        busy = torch.randn(2048, 2048, device="cuda")
        for _ in range(5):  # keep the compute stream busy while the copy is queued
            busy = busy @ busy.T / 2048
        out = mover(SimpleNamespace(pixels=host, captions=[""] * 8))
        assert out.pixels.dtype == torch.float32 and out.pixels.is_cuda
        # the same normalization done synchronously on the compute stream (fp32 rounding included)
        expected = host.to("cuda").float().div_(127.5).sub_(1.0)
        assert torch.equal(out.pixels, expected), i


@pytest.mark.parametrize("device,precision", [("cpu", "no"), pytest.param("cuda", "bf16", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cached_latents_train_steps(tiny_teacher_factory, family, device, precision):
    """--precomputed_latents: the latent path through train.setup/train_step (VAE and text encoders parked on the
    CPU, c∅ and the "" embedding computed once) trains with finite losses from a fixed latent batch, half of the
    captions dropped. The CPU case runs in the default tier."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import tempfile
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from fastlcm.bench.step_models import fixed_latent_batch
    from fastlcm.config import TrainConfig
    from fastlcm.families import get_family, load_teacher
    from fastlcm.training.setup import setup
    from fastlcm.training.step import train_step

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher_factory(family, "epsilon")), resolution=64,
                      output_dir=tempfile.mkdtemp(), precomputed_latents=True, mixed_precision=precision,
                      proportion_empty_prompts=0.5, lr_warmup_steps=0).with_family_defaults(get_family(family))
    teacher = load_teacher(cfg.teacher_source())
    st = setup(cfg, Accelerator(mixed_precision=precision, cpu=device == "cpu"), teacher, num_training_steps=3, seed=0)
    assert st.offloaded and next(teacher.vae.parameters()).device.type == "cpu"
    assert next(teacher.unet.parameters()).device.type == device
    batch = fixed_latent_batch(teacher, 4, 64, pin=device == "cuda")
    losses = [train_step(st, batch) for _ in range(3)]
    assert all(v == v and v > 0 for v in losses), losses
    assert Path(cfg.output_dir).is_dir()
