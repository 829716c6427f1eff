"""Boundary-condition output f = c_skip·z + c_out·x̂0(m, z) (DESIGN.md "The LCD step", steps 7, 8 and 11).

Used for the student f_θ (gradient flows to the model output ``m``) and the target f⁻ (no grad). Forward is one
kernel over (m, z) → f; since f is linear in m, backward is one kernel writing ∂f/∂m·g = k_b·g with the per-sample
constant k_b = c_out·∂x̂0/∂m (−σ/α for epsilon, −σ for v, 1 for sample). ``z`` and the per-sample scalars are
constants for autograd (the noisy latents and the schedule).

Layout: the grid is (blocks within a sample, sample), so per-sample scalars are loaded once per program. Inputs
sharing a batch-outermost dense layout (contiguous, channels_last) are read in place; others are copied once.
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


def _check(model_out, z, alpha, sigma, c_skip, c_out, prediction_type):
    check_latents("model_out", model_out)
    check_latents("z", z)
    if model_out.shape != z.shape:
        raise ValueError(f"model_out and z must have the same shape, got {tuple(model_out.shape)} and {tuple(z.shape)}")
    check_same_device(model_out=model_out, z=z)
    prediction_code(prediction_type)
    return check_per_sample_scalars(z, alpha=alpha, sigma=sigma, c_skip=c_skip, c_out=c_out)


def boundary_output_reference(model_out, z, alpha, sigma, c_skip, c_out, prediction_type: str) -> torch.Tensor:
    """The torch reference: ``consistency_output(z, predicted_x0(m, z, α, σ), c_skip, c_out)`` in fp32."""
    alpha, sigma, c_skip, c_out = _check(model_out, z, alpha, sigma, c_skip, c_out, prediction_type)
    out_dtype = torch.promote_types(model_out.dtype, z.dtype)
    zf = z.detach().float()
    x0 = lcd_math.predicted_x0(model_out.float(), zf, alpha.float(), sigma.float(), prediction_type)
    return lcd_math.consistency_output(zf, x0, c_skip.float(), c_out.float()).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------------


@triton_kernel
def _boundary_fwd_kernel(
    m_ptr, z_ptr, out_ptr, alpha_ptr, sigma_ptr, cskip_ptr, cout_ptr, n,
    PRED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    a = tl.load(alpha_ptr + b).to(tl.float32)
    s = tl.load(sigma_ptr + b).to(tl.float32)
    c_skip = tl.load(cskip_ptr + b).to(tl.float32)
    c_out = tl.load(cout_ptr + b).to(tl.float32)
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:
        x0 = tl.div_rn(z - s * m, a)
    elif PRED == 1:
        x0 = a * z - s * m
    else:
        x0 = m
    f = c_skip * z + c_out * x0
    tl.store(out_ptr + base + offs, f.to(out_ptr.dtype.element_ty), mask=mask)


@triton_kernel
def _boundary_bwd_kernel(
    g_ptr, out_ptr, alpha_ptr, sigma_ptr, cout_ptr, n,
    PRED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    c_out = tl.load(cout_ptr + b).to(tl.float32)
    if PRED == 0:
        k = -c_out * tl.div_rn(tl.load(sigma_ptr + b).to(tl.float32), tl.load(alpha_ptr + b).to(tl.float32))
    elif PRED == 1:
        k = -c_out * tl.load(sigma_ptr + b).to(tl.float32)
    else:
        k = c_out
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + offs, (k * g).to(out_ptr.dtype.element_ty), mask=mask)


def _grid(x: torch.Tensor):
    n = x.numel() // x.shape[0]
    return ((n + BLOCK - 1) // BLOCK, x.shape[0]), n


def _forward_triton(model_out, z, alpha, sigma, c_skip, c_out, code: int) -> torch.Tensor:
    model_out, z = per_sample_layout(model_out, z)
    out = empty_like_layout(model_out, torch.promote_types(model_out.dtype, z.dtype))
    grid, n = _grid(z)
    _boundary_fwd_kernel[grid](
        model_out, z, out, alpha, sigma, c_skip, c_out, n, PRED=code, BLOCK=BLOCK,
        device=z.device, **launch_options(z.device),
    )  # fmt: skip
    return out


class _BoundaryOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, model_out, z, alpha, sigma, c_skip, c_out, code):
        ctx.save_for_backward(alpha, sigma, c_out)
        ctx.code, ctx.m_dtype = code, model_out.dtype
        return _forward_triton(model_out, z, alpha, sigma, c_skip, c_out, code)

    @staticmethod
    def backward(ctx, grad_f):
        alpha, sigma, c_out = ctx.saved_tensors
        (grad_f,) = per_sample_layout(grad_f)
        grad_m = empty_like_layout(grad_f, ctx.m_dtype)
        grid, n = _grid(grad_f)
        _boundary_bwd_kernel[grid](
            grad_f, grad_m, alpha, sigma, c_out, n, PRED=ctx.code, BLOCK=BLOCK,
            device=grad_f.device, **launch_options(grad_f.device),
        )  # fmt: skip
        return grad_m, None, None, None, None, None, None


def boundary_output(
    model_out: torch.Tensor,
    z: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """f = c_skip·z + c_out·x̂0(model_out, z, α, σ) with per-sample α, σ, c_skip, c_out (1-D, length B).

    Computes in fp32; returns ``promote_types(model_out.dtype, z.dtype)``. Autograd flows to ``model_out`` only.
    """
    if select_backend(model_out, z) == "torch":
        return boundary_output_reference(model_out, z, alpha, sigma, c_skip, c_out, prediction_type)
    alpha, sigma, c_skip, c_out = _check(model_out, z, alpha, sigma, c_skip, c_out, prediction_type)
    code = prediction_code(prediction_type)
    z = z.detach()
    if torch.is_grad_enabled() and model_out.requires_grad:
        return _BoundaryOutput.apply(model_out, z, alpha, sigma, c_skip, c_out, code)
    return _forward_triton(model_out.detach(), z, alpha, sigma, c_skip, c_out, code)


__all__ = ["boundary_output", "boundary_output_reference"]
