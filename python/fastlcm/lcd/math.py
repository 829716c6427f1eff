"""The LCD math of DESIGN.md ("The LCD step"), as pure torch functions.

Numbers in comments refer to the numbered steps of that section. Per-sample scalars (t, s, w, α, σ, c_skip,
c_out) are 1-D tensors of length B; :func:`per_sample` broadcasts them over a [B, C, H, W] latent.
Nothing here holds state; the trainer and the kernels' torch references compose these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_DATA = 0.5
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def per_sample(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a length-B vector as [B, 1, …, 1] with ``ndim`` dimensions for broadcasting."""
    return x.reshape(x.shape[0], *([1] * (ndim - 1)))


@dataclass(frozen=True)
class SolverGrid:
    """The teacher's schedule and the DDIM solver grid (DESIGN.md, header of "The LCD step").

    ``alpha_cumprod`` is the teacher's ᾱ over its T train timesteps; the grid has N points τ_i = (i+1)·k − 1
    with k = T // N, and ᾱ_prev(i) = ᾱ[τ_{i−1}] (ᾱ[0] for i = 0).
    """

    alpha_cumprod: torch.Tensor  # [T], float64 on the trainer's device
    timesteps: torch.Tensor  # [N] long: τ_i
    alpha_cumprod_prev: torch.Tensor  # [N]: ᾱ_prev(i)
    step: int  # k

    @classmethod
    def build(cls, alpha_cumprod: torch.Tensor, num_ddim_timesteps: int = 50) -> "SolverGrid":
        total = alpha_cumprod.shape[0]
        if not 1 <= num_ddim_timesteps <= total:
            raise ValueError(f"num_ddim_timesteps must be in 1..{total}, got {num_ddim_timesteps}")
        k = total // num_ddim_timesteps
        taus = torch.arange(1, num_ddim_timesteps + 1, device=alpha_cumprod.device) * k - 1
        prev = torch.cat([alpha_cumprod[:1], alpha_cumprod[taus[:-1]]])
        return cls(alpha_cumprod=alpha_cumprod, timesteps=taus, alpha_cumprod_prev=prev, step=k)

    def to(self, device) -> "SolverGrid":
        return SolverGrid(
            self.alpha_cumprod.to(device), self.timesteps.to(device), self.alpha_cumprod_prev.to(device), self.step
        )

    def t_and_s(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: t = τ_i and s = max(t − k, 0) for grid indices i."""
        t = self.timesteps[index]
        return t, (t - self.step).clamp_min(0)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) for integer timesteps t (float64 → caller casts)."""
        a = self.alpha_cumprod[t]
        return a.sqrt(), (1 - a).sqrt()


def guidance_embedding(w: torch.Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Step 5: e(w) = [sin(1000·w·f_j), cos(1000·w·f_j)], f_j = exp(−ln(10⁴)·j/(d/2 − 1)), j < d/2. → [B, d]."""
    if dim % 2 or dim < 4:
        raise ValueError(f"guidance embedding dim must be even and >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=w.device, dtype=torch.float32) / (half - 1))
    arg = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).to(dtype)


def boundary_scalings(
    t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6: c_skip(u) = σ_d²/((λu)² + σ_d²), c_out(u) = λu/√((λu)² + σ_d²)."""
    u = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def predicted_x0(
    model_output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Step 7: x̂0 from a model output m at a time with per-sample α, σ (vectors of length B)."""
    a, s = per_sample(alpha, z.ndim), per_sample(sigma, z.ndim)
    if prediction_type == "epsilon":
        return (z - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * z - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predicted_eps(
    model_output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Step 7: ε̂ from a model output m at a time with per-sample α, σ."""
    a, s = per_sample(alpha, z.ndim), per_sample(sigma, z.ndim)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a * model_output + s * z
    if prediction_type == "sample":
        return (z - a * model_output) / s
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def consistency_output(
    z: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor
) -> torch.Tensor:
    """Steps 8 and 11: f = c_skip·z + c_out·x̂0 (per-sample scalings)."""
    return per_sample(c_skip, z.ndim).to(z.dtype) * z + per_sample(c_out, z.ndim).to(x0.dtype) * x0


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Step 9: x_c + w·(x_c − x_∅) with per-sample w."""
    return cond + per_sample(w, cond.ndim).to(cond.dtype) * (cond - uncond)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod_prev: torch.Tensor) -> torch.Tensor:
    """Step 10: z_s = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε̂."""
    a = per_sample(alpha_cumprod_prev, x0.ndim)
    return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber", huber_c: float = 0.001):
    """Step 12: L2 = mean((p − q)²); pseudo-Huber = mean(√((p − q)² + c²) − c). Computed in fp32."""
    d = pred.float() - target.float()
    if loss_type == "l2":
        return (d * d).mean()
    if loss_type == "huber":
        return (torch.sqrt(d * d + huber_c**2) - huber_c).mean()
    raise ValueError(f"loss_type must be 'l2' or 'huber', got {loss_type!r}")


@torch.no_grad()
def ema_update(target_params, online_params, decay: float) -> None:
    """Step 14: target ← μ·target + (1 − μ)·online, in place (foreach when possible)."""
    target_params, online_params = list(target_params), list(online_params)
    src = [p.detach().to(t.dtype) for t, p in zip(target_params, online_params)]
    torch._foreach_lerp_(target_params, src, 1.0 - decay)
