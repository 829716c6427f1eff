"""Tolerance checks that say *where* two tensors disagree (used by the kernel tests and ``fastlcm bench kernels``)."""

from __future__ import annotations

import torch

TOLERANCES = {
    # (rtol, atol) for outputs stored in that dtype. Both paths compute in fp32; bf16/fp16 outputs may differ by
    # a rounding step (the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest), so the
    # relative tolerance is two units in the last place of the output dtype.
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2.0**-6, 1e-5),
    torch.float16: (2.0**-9, 1e-6),
}


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> str | None:
    """``None`` when ``|actual − expected| <= atol + rtol·(|expected| + max|expected|)`` everywhere (NaNs must
    match), else a report naming the first bad element and the worst absolute and relative errors.

    The ``rtol·max|expected|`` term admits rounding at the scale of the largest values, which elements near zero
    inherit from sums with cancellation (guidance, x̂0 = (z − σm)/α) and from FMA contraction on the GPU; a wrong
    index, scalar or formula is off by far more.
    """
    if actual.shape != expected.shape:
        return f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = e[e.isfinite()]
    atol = atol + rtol * (float(finite.abs().max()) if finite.numel() else 0.0)
    err = (a - e).abs()
    nan_a, nan_e = a.isnan(), e.isnan()
    bad = (err > atol + rtol * e.abs()) | (nan_a != nan_e) | (err.isnan() & ~(nan_a & nan_e))
    if not bool(bad.any()):
        return None
    err = torch.where(nan_a & nan_e, torch.zeros_like(err), err).nan_to_num(nan=float("inf"))
    rel = err / e.abs().clamp_min(1e-30)

    def at(flat_index: int) -> str:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), a.shape)) if a.ndim else ()
        got, want = a.reshape(-1)[flat_index].item(), e.reshape(-1)[flat_index].item()
        return f"index {idx}: actual {got:.9g}, expected {want:.9g}"

    first = int(bad.reshape(-1).nonzero()[0, 0])
    worst_abs = int(err.reshape(-1).argmax())
    worst_rel = int(torch.where(bad, rel, torch.zeros_like(rel)).reshape(-1).argmax())
    return (
        f"{int(bad.sum())} of {bad.numel()} elements outside atol={atol:g}, rtol={rtol:g}; "
        f"first at {at(first)}; max abs error {err.reshape(-1)[worst_abs].item():.3g} at {at(worst_abs)}; "
        f"max rel error {rel.reshape(-1)[worst_rel].item():.3g} at {at(worst_rel)}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = ""):
    """Assert within the tolerance of ``dtype`` (default ``actual.dtype``); the message locates the mismatch."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    report = mismatch_report(actual, expected, rtol, atol)
    if report is not None:
        raise AssertionError(f"{what + ': ' if what else ''}{report}")
