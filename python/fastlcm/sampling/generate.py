"""`fastlcm generate`'s library: a stock diffusers pipeline of the teacher's family around a distilled UNet or an
LCM-LoRA, with the LCMScheduler the student was distilled for, and sampling with it.

The teacher folder supplies the VAE, text encoder(s), tokenizer(s) and the schedule; its family
(``model_index.json``) picks the pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline). The scheduler is
diffusers' LCMScheduler with the N and λ recorded beside the student (:mod:`fastlcm.sampling.scheduler`). A
full-distilled UNet (``time_cond_proj_dim`` set) gets the guidance as w = guidance − 1 through ``timestep_cond`` and
runs one forward per step; an LCM-LoRA runs on the teacher's UNet and uses ordinary classifier-free guidance when
guidance > 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastlcm.errors import ConfigError
from fastlcm.families import ModelSource, detect
from fastlcm.sampling.scheduler import LCMSettings, lcm_scheduler, sampling_note
from fastlcm.sampling.student import load_student


def load_pipeline(teacher: str | Path, unet: str | Path | None = None, lora: str | Path | None = None,
                  device: str = "cpu", dtype: torch.dtype | None = None, **overrides):
    """(pipeline, note): the teacher's family pipeline with the student UNet or the LoRA applied and an
    LCMScheduler configured from the student's recorded settings (``overrides``: ``original_inference_steps``,
    ``timestep_scaling``, None = recorded). ``note`` is a one-line warning when nothing was recorded, else None."""
    dtype = dtype or torch.float32
    source = ModelSource(str(teacher), local_files_only=True)
    try:
        family = detect(source)
    except ConfigError as e:
        raise type(e)(f"--teacher {e}") from None
    student, settings, where = None, None, None
    if unet is not None:
        student, settings = load_student(unet, "--unet", dtype=dtype)
        where = str(unet)
    if lora is not None:
        if not Path(lora).exists():
            raise ConfigError(f"--lora {lora}: no such file or folder")
        settings, where = LCMSettings.load(lora) if Path(lora).is_dir() else None, str(lora)
    parts = family.load(source, unet=student is None, dtype=dtype)
    scheduler = lcm_scheduler(parts.scheduler_config, settings, **overrides)
    pipe = family.pipeline(parts, student if student is not None else parts.unet, scheduler)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
    given = any(v is not None for v in overrides.values())
    return pipe.to(device), None if given else sampling_note(settings, where)


def generate(pipe, prompts: list[str], steps: int = 4, guidance: float = 8.0, seed: int = 0,
             height: int | None = None, width: int | None = None, negative_prompt: str | None = None):
    """Float images [N, H, W, 3] in [0, 1]."""
    extra = {}
    if negative_prompt is not None:
        extra["negative_prompt"] = [negative_prompt] * len(prompts)
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="np",
        **extra,
    )
    return out.images
