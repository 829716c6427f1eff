"""The tiny-teacher training script (smoke run) and the shipped, trained teacher it produced."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from fastlcm.demo import teacher as demo_teacher
from fastlcm.demo.procedural import ASSETS, TINY_TEACHER


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_smoke_run_saves_a_loadable_pipeline_and_classifier(tmp_path):
    from diffusers import StableDiffusionPipeline

    argv = ["--out", str(tmp_path), "--tiny", "--vae-steps", "2", "--unet-steps", "2", "--classifier-steps", "2",
            "--num-images", "16", "--batch-size", "4", "--vae-batch-size", "4"]
    assert demo_teacher.main(argv) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny_teacher", torch_dtype=torch.float32)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16  # tiny config: 3 VAE blocks
    assert pipe.scheduler.config.prediction_type == "epsilon"
    info = json.loads((tmp_path / "tiny_teacher_info.json").read_text())
    assert info["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert set(info["classifier_held_out"]) >= {"shape_accuracy", "colour_accuracy", "caption_accuracy"}
    assert (tmp_path / "caption_classifier.safetensors").is_file()
    assert not (tmp_path / "_tokenizer_tmp").exists()


def test_bad_flags_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        demo_teacher.main(["--out", str(tmp_path), "--batch-size", "0"])


def test_progress_stops_on_time_budget():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    prog = demo_teacher._Progress(opt, steps=10**9, minutes=0.5 / 60, warmup=2)
    prog.set_lr(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warm-up
    assert not prog.done(3)
    time.sleep(0.6)
    assert prog.done(3)
    prog.set_lr(3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end with the budget
    assert demo_teacher._Progress(opt, steps=5, minutes=0, warmup=1).done(5)


def test_shipped_teacher_is_small_stock_diffusers_layout():
    from diffusers import StableDiffusionPipeline

    assert (TINY_TEACHER / "model_index.json").is_file(), "run python -m fastlcm.demo.teacher and copy tiny_teacher/"
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 20 * 2**20, total
    index = json.loads((TINY_TEACHER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {p.name for p in TINY_TEACHER.iterdir() if p.is_dir()} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    pipe = StableDiffusionPipeline.from_pretrained(TINY_TEACHER, torch_dtype=torch.float32, local_files_only=True)
    sched = pipe.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.prediction_type) == (1000, "scaled_linear", "epsilon")
    assert next(pipe.unet.parameters()).dtype == torch.float32  # fp16 on disk, fp32 when asked
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle in the center on a black background"], num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_shipped_teacher_follows_captions():
    """50-step DDIM + CFG 7 on one prompt per shape × colour pair; the shipped classifier reads the result."""
    from fastlcm.sampling.evaluate import EvalConfig, evaluate

    report = evaluate(TINY_TEACHER, config=EvalConfig(num_prompts=30, steps=(4,)))
    acc = report["teacher_ddim_50"]
    # Measured on the shipped weights (30 prompts, seed 0, CFG 7): colour 0.93, shape 0.67, position 1.0,
    # background 0.97. Chance is 0.2 / 0.33 / 0.11 / 0.33; the bounds leave a few images of slack for other CPUs.
    assert acc["colour_accuracy"] >= 0.85 and acc["shape_accuracy"] >= 0.5, acc
    assert acc["position_accuracy"] >= 0.9 and acc["background_accuracy"] >= 0.85, acc
