"""A distilled student from a folder (``unet/`` written by ``fastlcm train``, or a pipeline folder holding one),
with the sampler settings recorded beside it; and a stand-in student made from a teacher UNet."""

from __future__ import annotations

from pathlib import Path

import torch

from fastlcm.errors import ConfigError
from fastlcm.sampling.scheduler import LCMSettings
from fastlcm.training.models import build_student


def student_folder(path: str | Path, flag: str) -> Path:
    """The UNet folder ``path`` names: the folder itself or its ``unet/`` subfolder."""
    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"{flag} {path}: no config.json here or in {path / 'unet'} (expected a diffusers UNet folder)")


def load_student(path: str | Path, flag: str = "--student", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """(full-distilled UNet in eval mode, its :class:`LCMSettings` or None) from a folder; ConfigError naming the
    flag when it is not a UNet with a guidance input (``time_cond_proj_dim``)."""
    from diffusers import UNet2DConditionModel

    folder = student_folder(path, flag)
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    if unet.config.time_cond_proj_dim is None:
        raise ConfigError(f"{flag} {path}: UNet config has no time_cond_proj_dim (not a full-distilled LCM UNet; "
                          "an LCM-LoRA goes in --lora)")
    return unet.to(device).eval(), LCMSettings.load(folder)


def student_from_teacher(teacher_unet, out_dir: str | Path | None = None, time_cond_proj_dim: int = 256):
    """The teacher UNet rebuilt with ``time_cond_proj_dim`` (its weights, a zero guidance projection).

    A stand-in for a distilled student (tests, a "before training" row); saved to ``out_dir`` when given.
    """
    student = build_student(teacher_unet, time_cond_proj_dim)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    dtype = next(teacher_unet.parameters()).dtype
    student = (student if dtype == torch.float32 else student.to(dtype=dtype)).eval()
    if out_dir is not None:
        student.save_pretrained(out_dir)
    return student
