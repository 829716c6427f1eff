"""LCM-LoRA as an option of the one `fastlcm train` path (tiny SD teacher, CPU): the teacher is the adapted UNet
with its adapters off (bit-identical to the plain teacher), only adapters train, checkpoints hold only the
adapters and resume exactly, and the export loads into a stock diffusers pipeline with `load_lora_weights`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastlcm.cli.flags import load_config
from fastlcm.config import TrainConfig
from fastlcm.errors import ConfigError
from fastlcm.families import get_family
from fastlcm.training.loop import train

SD = get_family("sd")

CAPTIONS = ["a red circle", "a blue square", "a photo of a cat", "a green triangle"]


class FakeLoader:
    """Batch-like objects that depend only on (seed, rank, position); resumable like ShardLoader."""

    def __init__(self, cfg, rank, world_size, epochs, seed):
        self.cfg, self.rank, self.seed, self.pos = cfg, rank, seed, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.rank * 104_729 + self.pos)
            b, r = self.cfg.train_batch_size, self.cfg.resolution
            pixels = torch.rand(b, 3, r, r, generator=g) * 2 - 1
            caps = [CAPTIONS[(self.pos + i) % len(CAPTIONS)] for i in range(b)]
            self.pos += 1
            yield SimpleNamespace(pixels=pixels, keys=[f"{self.pos}-{i}" for i in range(b)], captions=caps)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fastlcm.testing import make_tiny_shards

    d = tmp_path_factory.mktemp("lora-shards")
    make_tiny_shards(d, num_samples=2, samples_per_shard=2)
    return d / "shard-00000.tar"


def _cfg(teacher, shards, out, *extra):
    return load_config([
        "--pretrained_teacher_model", str(teacher), "--train_shards_path_or_url", str(shards),
        "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
        "--report_to", "none", "--validation_steps", "1000", "--loss_type", "huber", "--lora_rank", "4",
        "--lora_alpha", "8", "--learning_rate", "1e-3", *extra,
    ])


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _unet(teacher):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").eval()


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([999, 259][:batch]),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g))


# ---- config ----


def test_lora_flags_and_defaults(tiny_sd_teacher, shards, tmp_path):
    base = ["--pretrained_teacher_model", str(tiny_sd_teacher), "--train_shards_path_or_url", str(shards)]
    full = load_config(base)
    assert not full.use_lora and full.validation_guidance_scale == 8.0 and full.w_min == 5.0
    on = load_config(base + ["--lora"])
    assert on.use_lora and on.lora_r == 64 and on.lora_alpha == 64 and on.lora_dropout == 0.0
    assert on.learning_rate == 1e-4 and on.validation_guidance_scale == 1.0
    assert on.lora_modules == list(SD.lora_target_modules) and "time_emb_proj" in on.lora_modules
    ranked = load_config(base + ["--lora_rank", "8", "--lora_target_modules", "to_q, to_v"])
    assert ranked.use_lora and ranked.lora_r == 8 and ranked.lora_modules == ["to_q", "to_v"]
    assert not load_config(base + ["--lora_rank", "0"]).use_lora
    for extra, needle in ((["--lora", "--lora_rank", "0"], "--lora needs a positive --lora_rank"),
                          (["--lora", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
                          (["--lora", "--lora_target_modules", " , "], "--lora_target_modules must name"),
                          (["--lora", "--revision", "other"], "--revision")):
        with pytest.raises(ConfigError) as e:
            load_config(base + extra)
        assert needle in str(e.value)


def test_unknown_target_module_is_a_clear_error(tiny_sd_teacher):
    from fastlcm.training.lora import add_lora

    cfg = TrainConfig(lora=True, lora_target_modules="no_such_layer")
    with pytest.raises(ConfigError, match="--lora_target_modules"):
        add_lora(_unet(tiny_sd_teacher), cfg)


# ---- the teacher is the adapted UNet with adapters off ----


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_teacher_with_adapters_disabled_equals_plain_teacher_bit_for_bit(family, tiny_teacher_factory):
    from fastlcm.training.lora import AdaptersDisabled, add_lora

    teacher = tiny_teacher_factory(family, "epsilon")
    plain, adapted = _unet(teacher), add_lora(_unet(teacher), TrainConfig(lora_rank=4).with_family_defaults(SD))
    with torch.no_grad():  # non-zero adapters, so that "enabled" really differs
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    z, t, c = _inputs(plain)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor(
            [[64.0, 96, 0, 16, 64, 64], [120, 80, 28, 0, 64, 64]])}
    with torch.no_grad():
        want = plain(z, t, encoder_hidden_states=c, **kw).sample
        got = AdaptersDisabled(adapted)(z, t, encoder_hidden_states=c, **kw).sample
        on = adapted(z, t, encoder_hidden_states=c, **kw).sample  # re-enabled after the teacher call
    assert torch.equal(got, want)
    assert not torch.allclose(on, want, atol=1e-4)
    # one copy of the base weights: the adapted model's base layers are the teacher's, no second UNet
    n_base = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" not in n)
    assert n_base == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_lora_params_get_gradients(tiny_sd_teacher, checkpointing):
    from fastlcm.lcd.math import SolverGrid
    from fastlcm.lcd.step import LCDModels, LCDSettings, TorchDraws, lcd_step
    from fastlcm.families import load_teacher
    from fastlcm.training.lora import AdaptersDisabled, add_lora
    from fastlcm.training.models import trainable_parameters

    cfg = TrainConfig(pretrained_teacher_model=str(tiny_sd_teacher), lora_rank=4).with_family_defaults(SD)
    teacher = load_teacher(cfg.teacher_source())
    student = add_lora(teacher.unet, cfg)
    assert student is teacher.unet  # the same module
    if checkpointing:  # frozen base + checkpointed blocks must still pass gradients to the adapters
        student.enable_gradient_checkpointing()
    lora_names = {n for n, p in student.named_parameters() if "lora_" in n}
    assert lora_names and {n for n, p in student.named_parameters() if p.requires_grad} == lora_names
    assert all(p.dtype == torch.float32 for p in trainable_parameters(student))
    models = LCDModels(vae=teacher.vae, text=teacher.conditioner("cpu", cfg.resolution), student=student,
                       teacher=AdaptersDisabled(student), target=student, prediction_type="epsilon",
                       scaling_factor=teacher.vae.config.scaling_factor)
    grid = SolverGrid.build(teacher.noise_scheduler.alphas_cumprod.double(), 50)
    out = lcd_step(torch.rand(2, 3, 64, 64) * 2 - 1, CAPTIONS[:2], models, grid,
                   LCDSettings(w_min=5.0, w_max=15.0, guidance_dim=0), TorchDraws("cpu", 0))
    out.backward()
    got = {n for n, p in student.named_parameters() if p.grad is not None}
    assert got == lora_names
    # B starts at zero, so the first gradient lives in the B matrices (A's gradient is B^T·(...) = 0)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in student.named_parameters() if "lora_B" in n)
    assert not any(p.grad is not None for p in list(teacher.vae.parameters()) + list(teacher.text_encoder.parameters()))


# ---- a LoRA run: checkpoint = adapters only, resume, export that stock diffusers loads ----


@pytest.fixture(scope="module")
def lora_run(tiny_teacher_factory, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLCM_KERNELS", "torch")
        summary = train(_cfg(tiny_teacher_factory("sd", "epsilon"), shards, out, "--max_train_steps", "3",
                             "--checkpointing_steps", "2", "--export_pipeline", "--validation_steps", "3",
                             "--validation_prompts", "a cat"), loader_factory=FakeLoader)
    return SimpleNamespace(out=out, summary=summary)


def test_lora_checkpoint_holds_only_adapters(lora_run, tiny_sd_teacher):
    ck = lora_run.out / "checkpoint-2"
    assert (ck / "fastlcm_state.json").is_file() and (ck / "rank0.pt").is_file()
    assert (ck / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (ck / "unet_lora" / "peft_adapter" / "adapter_config.json").is_file()
    assert not (ck / "unet_target").exists()
    written = {p.name for p in ck.rglob("*") if p.is_file()}
    assert not written & {"model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors"}
    base = (Path(tiny_sd_teacher) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    lora = (ck / "unet_lora" / "pytorch_lora_weights.safetensors").stat().st_size
    assert lora < base / 4  # rank-4 adapters, not the base UNet
    grids = sorted(p.name for p in (lora_run.out / "validation").glob("*.png"))
    assert grids == ["step-000003-online.png"]  # no separate target for LoRA


def test_lora_resume_gives_the_same_losses(lora_run, tiny_sd_teacher, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLCM_KERNELS", "torch")
    first = train(_cfg(tiny_sd_teacher, shards, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2"),
                  loader_factory=FakeLoader)
    assert first["steps"] == 2
    second = train(_cfg(tiny_sd_teacher, shards, tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "2",
                        "--resume_from_checkpoint", "latest"), loader_factory=FakeLoader)
    assert second["steps"] == 3 and second["batches_seen"] == 3
    want, got = _losses(lora_run.out), _losses(tmp_path)
    assert sorted(got) == [1, 2, 3] and len(set(want.values())) == 3
    for s in (1, 2, 3):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-9), s
    from safetensors.torch import load_file

    a = load_file(str(lora_run.out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_lora_resume_refuses_a_full_checkpoint(tiny_sd_teacher, shards, tmp_path):
    from fastlcm.training.checkpoint import CheckpointError

    train(_cfg(tiny_sd_teacher, shards, tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1",
               "--lora_rank", "0"), loader_factory=FakeLoader)
    with pytest.raises(CheckpointError, match="full-distillation checkpoint; resume it with the same --lora"):
        train(_cfg(tiny_sd_teacher, shards, tmp_path, "--max_train_steps", "2", "--resume_from_checkpoint",
                   "latest"), loader_factory=FakeLoader)


def test_exported_lora_loads_in_stock_pipeline_and_changes_output(lora_run, tiny_sd_teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fastlcm.training.lora import add_lora, load_lora_state

    out = lora_run.out
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "peft_adapter").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_teacher, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = render()
    pipe.load_lora_weights(out)
    after = render()
    assert after.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(after)).all())
    assert float(abs(after - before).max()) > 1e-4
    # the stock-loaded UNet computes what the trained student computes (alpha/rank scaling included)
    student = add_lora(_unet(tiny_sd_teacher), TrainConfig(lora_rank=4, lora_alpha=8).with_family_defaults(SD))
    load_lora_state(student, out)
    z, t, c = _inputs(student)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(z, t, encoder_hidden_states=c).sample,
                                   student(z, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-5)
    # `fastlcm generate --lora` takes the export as it is
    from fastlcm.cli import main

    png = out / "generated.png"
    assert main(["generate", "--teacher", str(tiny_sd_teacher), "--lora", str(out), "--prompt", "a red circle",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    # the PEFT adapter folder loads with peft itself
    from peft import PeftModel

    peft_unet = PeftModel.from_pretrained(_unet(tiny_sd_teacher), str(out / "peft_adapter"))
    with torch.no_grad():
        torch.testing.assert_close(peft_unet(z, t, encoder_hidden_states=c).sample,
                                   student(z, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-5)
    # --export_pipeline: a complete pipeline with the LoRA fused into a plain UNet
    full = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert isinstance(full.scheduler, LCMScheduler) and not any("lora" in n for n, _ in full.unet.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(full.unet(z, t, encoder_hidden_states=c).sample,
                                   student(z, t, encoder_hidden_states=c).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [pytest.param("default", marks=pytest.mark.slow),
                                  # compiling and autotuning the three graphs on a GPU from a cold cache takes
                                  # longer than gpu_check.sh's 90 s per test (run of 2026-11-26: cut at 90 s)
                                  pytest.param("reduce-overhead", marks=[pytest.mark.gpu, pytest.mark.timeout(420)])])
def test_lora_with_compiled_unets_gives_the_eager_losses(tiny_sd_teacher, shards, tmp_path, monkeypatch, capsys,
                                                         mode):
    """--compile_unets all with LoRA: one compiled UNet serves the student (adapters on, with grad), the target
    (adapters on, no grad) and the teacher (adapters switched off around the call, a graph of its own); the losses
    equal the eager run's. Minutes of CPU compile, hence slow; reduce-overhead (CUDA graphs) on a GPU."""
    from torch._dynamo.utils import counters

    if mode == "reduce-overhead":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    runs = {}
    for compile_unets in ("none", "all"):
        counters.clear()
        out = tmp_path / compile_unets
        train(_cfg(tiny_sd_teacher, shards, out, "--max_train_steps", "3", "--checkpointing_steps", "100",
                   "--compile_unets", compile_unets, "--compile_mode", mode), loader_factory=FakeLoader)  # fmt: skip
        runs[compile_unets] = _losses(out)
        notice = f"fastlcm train: torch.compile ({mode}) of the student, teacher and target: the first steps compile"
        assert (notice in capsys.readouterr().err) == (compile_unets == "all")  # said only when compiling
    # student (forward + backward), target (no grad) and teacher (adapters off) each got a graph: nothing fell back
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    assert sorted(runs["all"]) == [1, 2, 3] and len(set(runs["none"].values())) == 3
    for s in (1, 2, 3):
        assert runs["all"][s] == pytest.approx(runs["none"][s], rel=1e-4, abs=1e-7), (s, runs)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "none" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "all" / "pytorch_lora_weights.safetensors"))
    # AdamW's first steps move each weight by about ±lr whatever the gradient's size, so reordered fp32 sums in
    # the compiled graphs can move a weight whose gradient is near zero differently: within one step's lr (1e-3)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-3) for k in a)
