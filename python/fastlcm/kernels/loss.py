"""Consistency loss (DESIGN.md "The LCD step", step 12): L2 or pseudo-Huber, forward and backward fused.

Triton path, one pass over ``pred`` and ``target``: each program loads a block of both, accumulates its share of
the loss in fp32 (already divided by N) into its own slot of a partials vector and, when ``pred`` needs a
gradient, writes ∂loss/∂pred for its block. The loss is
the sum of the partials (a fixed-order reduction: deterministic, no atomics). Backward hands on that gradient
times the incoming scalar gradient g (read on the device, no host sync):

* fp32 and bf16 (the gradient is kept in ``pred``'s dtype): scaled in place by a kernel whose programs return at
  once when g is exactly 1 — one loss, no accumulation divisor, no fp16 loss scale, the trainer's usual case — so
  the backward then moves no data. bf16 has fp32's exponent range: scaling by a power of two (a loss scale,
  1/accumulation steps) is exact, other factors add at most one rounding.
* fp16: the gradient is kept in fp32 (fp16's range would flush 2(p−q)/N to zero for a large N before the loss
  scale is applied) and one pass writes g·gradient in fp16.

A second backward through the same graph (``retain_graph=True``) recomputes the gradient from the saved inputs.
Traffic per element for bf16: forward reads 4 bytes and writes 2; backward nothing when g = 1, else reads 2 and
writes 2.

Layout: ``pred`` and ``target`` with the same dense strides (contiguous, channels_last, any permutation) are read in
place as flat arrays and the gradient gets the same strides; anything else is first made contiguous (a copy).
"""

from __future__ import annotations

import torch

from fastlcm.lcd import math as lcd_math

from .dispatch import (
    check_latents,
    check_same_device,
    empty_like_layout,
    flat_layout,
    launch_options,
    select_backend,
    sum_combine,
    tl,
    triton_kernel,
)

LOSS_TYPES = ("l2", "huber")
LOSS_BLOCK = 2048
"""Elements per program of the loss kernel; ``numel / LOSS_BLOCK`` partial sums are reduced afterwards."""


def _check(pred, target, loss_type: str, huber_c: float) -> None:
    check_latents("pred", pred)
    check_latents("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    check_same_device(pred=pred, target=target)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be 'l2' or 'huber', got {loss_type!r}")
    if loss_type == "huber" and not huber_c > 0:
        raise ValueError(f"huber_c must be > 0 for the pseudo-Huber loss, got {huber_c!r}")


def consistency_loss_reference(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber", huber_c: float = 0.001
) -> torch.Tensor:
    """The torch reference: :func:`fastlcm.lcd.math.consistency_loss` with ``target`` treated as a constant."""
    _check(pred, target, loss_type, huber_c)
    return lcd_math.consistency_loss(pred, target.detach(), loss_type=loss_type, huber_c=huber_c)


# ---------------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------------


@triton_kernel
def _loss_fwd_kernel(
    p_ptr, q_ptr, partial_ptr, grad_ptr, n, inv_n, c,
    HUBER: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = p - q
    if HUBER:
        r = tl.sqrt_rn(d * d + c * c)
        val = r - c
        grad = tl.div_rn(d, r)
    else:
        val = d * d
        grad = 2.0 * d
    val = tl.where(mask, val, 0.0)
    tl.store(partial_ptr + pid, tl.reduce(val, 0, sum_combine) * inv_n)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, (grad * inv_n).to(grad_ptr.dtype.element_ty), mask=mask)


@triton_kernel
def _scale_inplace_kernel(grad_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(scale_ptr).to(tl.float32)
    if g != 1.0:  # exactly 1: the saved gradient already is the answer, nothing is read or written
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        tl.store(grad_ptr + offs, (x * g).to(grad_ptr.dtype.element_ty), mask=mask)


@triton_kernel
def _scale_kernel(src_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(scale_ptr).to(tl.float32)
    x = tl.load(src_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (x * g).to(out_ptr.dtype.element_ty), mask=mask)


def _loss_forward_triton(pred, target, loss_type: str, huber_c: float, write_grad: bool):
    """Returns (loss, grad or None): ∂loss/∂pred (dtype per :func:`_saved_grad_dtype`) in ``pred``'s layout."""
    pred, target = flat_layout(pred, target)
    n = pred.numel()
    grid = (-(-n // LOSS_BLOCK),)  # ceil division (triton.cdiv is a jit function: slow to call from the host)
    partials = torch.empty(grid[0], device=pred.device, dtype=torch.float32)
    grad = empty_like_layout(pred, _saved_grad_dtype(pred.dtype)) if write_grad else partials  # unused if not writing
    _loss_fwd_kernel[grid](
        pred, target, partials, grad, n, 1.0 / n, float(huber_c),
        HUBER=loss_type == "huber", WRITE_GRAD=write_grad, BLOCK=LOSS_BLOCK,
        device=pred.device, **launch_options(pred.device),
    )  # fmt: skip
    return partials.sum(), (grad if write_grad else None)


def _saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _scale_triton(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale · grad`` in ``dtype``: in place when ``grad`` already has that dtype (no traffic if scale is 1)."""
    n = grad.numel()
    scale = scale.detach().reshape(1).contiguous()
    grid = (-(-n // 1024),)
    if grad.dtype == dtype:
        _scale_inplace_kernel[grid](grad, scale, n, BLOCK=1024, device=grad.device, **launch_options(grad.device))
        return grad
    out = empty_like_layout(grad, dtype)
    _scale_kernel[grid](grad, scale, out, n, BLOCK=1024, device=grad.device, **launch_options(grad.device))
    return out


class _ConsistencyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, loss_type, huber_c):
        loss, grad = _loss_forward_triton(pred, target, loss_type, huber_c, write_grad=True)
        ctx.save_for_backward(pred, target)
        # Not a saved tensor: the first backward scales it in place and hands it on as ∂/∂pred (autograd may make
        # it pred.grad), so the node keeps no reference to it afterwards.
        ctx.grad, ctx.args, ctx.pred_dtype = grad, (loss_type, huber_c), pred.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through a retained graph: the first one consumed the gradient
            pred, target = ctx.saved_tensors
            _, grad = _loss_forward_triton(pred, target, *ctx.args, write_grad=True)
        return _scale_triton(grad, grad_loss, ctx.pred_dtype), None, None, None


def consistency_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber", huber_c: float = 0.001
) -> torch.Tensor:
    """Step 12: ``mean((p-q)^2)`` (``l2``) or ``mean(sqrt((p-q)^2 + c^2) - c)`` (``huber``) as a 0-dim fp32 tensor.

    Accumulates in fp32 for every input dtype; autograd flows to ``pred`` only (``target`` is a constant).
    """
    _check(pred, target, loss_type, huber_c)
    if select_backend(pred, target) == "torch":
        return consistency_loss_reference(pred, target, loss_type, huber_c)
    target = target.detach()
    if torch.is_grad_enabled() and pred.requires_grad:
        return _ConsistencyLoss.apply(pred, target, loss_type, float(huber_c))
    loss, _ = _loss_forward_triton(pred.detach(), target, loss_type, huber_c, write_grad=False)
    return loss


__all__ = ["consistency_loss", "consistency_loss_reference", "LOSS_TYPES"]
