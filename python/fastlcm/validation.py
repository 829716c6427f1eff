"""Validation grids: a few LCMScheduler steps per prompt with the student and the target, saved and logged."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch


def lcm_scheduler(scheduler_config: dict, original_inference_steps: int, timestep_scaling: float):
    """diffusers' LCMScheduler on the teacher's schedule, with the distillation's N and λ."""
    import inspect

    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    keep = {k: v for k, v in scheduler_config.items() if k in accepted}
    return LCMScheduler.from_config(keep, original_inference_steps=original_inference_steps,
                                    timestep_scaling=timestep_scaling)


def build_pipeline(teacher, unet, scheduler):
    """A stock diffusers pipeline of the teacher's family around ``unet`` (SD: StableDiffusionPipeline, SDXL:
    StableDiffusionXLPipeline with zero embeddings for the empty negative prompt, as in training)."""
    if teacher.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer, tokenizer_2=teacher.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_grid(images: np.ndarray) -> np.ndarray:
    """[n, H, W, 3] floats in [0, 1] → one uint8 row [H, n·W, 3]."""
    return (np.concatenate(list(images), axis=1).clip(0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def run_validation(accelerator, teacher, unets: dict, cfg, step: int, autocast_dtype: torch.dtype | None) -> list[Path]:
    """Render cfg.validation_prompts with each UNet; save PNG grids under output_dir/validation; log them.

    A LoRA student is passed with its adapters enabled; it has no w input, so the guidance scale (default 1)
    is the pipeline's classifier-free guidance."""
    from PIL import Image

    out_dir = Path(cfg.output_dir) / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = lcm_scheduler(teacher.scheduler_config, cfg.num_ddim_timesteps, cfg.timestep_scaling_factor)
    device = accelerator.device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    guidance = cfg.validation_guidance_scale if cfg.validation_guidance_scale is not None else (
        1.0 if cfg.use_lora else 8.0)
    written = []
    for name, unet in unets.items():
        was_training = unet.training
        unet.eval()
        pipe = build_pipeline(teacher, unet, scheduler)
        gen = torch.Generator(device=device).manual_seed(cfg.seed or 0)
        with ctx:
            images = pipe(prompt=list(cfg.validation_prompts), num_inference_steps=cfg.validation_num_inference_steps,
                          guidance_scale=guidance, height=cfg.resolution, width=cfg.resolution,
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
