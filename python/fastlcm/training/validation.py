"""Validation grids: a few LCMScheduler steps per prompt with the student and the target, saved and logged."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from fastlcm.sampling.scheduler import lcm_scheduler


def image_grid(images: np.ndarray) -> np.ndarray:
    """[n, H, W, 3] floats in [0, 1] → one uint8 row [H, n·W, 3]."""
    return (np.concatenate(list(images), axis=1).clip(0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def run_validation(st, step: int) -> list[Path]:
    """Render the run's --validation_prompts with the online student and the target (:class:`TrainState` ``st``);
    save PNG grids under output_dir/validation; log them to the trackers.

    A LoRA student is rendered with its adapters enabled; it has no w input, so the guidance scale (default 1)
    is the pipeline's classifier-free guidance. The scheduler is the one the export configures (the run's N, λ)."""
    from PIL import Image

    cfg, accelerator, teacher = st.cfg, st.accelerator, st.teacher
    unets = {"online": st.unwrap} if st.target is None else {"online": st.unwrap, "target": st.target}
    out_dir = Path(cfg.output_dir) / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = lcm_scheduler(teacher.scheduler_config, st.lcm_settings)
    device, wd = accelerator.device, st.dtypes["text"]
    ctx = torch.autocast(device.type, dtype=wd) if wd != torch.float32 else contextlib.nullcontext()
    written = []
    for name, unet in unets.items():
        was_training = unet.training
        unet.eval()
        pipe = teacher.family.pipeline(teacher, unet, scheduler)
        gen = torch.Generator(device=device).manual_seed(cfg.seed or 0)
        with ctx:
            images = pipe(prompt=list(cfg.validation_prompts), num_inference_steps=cfg.validation_num_inference_steps,
                          guidance_scale=cfg.validation_guidance_scale, height=cfg.resolution, width=cfg.resolution,
                          generator=gen, output_type="np").images
        unet.train(was_training)
        grid = image_grid(np.asarray(images, dtype=np.float32))
        path = out_dir / f"step-{step:06d}-{name}.png"
        Image.fromarray(grid).save(path)
        written.append(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(f"validation/{name}", np.asarray(images), step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({f"validation/{name}": [wandb.Image(im, caption=p)
                                                    for im, p in zip(images, cfg.validation_prompts)]}, step=step)
    return written
