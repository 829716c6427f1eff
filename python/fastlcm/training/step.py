"""One training step (DESIGN.md "The LCD step"): the batch to the device, caption dropping, steps 1–12 in
:func:`fastlcm.lcd.step.lcd_step`, then steps 13–14 here: backward, clipping, optimizer, LR schedule and the EMA of
the target. :class:`TrainState` is what the step touches (built by :func:`fastlcm.training.setup.setup`, shared by
the training loop and `fastlcm bench step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from typing import Any

import torch

from fastlcm.config import TrainConfig
from fastlcm.errors import NonFiniteLossError
from fastlcm.families import Teacher
from fastlcm.lcd.math import SolverGrid, ema_update
from fastlcm.lcd.step import LCDModels, LCDSettings, TorchDraws, lcd_step
from fastlcm.sampling.scheduler import LCMSettings


@dataclasses.dataclass
class TrainState:
    """Everything one training step touches, assembled by :func:`fastlcm.training.setup.setup`."""

    cfg: TrainConfig
    accelerator: Any
    teacher: Teacher
    student: torch.nn.Module
    """As prepared by Accelerate (DDP-wrapped on several processes)."""
    unwrap: torch.nn.Module
    """The bare student module (checkpoints, validation, export)."""
    target: torch.nn.Module | None
    """The EMA target; None for LoRA (the target is the student)."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    lcd_models: LCDModels
    grid: SolverGrid
    settings: LCDSettings
    draws: TorchDraws
    caption_rng: random.Random
    dtypes: dict[str, torch.dtype]
    mover: "BatchMover"
    offloaded: bool = False
    """--precomputed_latents: VAE and text encoders parked on the CPU (brought back for validation)."""

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def lcm_settings(self) -> LCMSettings:
        """How the student of this run is sampled (written beside every saved student)."""
        return LCMSettings(original_inference_steps=self.cfg.num_ddim_timesteps,
                           timestep_scaling=self.cfg.timestep_scaling_factor,
                           guidance_embedding_dim=self.settings.guidance_dim,
                           prediction_type=self.teacher.prediction_type, family=self.teacher.family.name,
                           mode="lora" if self.cfg.use_lora else "full")


def drop_captions(captions, p: float, rng: random.Random) -> list[str]:
    """--proportion_empty_prompts: each caption becomes "" with probability p (seeded, per sample)."""
    return ["" if p > 0 and rng.random() < p else c for c in captions]


@dataclasses.dataclass
class DeviceBatch:
    """A batch on the training device: ``pixels`` [-1, 1] (image shards) or the cached latent fields."""

    captions: list
    pixels: torch.Tensor | None = None
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    original_sizes: torch.Tensor | None = None
    crop_coords: torch.Tensor | None = None
    keys: list = dataclasses.field(default_factory=list)


class BatchMover:
    """Host batch → :class:`DeviceBatch`. uint8 pixels are normalized (x/127.5 − 1, fp32) on the device after the
    copy. With ``side_stream`` (CUDA, --device_prefetch) the copy and normalize run on a side stream: they are
    queued while the GPU still runs the previous step's backward/optimizer/EMA (the host is ahead of the device),
    and the compute stream waits only for them. Batches are pulled from the loader one at a time, so a
    checkpoint's loader state is exactly the batches trained on.

    A batch is an image batch (``pixels``: :class:`fastlcm.data.Batch`) or a latent batch (``latent_mean`` set:
    :class:`fastlcm.data.LatentBatch`)."""

    FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_embeds")

    def __init__(self, device, side_stream: bool = False, mark_cudagraph_step: bool = False):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if side_stream and self.device.type == "cuda" else None
        self.mark_cudagraph_step = mark_cudagraph_step

    def _copy(self, batch) -> DeviceBatch:
        out = DeviceBatch(list(batch.captions), original_sizes=getattr(batch, "original_sizes", None),
                          crop_coords=getattr(batch, "crop_coords", None), keys=list(getattr(batch, "keys", [])))
        if getattr(batch, "latent_mean", None) is not None:
            for name in self.FIELDS:
                value = getattr(batch, name, None)
                setattr(out, name, None if value is None else value.to(self.device, torch.float32, non_blocking=True))
        else:
            x = batch.pixels.to(self.device, non_blocking=True)
            out.pixels = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x
        return out

    def __call__(self, batch) -> DeviceBatch:
        if self.mark_cudagraph_step:  # reduce-overhead: a new step begins (outputs of the last one may be reused)
            torch.compiler.cudagraph_mark_step_begin()
        if self.stream is None:
            return self._copy(batch)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = self._copy(batch)
        main.wait_stream(self.stream)
        for t in (out.pixels, *(getattr(out, n) for n in self.FIELDS)):
            if t is not None:
                t.record_stream(main)  # allocated on the side stream, used (and freed) on the main one
        return out


def _no_part(_name):
    return contextlib.nullcontext()


def train_step(st: TrainState, batch, *, part=None, lcd_models=None, check_finite: bool = True) -> float:
    """One micro-batch (DESIGN.md steps 1–14): batch → device, caption dropping, lcd_step, the finite-loss check
    (a host sync; raises NonFiniteLossError before any update), backward, clipping, optimizer and LR schedule, and
    after each optimizer step the EMA of the target. Returns the loss (mean over processes).

    ``part(name)`` (a context-manager factory) and ``lcd_models`` (instrumented models) are the bench's hooks."""
    part = part or _no_part
    acc, cfg = st.accelerator, st.cfg
    with part("loader_wait"):
        dev = st.mover(batch)
    captions = drop_captions(batch.captions, cfg.proportion_empty_prompts, st.caption_rng)
    with acc.accumulate(st.student):
        loss = lcd_step(dev.pixels, captions, lcd_models or st.lcd_models, st.grid, st.settings, st.draws, dev)
        mean_loss = acc.reduce(loss.detach().clone(), "mean") if st.world > 1 else loss.detach()
        value = float(mean_loss)  # a host sync: the finite check must come before any update
        if check_finite and not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss ({value})")
        with part("student_forward_backward"):
            acc.backward(loss)
        with part("optimizer"):
            if acc.sync_gradients:
                acc.clip_grad_norm_(st.student.parameters(), cfg.max_grad_norm)
            st.optimizer.step()
            st.lr_scheduler.step()
            st.optimizer.zero_grad(set_to_none=True)
    # 14. target ← μ·target + (1 − μ)·student, after each optimizer step (LoRA: the target is the student)
    if acc.sync_gradients and st.target is not None:
        with part("ema"), torch.no_grad():
            ema_update(st.target.parameters(), st.unwrap.parameters(), cfg.ema_decay)
    return value
