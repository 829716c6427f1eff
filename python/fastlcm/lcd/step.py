"""The LCD step of DESIGN.md ("The LCD step"), as one function that reads like the numbered algorithm.

:func:`lcd_step` takes a batch of images (or, with ``pixels=None``, a batch of cached VAE posteriors and text
embeddings from ``fastlcm precompute``) and captions and returns the consistency loss (steps 1–12); the trainer
does the backward, clipping, optimizer and EMA (steps 13–14). Family-specific pieces (how captions become
conditioning, extra UNet inputs) live behind :class:`TextConditioner`; randomness behind :class:`Draws`, so tests
can feed fixed tensors and checkpoints can save the generator state.

The elementwise arithmetic (solver, boundary outputs, loss) runs through ``fastlcm.kernels``: Triton on CUDA, and
on CPU the kernels' torch references, which compose :mod:`fastlcm.lcd.math`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from fastlcm.kernels import boundary_output, consistency_loss, solver_step
from fastlcm.lcd import math as lcm


# ----------------------------------------------------------------------------------------------------------------
# What the step consumes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """UNet conditioning for a batch: text embeddings, plus added conditioning for families that use it."""

    prompt_embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def cat(self, other: "Conditioning") -> "Conditioning":
        added = None if self.added is None else {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.prompt_embeds, other.prompt_embeds]), added)

    def to(self, dtype: torch.dtype) -> "Conditioning":
        added = None if self.added is None else {k: v.to(dtype) for k, v in self.added.items()}
        return Conditioning(self.prompt_embeds.to(dtype), added)

    def unet_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.added is not None:
            kw["added_cond_kwargs"] = self.added
        return kw


class TextConditioner(Protocol):
    """Turns captions into :class:`Conditioning` (SD: one CLIP encoder; SDXL adds a second and time ids)."""

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning: ...

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning: ...


class Draws(Protocol):
    """The step's randomness, in the order the step asks for it."""

    def latent_noise(self, shape: torch.Size) -> torch.Tensor: ...  # step 1: VAE posterior sample

    def grid_index(self, batch_size: int, n: int) -> torch.Tensor: ...  # step 3: i ~ U{0..N-1}

    def noise(self, shape: torch.Size) -> torch.Tensor: ...  # step 4: ε ~ N(0, I)

    def guidance(self, batch_size: int, w_min: float, w_max: float) -> torch.Tensor: ...  # step 5: w ~ U[w_min, w_max]


class TorchDraws:
    """:class:`Draws` from one seeded ``torch.Generator`` on the training device (state saved in checkpoints)."""

    def __init__(self, device: torch.device | str, seed: int):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def latent_noise(self, shape):
        return torch.randn(shape, generator=self.generator, device=self.device)

    def grid_index(self, batch_size, n):
        return torch.randint(0, n, (batch_size,), generator=self.generator, device=self.device)

    def noise(self, shape):
        return torch.randn(shape, generator=self.generator, device=self.device)

    def guidance(self, batch_size, w_min, w_max):
        return torch.rand(batch_size, generator=self.generator, device=self.device) * (w_max - w_min) + w_min

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class LCDModels:
    """The networks of one LCD step. ``student`` trains; the rest are used without gradients.

    Full distillation: teacher = the teacher UNet, target = the EMA copy. LCM-LoRA: student = teacher UNet +
    adapters, teacher = the same UNet with adapters disabled, target = the student itself (run without grad).
    """

    vae: torch.nn.Module
    text: TextConditioner
    student: Callable
    teacher: Callable
    target: Callable
    prediction_type: str
    scaling_factor: float
    teacher_dtype: torch.dtype = torch.float32
    autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    """Context for the no-grad teacher and target forwards (the student is autocast by Accelerate)."""


@dataclass(frozen=True)
class LCDSettings:
    w_min: float = 5.0
    w_max: float = 15.0
    guidance_dim: int = 256  # d of e(w); 0 = the student and target take no w input (LCM-LoRA)
    timestep_scaling: float = 10.0
    loss_type: str = "l2"
    huber_c: float = 0.001
    vae_encode_batch_size: int = 32
    teacher_cfg_batched: bool = True
    """Step 9 as one teacher forward over [c; c∅] at 2B (fastlcm's default). False: two B forwards, conditional
    then unconditional, as diffusers' script does: the same math, kept for `fastlcm bench step`'s lever ablation."""


@dataclass
class StepOutput:
    loss: torch.Tensor
    index: torch.Tensor
    w: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, chunk: int, scaling_factor: float, draws: Draws) -> torch.Tensor:
    """Step 1: z0 = VAE.encode(x).sample() · scaling_factor, in chunks of ``chunk`` images; fp32 result."""
    dtype = next(vae.parameters()).dtype
    out = []
    for part in pixels.split(chunk):
        dist = vae.encode(part.to(dtype)).latent_dist
        out.append((dist.mean + dist.std * draws.latent_noise(dist.mean.shape).to(dist.mean.dtype)).float())
    return torch.cat(out) * scaling_factor


