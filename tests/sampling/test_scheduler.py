"""The sampler settings travel with the model: export records the trained solver grid N and timestep scaling λ
(fastlcm.json beside every saved student) and `fastlcm generate`, `fastlcm eval` and validation build their
LCMScheduler from them through one helper — a student distilled on N = 25 samples on that grid, not LCMScheduler's
default 50."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fastlcm.errors import ConfigError
from fastlcm.sampling.scheduler import SETTINGS_FILE, LCMSettings, lcm_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, LAM = 25, 5.0


class FakeLoader:
    def __init__(self, cfg, rank, world_size, epochs, seed):
        self.cfg, self.pos = cfg, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.pos)
            b, r = self.cfg.train_batch_size, self.cfg.resolution
            self.pos += 1
            yield SimpleNamespace(pixels=torch.rand(b, 3, r, r, generator=g) * 2 - 1, keys=[str(i) for i in range(b)],
                                  captions=["a red circle"] * b)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _train(teacher, out, *extra):
    from fastlcm.cli.flags import load_config
    from fastlcm.testing import make_tiny_shards
    from fastlcm.training.loop import train

    make_tiny_shards(out / "shards", num_samples=2, samples_per_shard=2)
    cfg = load_config(["--pretrained_teacher_model", str(teacher), "--train_shards_path_or_url",
                       str(out / "shards" / "shard-00000.tar"), "--output_dir", str(out / "run"), "--resolution", "64",
                       "--train_batch_size", "2", "--seed", "0", "--report_to", "none", "--max_train_steps", "1",
                       "--checkpointing_steps", "1", "--validation_steps", "1", "--validation_prompts", "a cat",
                       "--num_ddim_timesteps", str(N), "--timestep_scaling_factor", str(LAM), *extra])
    train(cfg, loader_factory=FakeLoader)
    return out / "run"


@pytest.fixture(scope="module")
def full_run(tiny_teacher_factory, tmp_path_factory):
    return _train(tiny_teacher_factory("sd", "epsilon"), tmp_path_factory.mktemp("n25"), "--export_pipeline")


def _on_grid(scheduler, steps: int) -> list[int]:
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def test_export_records_n_and_lambda_beside_every_student(full_run):
    for folder in ("unet", "unet_target", "pipeline/unet", "checkpoint-1/unet_target"):
        saved = LCMSettings.load(full_run / folder)
        assert saved == LCMSettings(original_inference_steps=N, timestep_scaling=LAM, guidance_embedding_dim=256,
                                    prediction_type="epsilon", family="sd", mode="full"), folder
    pipeline = json.loads((full_run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert (pipeline["_class_name"], pipeline["original_inference_steps"], pipeline["timestep_scaling"]) == (
        "LCMScheduler", N, LAM)


def test_generate_and_eval_sample_on_the_trained_grid(full_run, tiny_sd_teacher, tmp_path, capsys, monkeypatch):
    from fastlcm.cli import main
    from fastlcm.sampling import evaluate as ev
    from fastlcm.sampling.generate import load_pipeline

    k = 1000 // N  # the grid τ_i = k(i+1) − 1 the student was distilled on
    pipe, note = load_pipeline(tiny_sd_teacher, unet=full_run / "unet")
    assert note is None
    assert (pipe.scheduler.config.original_inference_steps, pipe.scheduler.config.timestep_scaling) == (N, LAM)
    steps = _on_grid(pipe.scheduler, 4)
    assert all((t + 1) % k == 0 for t in steps), steps
    default = _on_grid(lcm_scheduler(dict(pipe.scheduler.config), None, original_inference_steps=50), 4)
    assert any((t + 1) % k for t in default), "the default grid of 50 would have sampled other timesteps"
    # a flag overrides what was recorded
    pipe, _ = load_pipeline(tiny_sd_teacher, unet=full_run / "unet", original_inference_steps=50)
    assert pipe.scheduler.config.original_inference_steps == 50

    out = tmp_path / "x.png"
    assert main(["generate", "--teacher", str(tiny_sd_teacher), "--unet", str(full_run / "unet_target"), "--prompt",
                 "a red circle", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file() and "note" not in capsys.readouterr().out

    seen = []
    real = ev.lcm_scheduler
    monkeypatch.setattr(ev, "lcm_scheduler", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    report = ev.evaluate(tiny_sd_teacher, student=full_run / "unet_target",
                         config=ev.EvalConfig(num_prompts=2, steps=(2,), reference_steps=2))
    assert "student_2" in report and seen
    assert all((s.config.original_inference_steps, s.config.timestep_scaling) == (N, LAM) for s in seen)


def test_validation_uses_the_run_grid(full_run):
    grids = sorted(p.name for p in (full_run / "validation").glob("*.png"))
    assert grids == ["step-000001-online.png", "step-000001-target.png"]


def test_a_student_without_settings_says_what_it_assumes(full_run, tiny_sd_teacher, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from fastlcm.cli import main

    bare = tmp_path / "bare"
    UNet2DConditionModel.from_pretrained(full_run / "unet").save_pretrained(bare)  # no fastlcm.json
    assert not (bare / SETTINGS_FILE).exists()
    assert main(["generate", "--teacher", str(tiny_sd_teacher), "--unet", str(bare), "--prompt", "a red circle",
                 "--steps", "1", "--out", str(tmp_path / "y.png")]) == 0
    printed = capsys.readouterr().out
    assert f"no {SETTINGS_FILE} in {bare}" in printed and "(50, 10)" in printed


def test_lora_export_records_its_settings(tiny_sd_teacher, tmp_path):
    run = _train(tiny_sd_teacher, tmp_path, "--lora_rank", "4")
    saved = LCMSettings.load(run)
    assert (saved.original_inference_steps, saved.timestep_scaling, saved.mode, saved.guidance_embedding_dim) == (
        N, LAM, "lora", 0)
    from fastlcm.sampling.generate import load_pipeline

    pipe, note = load_pipeline(tiny_sd_teacher, lora=run)
    assert note is None and pipe.scheduler.config.original_inference_steps == N


def test_unreadable_settings_are_one_line(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="unreadable sampler settings") as e:
        LCMSettings.load(tmp_path)
    assert str(tmp_path / SETTINGS_FILE) in str(e.value) and "\n" not in str(e.value)
