"""`fastlcm eval`: the samplers match diffusers' pipelines, the report has the promised structure and
properties on the shipped trained teacher, and the CLI writes report.json + grid.png."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastlcm.cli import eval as eval_cli
from fastlcm.demo.procedural import TINY_TEACHER
from fastlcm.errors import ConfigError
from fastlcm.sampling import evaluate as ev
from fastlcm.sampling.student import load_student, student_from_teacher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped():
    if not (TINY_TEACHER / "model_index.json").is_file():
        pytest.fail(f"the shipped tiny teacher is missing: {TINY_TEACHER} (python -m fastlcm.demo.teacher)")
    return ev.EvalTeacher(TINY_TEACHER)


@pytest.fixture(scope="module")
def standin(shipped):
    return student_from_teacher(shipped.unet, time_cond_proj_dim=32)


def _random_guidance_proj(unet, seed=0):
    with torch.no_grad():
        w = unet.time_embedding.cond_proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return unet


def test_lcm_sample_matches_stock_pipeline(tiny_sd_teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_teacher, safety_checker=None, requires_safety_checker=False)
    student = _random_guidance_proj(student_from_teacher(pipe.unet, time_cond_proj_dim=16))
    pipe.unet, pipe.scheduler = student, LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, latents=noise.clone(), output_type="latent",
                generator=torch.Generator().manual_seed(5)).images
    teacher = ev.EvalTeacher(tiny_sd_teacher)
    got = ev.lcm_sample(student, teacher.scheduler_config, noise, teacher.encode(prompts), 3, 3.0, seed=5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The guidance embedding really enters: another w gives another result.
    other = ev.lcm_sample(student, teacher.scheduler_config, noise, teacher.encode(prompts), 3, 7.0, seed=5)
    assert (other - got).abs().max() > 1e-4


def test_ddim_sample_matches_stock_pipeline_with_cfg(tiny_sd_teacher):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_teacher, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a green triangle", "a yellow circle"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    want = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(), output_type="latent").images
    teacher = ev.EvalTeacher(tiny_sd_teacher)
    got = ev.ddim_sample(teacher.unet, teacher.scheduler_config, noise, teacher.encode(prompts),
                         teacher.unconditional(2), 4, 5.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_psnr():
    a = np.zeros((2, 4, 4, 3))
    assert ev.psnr(a, a) == ev.PSNR_CAP
    b = a + 0.1  # mse 0.01 → 20 dB
    assert ev.psnr(a, b) == pytest.approx(20.0)


def test_eval_prompts_cover_every_shape_colour_pair():
    from fastlcm.demo.procedural import COLOURS, SHAPES, parse_caption

    prompts, labels = ev.eval_prompts(15, seed=3)
    assert {(lab["shape"], lab["colour"]) for lab in labels} == {(s, c) for s in SHAPES for c in COLOURS}
    assert [parse_caption(p) for p in prompts] == labels
    assert ev.eval_prompts(15, seed=3) == (prompts, labels)


def test_report_on_shipped_teacher(shipped, standin, tmp_path):
    cfg = ev.EvalConfig(num_prompts=6, steps=(1, 2, 4, 8), grid_columns=4)
    report = ev.evaluate(shipped, out_dir=tmp_path, config=cfg, student_unet=standin)
    keys = {f"teacher_ddim_{k}" for k in (1, 2, 4, 8, 50)} | {f"student_{k}" for k in (1, 2, 4, 8)} | {"meta"}
    assert set(report) == keys
    for name in keys - {"meta"}:
        assert {"latent_mse", "psnr", "caption_accuracy"} <= set(report[name])
        assert 0.0 <= report[name]["caption_accuracy"] <= 1.0 and math.isfinite(report[name]["psnr"])
    ref = report["teacher_ddim_50"]
    assert ref["latent_mse"] == 0.0 and ref["psnr"] == ev.PSNR_CAP
    # A trained teacher's DDIM converges to its own 50-step output as steps grow.
    mse = [report[f"teacher_ddim_{k}"]["latent_mse"] for k in (1, 2, 4, 8)]
    assert mse[0] > mse[1] > mse[2] > mse[3] > 0, mse
    psnr = [report[f"teacher_ddim_{k}"]["psnr"] for k in (1, 2, 4, 8)]
    assert psnr[3] > psnr[0], psnr
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["teacher_ddim_4"] == report["teacher_ddim_4"]
    with Image.open(tmp_path / "grid.png") as im:
        grid = np.asarray(im)
    assert grid.shape == (5 * 66 + 2, 4 * 66 + 2, 3)  # rows ddim50, ddim4, student 4/2/1; 64 px + 2 px padding
    assert "teacher_ddim_50" in ev.format_table(report) and "student_1" in ev.format_table(report)


def test_teacher_only_report_and_errors(shipped, tmp_path):
    report = ev.evaluate(shipped, config=ev.EvalConfig(num_prompts=2, steps=(1,), reference_steps=2))
    assert set(report) == {"teacher_ddim_1", "teacher_ddim_2", "meta"}
    with pytest.raises(ValueError, match="steps"):
        ev.evaluate(shipped, config=ev.EvalConfig(num_prompts=2, steps=(0,)))
    with pytest.raises(ConfigError, match="--student"):
        load_student(tmp_path)
    shipped.unet.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        load_student(tmp_path / "plain")
    with pytest.raises(ConfigError, match="--teacher"):
        ev.EvalTeacher(tmp_path)


def test_cli_run_writes_report_and_grid(standin, tmp_path, capsys):
    standin.save_pretrained(tmp_path / "student")
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["--student", str(tmp_path / "student"), "--out", str(tmp_path / "eval"),
                              "--num-prompts", "3", "--steps", "1,2", "--reference-steps", "4", "--device", "cpu"])
    assert eval_cli.run(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"student_1", "student_2", "teacher_ddim_1", "teacher_ddim_2", "teacher_ddim_4"} <= set(report)
    assert (tmp_path / "eval" / "grid.png").is_file()
    assert "student_2" in capsys.readouterr().out
    bad = parser.parse_args(["--steps", "1,x"])
    assert eval_cli.run(bad) == 2
    assert "--steps" in capsys.readouterr().err
