"""Guided DDIM solver step (DESIGN.md "The LCD step", steps 7, 9 and 10), one kernel, no gradient.

From the teacher's output over the 2B batch (conditional rows first, then unconditional), the noisy latents z and
per-sample α, σ, ᾱ_prev, w: x̂0 and ε̂ of both halves, the guided x̂0 = x̂0_c + w(x̂0_c − x̂0_∅) and
ε̂ = ε̂_c + w(ε̂_c − ε̂_∅), and z_s = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε̂. The kernel reads each of the three inputs once
and writes z_s once; the torch composition materializes about ten intermediates.
"""

from __future__ import annotations

import torch

from fastlcm.lcd import math as lcd_math

from .dispatch import (
    BLOCK,
    check_latents,
    check_per_sample_scalars,
    check_same_device,
    empty_like_layout,
    launch_options,
    per_sample_layout,
    prediction_code,
    select_backend,
    tl,
    triton_kernel,
)


def _check(teacher_out, z, alpha, sigma, alpha_prev_cumprod, w, prediction_type):
    check_latents("teacher_out", teacher_out)
    check_latents("z", z)
    if teacher_out.shape[0] != 2 * z.shape[0] or teacher_out.shape[1:] != z.shape[1:]:
        raise ValueError(
            "teacher_out must be [2B, ...] (conditional rows, then unconditional) for z of shape [B, ...]; "
            f"got teacher_out {tuple(teacher_out.shape)} and z {tuple(z.shape)}"
        )
    check_same_device(teacher_out=teacher_out, z=z)
    prediction_code(prediction_type)
    return check_per_sample_scalars(z, alpha=alpha, sigma=sigma, alpha_prev_cumprod=alpha_prev_cumprod, w=w)


@torch.no_grad()
def solver_step_reference(teacher_out, z, alpha, sigma, alpha_prev_cumprod, w, prediction_type: str) -> torch.Tensor:
    """The torch reference: predicted_x0/predicted_eps of both halves → guided → ddim_step, in fp32."""
    alpha, sigma, alpha_prev, w = (
        v.float() for v in _check(teacher_out, z, alpha, sigma, alpha_prev_cumprod, w, prediction_type)
    )
    out_dtype = torch.promote_types(teacher_out.dtype, z.dtype)
    cond, uncond = teacher_out.float().chunk(2)
    zf = z.float()
    x0 = lcd_math.guided(
        lcd_math.predicted_x0(cond, zf, alpha, sigma, prediction_type),
        lcd_math.predicted_x0(uncond, zf, alpha, sigma, prediction_type),
        w,
    )
    eps = lcd_math.guided(
        lcd_math.predicted_eps(cond, zf, alpha, sigma, prediction_type),
        lcd_math.predicted_eps(uncond, zf, alpha, sigma, prediction_type),
        w,
    )
    return lcd_math.ddim_step(x0, eps, alpha_prev).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------------


@triton_kernel
def _solver_kernel(
    t_ptr, z_ptr, out_ptr, alpha_ptr, sigma_ptr, aprev_ptr, w_ptr, n, batch,
    PRED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    base_u = (b + batch).to(tl.int64) * n
    a = tl.load(alpha_ptr + b).to(tl.float32)
    s = tl.load(sigma_ptr + b).to(tl.float32)
    a_prev = tl.load(aprev_ptr + b).to(tl.float32)
    w = tl.load(w_ptr + b).to(tl.float32)
    mc = tl.load(t_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(t_ptr + base_u + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:  # epsilon
        x0_c = tl.div_rn(z - s * mc, a)
        x0_u = tl.div_rn(z - s * mu, a)
        eps_c = mc
        eps_u = mu
    elif PRED == 1:  # v_prediction
        x0_c = a * z - s * mc
        x0_u = a * z - s * mu
        eps_c = a * mc + s * z
        eps_u = a * mu + s * z
    else:  # sample
        x0_c = mc
        x0_u = mu
        eps_c = tl.div_rn(z - a * mc, s)
        eps_u = tl.div_rn(z - a * mu, s)
    x0 = x0_c + w * (x0_c - x0_u)
    eps = eps_c + w * (eps_c - eps_u)
    z_s = tl.sqrt_rn(a_prev) * x0 + tl.sqrt_rn(1.0 - a_prev) * eps
    tl.store(out_ptr + base + offs, z_s.to(out_ptr.dtype.element_ty), mask=mask)


def solver_step(
    teacher_out: torch.Tensor,
    z: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_prev_cumprod: torch.Tensor,
    w: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """z_s from the teacher's [2B] output (cond rows, then uncond), z [B] and per-sample α, σ, ᾱ_prev, w. No grad.

    Computes in fp32; returns ``promote_types(teacher_out.dtype, z.dtype)``.
    """
    if select_backend(teacher_out, z) == "torch":
        return solver_step_reference(teacher_out, z, alpha, sigma, alpha_prev_cumprod, w, prediction_type)
    alpha, sigma, alpha_prev, w = _check(teacher_out, z, alpha, sigma, alpha_prev_cumprod, w, prediction_type)
    teacher_out, z = per_sample_layout(teacher_out.detach(), z.detach())
    out = empty_like_layout(z, torch.promote_types(teacher_out.dtype, z.dtype))
    batch = z.shape[0]
    n = z.numel() // batch
    _solver_kernel[((n + BLOCK - 1) // BLOCK, batch)](
        teacher_out, z, out, alpha, sigma, alpha_prev, w, n, batch,
        PRED=prediction_code(prediction_type), BLOCK=BLOCK, device=z.device, **launch_options(z.device),
    )  # fmt: skip
    return out


__all__ = ["solver_step", "solver_step_reference"]
