"""The networks the trainer builds around the teacher: the full student and its EMA target, and the conditioner
that reads cached embeddings (``--precomputed_latents``). The teacher's own parts come from its family
(:mod:`fastlcm.families`); LCM-LoRA's student is in :mod:`fastlcm.training.lora`."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from fastlcm.lcd.conditioning import Conditioning, TextConditioner


def guidance_dim(teacher_unet, cfg) -> int:
    """d: the teacher's time_cond_proj_dim if it has one, else --unet_time_cond_proj_dim."""
    return teacher_unet.config.time_cond_proj_dim or cfg.unet_time_cond_proj_dim


def build_student(teacher_unet, time_cond_proj_dim: int, init_unet=None):
    """The teacher UNet rebuilt with ``time_cond_proj_dim`` = d and the teacher's weights (fp32, trainable).

    The guidance projection (``time_embedding.cond_proj``) is new and keeps its fresh initialization.
    ``init_unet`` (from --revision) replaces the teacher as the source of the initial weights.
    """
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    source = init_unet if init_unet is not None else teacher_unet
    state = {k: v.float() for k, v in source.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    fresh = [k for k in missing if not k.startswith("time_embedding.cond_proj")]
    if fresh or unexpected:
        raise RuntimeError(f"student/teacher weight mismatch: missing {fresh[:5]}, unexpected {list(unexpected)[:5]}")
    student.train()
    student.requires_grad_(True)
    return student


def build_target(student):
    """The target network: an fp32 copy of the student without gradients, updated by EMA."""
    target = copy.deepcopy(student)
    if any(p.dtype != torch.float32 for p in target.parameters()):
        target.to(torch.float32)
    target.requires_grad_(False)
    target.train()  # same mode as the diffusers script (the UNet has no dropout by default)
    return target


def load_student_init(cfg, teacher):
    """The UNet at --revision when it differs from the teacher's revision, else None (use the teacher)."""
    if cfg.revision is None or cfg.revision == cfg.teacher_revision:
        return None
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(**{**teacher.source.part("unet"), "revision": cfg.revision})


def trainable_parameters(module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (all of a full student; the adapters of a LoRA one)."""
    return [p for p in module.parameters() if p.requires_grad]


def set_memory_format(modules, channels_last: bool) -> None:
    """--channels_last: put the UNets' 4-D weights in channels_last (or back to contiguous) format, in place."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in modules:
        if m is None:
            continue
        if not channels_last and all(p.is_contiguous() for p in m.parameters()):
            continue  # already contiguous (the default): nothing to convert
        m.to(memory_format=fmt)


class PrecomputedConditioner:
    """--precomputed_latents: conditioning from the batch's cached embeddings (``fastlcm precompute``).

    The batch carries the family's ``cached_fields`` on the device (SD: ``prompt_embeds`` [B, 77, D]; SDXL also
    ``pooled_embeds`` [B, 1280]); the family's conditioner restores the step's conditioning from them (SDXL: time
    ids from the batch's original_sizes / crop_coords, as in the image path). A caption dropped by
    --proportion_empty_prompts (now "") gets the embedding of "" — what the image path encodes for it — computed
    once here, as is c∅. After construction the text encoders are not used.
    """

    def __init__(self, base: TextConditioner, fields: Sequence[str]):
        self.base, self.fields = base, tuple(fields)
        self._empty = {k: v.float() for k, v in base.embed([""]).items()}
        base.prepare_unconditional()  # c∅ while the encoders are on the device

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning:
        cached = {name: getattr(batch, name, None) for name in self.fields}
        missing = [name for name, value in cached.items() if value is None]
        if missing:
            raise ValueError(f"latent batch has no {', '.join(missing)} (were the latent shards made for a teacher "
                             "of another family?)")
        for name, value in cached.items():
            if value.shape[0] != len(captions):
                raise ValueError(f"latent batch has {value.shape[0]} {name} for {len(captions)} captions")
        dropped = [c == "" for c in captions]
        if any(dropped):
            mask = torch.tensor(dropped, device=cached[self.fields[0]].device)
            for name, value in cached.items():
                rows = mask.reshape(-1, *([1] * (value.ndim - 1)))
                cached[name] = torch.where(rows, self._empty[name].to(value.dtype), value)
        return self.base.restore(cached, batch)

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning:
        return self.base.unconditional(batch_size, batch)