@torch.no_grad()
def sample_latents(mean: torch.Tensor, std: torch.Tensor, chunk: int, scaling_factor: float, draws: Draws) -> torch.Tensor:
    """Step 1 from a cached posterior: z0 = (mean + std·noise)·scaling_factor, drawn in the same chunks as
    :func:`encode_latents`, so the same draws give the same z0 as encoding the same crop; fp32 result."""
    out = []
    for m, s in zip(mean.split(chunk), std.split(chunk)):
        out.append((m + s * draws.latent_noise(m.shape).to(m.dtype)).float())
    return torch.cat(out) * scaling_factor


def lcd_step(
    pixels: torch.Tensor | None,
    captions: Sequence[str],
    models: LCDModels,
    grid: lcm.SolverGrid,
    settings: LCDSettings,
    draws: Draws,
    batch: Any = None,
) -> StepOutput:
    """Steps 1–12 of the LCD algorithm for one batch; returns the loss (fp32 scalar, grad w.r.t. the student).

    ``pixels=None``: cached latents — ``batch`` carries ``latent_mean`` / ``latent_std`` (the unscaled VAE
    posterior, on the device) and ``models.text`` reads its cached embeddings (models.PrecomputedConditioner).
    """
    B, ptype, s_ = len(captions) if pixels is None else pixels.shape[0], models.prediction_type, settings

    # 1. z0 = VAE.encode(x).sample() · scaling_factor (or the cached posterior, sampled with the same draw)
    if pixels is None:
        z0 = sample_latents(batch.latent_mean, batch.latent_std, s_.vae_encode_batch_size, models.scaling_factor, draws)
    else:
        z0 = encode_latents(models.vae, pixels, s_.vae_encode_batch_size, models.scaling_factor, draws)
    nd = z0.ndim

    # 2. c = text embedding of the captions; c∅ = the unconditional embedding
    with torch.no_grad():
        c = models.text.encode(captions, batch).to(torch.float32)
        c_null = models.text.unconditional(B, batch).to(torch.float32)

    # 3. i ~ U{0..N-1}; t = τ_i; s = max(t − k, 0)
    index = draws.grid_index(B, grid.timesteps.shape[0]).to(grid.timesteps.device)
    t, s = grid.t_and_s(index)

    # 4. ε ~ N(0, I); z_t = α_t z0 + σ_t ε
    noise = draws.noise(z0.shape).to(z0.dtype)
    alpha_t, sigma_t = (v.float() for v in grid.alpha_sigma(t))
    z_t = lcm.per_sample(alpha_t, nd) * z0 + lcm.per_sample(sigma_t, nd) * noise

    # 5. w ~ U[w_min, w_max]; e(w) = guidance embedding of dimension d (none for LCM-LoRA: d = 0, only the
    #    teacher's guidance uses w)
    w = draws.guidance(B, s_.w_min, s_.w_max).float()
    w_emb = lcm.guidance_embedding(w, s_.guidance_dim) if s_.guidance_dim else None

    # 6. boundary scalings at t (student) and s (target)
    c_skip_t, c_out_t = (v.float() for v in lcm.boundary_scalings(t, s_.timestep_scaling))
    c_skip_s, c_out_s = (v.float() for v in lcm.boundary_scalings(s, s_.timestep_scaling))

    # 8. student: f_θ = c_skip(t)·z_t + c_out(t)·x̂0(student(z_t, t, c, e(w)))
    student_out = models.student(z_t, t, timestep_cond=w_emb, **c.unet_kwargs()).sample
    f_theta = boundary_output(student_out, z_t, alpha_t, sigma_t, c_skip_t, c_out_t, ptype)

    with torch.no_grad():
        # 9. teacher: one forward over [c; c∅] at 2B (or two at B), guided x̂0 and ε̂
        td = models.teacher_dtype
        with models.autocast():
            if s_.teacher_cfg_batched:
                teacher_out = models.teacher(
                    torch.cat([z_t, z_t]).to(td), torch.cat([t, t]), **c.cat(c_null).to(td).unet_kwargs()
                ).sample
            else:
                z_td = z_t.to(td)
                teacher_out = torch.cat([models.teacher(z_td, t, **cond.to(td).unet_kwargs()).sample
                                         for cond in (c, c_null)])  # fmt: skip
        # 10. DDIM step: z_s = √ᾱ_prev(i)·x̂0 + √(1 − ᾱ_prev(i))·ε̂
        alpha_prev = grid.alpha_cumprod_prev[index].float()
        z_s = solver_step(teacher_out, z_t, alpha_t, sigma_t, alpha_prev, w, ptype)

        # 11. target: f⁻ = c_skip(s)·z_s + c_out(s)·x̂0(target(z_s, s, c, e(w)))
        alpha_s, sigma_s = (v.float() for v in grid.alpha_sigma(s))
        with models.autocast():
            target_out = models.target(z_s, s, timestep_cond=w_emb, **c.unet_kwargs()).sample
        f_target = boundary_output(target_out, z_s, alpha_s, sigma_s, c_skip_s, c_out_s, ptype)

    # 12. loss: L2 or pseudo-Huber between f_θ and f⁻
    loss = consistency_loss(f_theta, f_target.detach(), s_.loss_type, s_.huber_c)
    return StepOutput(loss=loss, index=index, w=w)
