"""fastlcm.kernels: every Triton kernel against its torch reference (a composition of fastlcm.lcd.math).

CPU tier: the kernels run under the Triton interpreter (FASTLCM_KERNELS=triton on CPU tensors). No global
TRITON_INTERPRET is needed: fastlcm.kernels.dispatch builds the interpreted variant of a kernel for CPU tensors
itself, so these tests share the process with the other test files without changing how they import Triton.
The ``cuda`` parameters (marker ``gpu``) run the same checks on the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from fastlcm.kernels import (
    KERNELS_ENV,
    boundary_output,
    boundary_output_reference,
    consistency_loss,
    consistency_loss_reference,
    kernel_mode,
    select_backend,
    solver_step,
    solver_step_reference,
)
from fastlcm.kernels import dispatch
from fastlcm.kernels.compare import assert_close, mismatch_report
from fastlcm.lcd import math as lcd_math

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 4, 37, 41), (1, 4, 8, 8), (2, 7)]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
W_MIN, W_MAX = 3.0, 15.0


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv(KERNELS_ENV, "triton")
    return torch.device(request.param)


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches by kernel name."""
    counts: dict[str, int] = {}
    original = dispatch.TritonKernel.__getitem__

    def counting(self, grid):
        counts[self.__name__] = counts.get(self.__name__, 0) + 1
        return original(self, grid)

    monkeypatch.setattr(dispatch.TritonKernel, "__getitem__", counting)
    return counts


def schedule(device) -> lcd_math.SolverGrid:
    """The SD teacher schedule (scaled_linear betas 0.00085..0.012, T=1000) on a 50-point DDIM grid."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return lcd_math.SolverGrid.build(torch.cumprod(1 - betas, 0), 50).to(device)


def per_sample_inputs(batch: int, device, seed: int = 0):
    """(α_t, σ_t, c_skip(t), c_out(t), ᾱ_prev, w) at grid indices covering both ends (t=19 → s=0, t=999)."""
    grid = schedule(device)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 50, (batch,), generator=gen)
    index[0] = 0
    if batch > 1:
        index[-1] = 49
    index = index.to(device)
    t, s = grid.t_and_s(index)
    alpha, sigma = grid.alpha_sigma(t)
    c_skip, c_out = lcd_math.boundary_scalings(s)  # s = 0 for index 0: c_skip = 1, c_out = 0
    w = torch.rand(batch, generator=gen, dtype=torch.float64) * (W_MAX - W_MIN) + W_MIN
    w[0] = W_MIN
    if batch > 1:
        w[-1] = W_MAX
    f32 = lambda v: v.to(device=device, dtype=torch.float32)  # noqa: E731
    return f32(alpha), f32(sigma), f32(c_skip), f32(c_out), f32(grid.alpha_cumprod_prev[index]), f32(w)


def randn(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_env_modes(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert kernel_mode() == "auto" and select_backend(x) == "torch"  # auto: torch for CPU tensors
    monkeypatch.setenv(KERNELS_ENV, " Triton ")
    assert select_backend(x) == "triton"
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert select_backend(x) == "torch"
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="FASTLCM_KERNELS must be one of auto, triton, torch; got 'cuda'"):
        consistency_loss(x, x)


@pytest.mark.parametrize("mode,expected", [("triton", 1), ("torch", 0), ("auto", 0)])
def test_env_selects_path(monkeypatch, launches, mode, expected):
    monkeypatch.setenv(KERNELS_ENV, mode)
    alpha, sigma, c_skip, c_out, a_prev, w = per_sample_inputs(2, "cpu")
    z = randn((2, 4, 5, 5), torch.float32, "cpu", 0)
    consistency_loss(z, z + 1)
    boundary_output(z, z, alpha, sigma, c_skip, c_out, "epsilon")
    solver_step(torch.cat([z, z]), z, alpha, sigma, a_prev, w, "epsilon")
    assert launches == (
        {"_loss_fwd_kernel": 1, "_boundary_fwd_kernel": 1, "_solver_kernel": 1} if expected else {}
    )


# ---------------------------------------------------------------------------------------------------------------
# Consistency loss
# ---------------------------------------------------------------------------------------------------------------


def loss_fwd_bwd(fn, pred, target, loss_type, grad_scale):
    pred = pred.detach().requires_grad_(True)
    loss = fn(pred, target, loss_type, 0.001)
    (grad,) = torch.autograd.grad(loss * grad_scale, pred)
    return loss, grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_loss_matches_reference(device, launches, shape, dtype, loss_type):
    pred = randn(shape, dtype, device, 1)
    # Differences from tiny (|d| << c: quadratic part of pseudo-Huber) to large (linear part).
    spread = torch.logspace(-5, 0, shape[-1], device=device)
    target = (pred.float() + randn(shape, torch.float32, device, 2) * spread).to(dtype)
    scale = 3.0 if dtype != torch.float16 else 1024.0  # fp16: a loss-scaler-like factor
    loss, grad = loss_fwd_bwd(consistency_loss, pred, target, loss_type, scale)
    ref_loss, ref_grad = loss_fwd_bwd(consistency_loss_reference, pred, target, loss_type, scale)
    # fp16 keeps an fp32 gradient and writes fp16 in one pass; fp32/bf16 scale theirs in place
    scale_kernel = "_scale_kernel" if dtype == torch.float16 else "_scale_inplace_kernel"
    assert launches == {"_loss_fwd_kernel": 1, scale_kernel: 1}
    assert loss.dtype == torch.float32 and loss.ndim == 0 and grad.dtype == dtype
    assert_close(loss, ref_loss, torch.float32, what=f"{loss_type} loss")
    assert_close(grad, ref_grad, dtype, what=f"{loss_type} grad")
    again, grad_again = loss_fwd_bwd(consistency_loss, pred, target, loss_type, scale)
    assert torch.equal(again, loss) and torch.equal(grad_again, grad), "the loss kernel must be deterministic"


def test_loss_fp16_gradient_survives_loss_scaling(device):
    """∂loss/∂pred = 2(p−q)/N is below fp16's normal range here; only the loss scale brings it back. The kernel keeps
    the unscaled gradient in fp32 for fp16 inputs, so the result must match the reference to fp16 precision."""
    pred = randn((2, 4, 32, 32), torch.float16, device, 25)
    target = (pred.float() + 1e-3 * randn(pred.shape, torch.float32, device, 26)).half()
    _, grad = loss_fwd_bwd(consistency_loss, pred, target, "l2", 65536.0)
    _, ref_grad = loss_fwd_bwd(consistency_loss_reference, pred, target, "l2", 65536.0)
    assert ref_grad.abs().max() > 1e-3
    assert_close(grad, ref_grad, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_backward_with_unit_gradient_and_retained_graph(device, dtype):
    """g = 1 (the trainer's usual case: the in-place backward returns at once), then a second backward through the
    retained graph (the first consumed the saved gradient: recomputed) and gradient accumulation into a leaf."""
    pred = randn((2, 4, 9, 7), dtype, device, 30).requires_grad_(True)
    target = (pred.detach().float() + 0.05 * randn(pred.shape, torch.float32, device, 31)).to(dtype)
    ref = pred.detach().clone().requires_grad_(True)
    loss = consistency_loss(pred, target, "huber", 0.001)
    ref_loss = consistency_loss_reference(ref, target, "huber", 0.001)
    loss.backward(retain_graph=True)
    ref_loss.backward(retain_graph=True)
    assert_close(pred.grad, ref.grad, dtype, what="g = 1")
    first = pred.grad.clone()
    (loss * 0.5).backward()  # accumulates: grad = 1.5 · ∂loss/∂pred
    (ref_loss * 0.5).backward()
    assert_close(pred.grad, ref.grad, dtype, what="retained graph, g = 0.5, accumulated")
    assert_close(pred.grad.float(), 1.5 * first.float(), dtype, what="accumulated vs first")


def test_loss_without_grad_writes_no_gradient(device, launches):
    pred, target = randn((3, 4, 9, 11), torch.bfloat16, device, 3), randn((3, 4, 9, 11), torch.bfloat16, device, 4)
    with torch.no_grad():
        loss = consistency_loss(pred.requires_grad_(True), target, "huber", 0.01)
    assert not loss.requires_grad and launches == {"_loss_fwd_kernel": 1}
    assert_close(loss, consistency_loss_reference(pred, target, "huber", 0.01), torch.float32)


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "transposed_both", "strided_slice", "mixed"],
)
def test_loss_non_contiguous(device, layout):
    base_p, base_q = randn((2, 4, 12, 10), torch.float32, device, 5), randn((2, 4, 12, 10), torch.float32, device, 6)
    if layout == "channels_last":
        pred, target = (t.to(memory_format=torch.channels_last) for t in (base_p, base_q))
    elif layout == "transposed_both":
        pred, target = base_p.transpose(1, 3), base_q.transpose(1, 3)
    elif layout == "strided_slice":
        pred, target = base_p[:, :, ::2, 1:], base_q[:, :, 1::2, :-1]
    else:
        pred, target = base_p.to(memory_format=torch.channels_last), base_q.transpose(2, 3).contiguous().transpose(2, 3)
    loss, grad = loss_fwd_bwd(consistency_loss, pred, target, "l2", 1.0)
    ref_loss, ref_grad = loss_fwd_bwd(consistency_loss_reference, pred, target, "l2", 1.0)
    assert_close(loss, ref_loss, torch.float32, what=layout)
    assert_close(grad, ref_grad, torch.float32, what=layout)
    if layout in ("channels_last", "transposed_both"):  # read in place: the gradient keeps pred's strides
        assert grad.stride() == pred.stride()


# ---------------------------------------------------------------------------------------------------------------
# Boundary output (student f_θ / target f⁻)
# ---------------------------------------------------------------------------------------------------------------


def boundary_fwd_bwd(fn, model_out, z, scalars, prediction_type, grad_f):
    model_out = model_out.detach().requires_grad_(True)
    f = fn(model_out, z, *scalars, prediction_type)
    (grad,) = torch.autograd.grad(f, model_out, grad_f)
    return f, grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_boundary_matches_reference(device, launches, shape, dtype, prediction_type):
    alpha, sigma, c_skip, c_out, _, _ = per_sample_inputs(shape[0], device)
    scalars = (alpha, sigma, c_skip, c_out)
    model_out, z = randn(shape, dtype, device, 7), randn(shape, dtype, device, 8)
    grad_f = randn(shape, dtype, device, 9)
    f, grad = boundary_fwd_bwd(boundary_output, model_out, z, scalars, prediction_type, grad_f)
    ref_f, ref_grad = boundary_fwd_bwd(boundary_output_reference, model_out, z, scalars, prediction_type, grad_f)
    assert launches == {"_boundary_fwd_kernel": 1, "_boundary_bwd_kernel": 1}
    assert f.dtype == dtype and grad.dtype == dtype
    assert_close(f, ref_f, what=f"f ({prediction_type})")
    assert_close(grad, ref_grad, what=f"df/dm ({prediction_type})")
    # Index 0 sits at s = 0: c_skip = 1, c_out = 0, so f is z itself and no gradient reaches the model.
    assert torch.equal(f[0], z[0]) and not grad[0].any()


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_boundary_mixed_dtypes_and_fp64_scalars(device, prediction_type):
    alpha, sigma, c_skip, c_out, _, _ = per_sample_inputs(3, device)
    scalars = tuple(v.double() for v in (alpha, sigma, c_skip, c_out))  # what SolverGrid/boundary_scalings return
    model_out, z = randn((3, 4, 6, 5), torch.bfloat16, device, 10), randn((3, 4, 6, 5), torch.float32, device, 11)
    grad_f = randn((3, 4, 6, 5), torch.float32, device, 12)
    f, grad = boundary_fwd_bwd(boundary_output, model_out, z, scalars, prediction_type, grad_f)
    ref_f, ref_grad = boundary_fwd_bwd(boundary_output_reference, model_out, z, scalars, prediction_type, grad_f)
    assert f.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert_close(f, ref_f)
    assert_close(grad, ref_grad)


def test_boundary_layouts_and_expanded_grad(device):
    alpha, sigma, c_skip, c_out, _, _ = per_sample_inputs(2, device)
    base_m, base_z = randn((2, 4, 7, 9), torch.float32, device, 13), randn((2, 4, 7, 9), torch.float32, device, 14)
    for model_out, z in [
        (base_m.to(memory_format=torch.channels_last), base_z.to(memory_format=torch.channels_last)),
        (base_m.to(memory_format=torch.channels_last), base_z),
        (base_m[:, :, :, ::3], base_z[:, :, :, 1::3]),
    ]:
        outs = []
        for fn in (boundary_output, boundary_output_reference):
            m = model_out.detach().requires_grad_(True)
            f = fn(m, z, alpha, sigma, c_skip, c_out, "v_prediction")
            f.sum().backward()  # incoming gradient is an expanded (stride-0) tensor
            outs.append((f, m.grad))
        assert_close(outs[0][0], outs[1][0], what="f")
        assert_close(outs[0][1], outs[1][1], what="df/dm")


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_boundary_gradient_reaches_model_out_only(monkeypatch, mode):
    monkeypatch.setenv(KERNELS_ENV, mode)
    alpha, sigma, c_skip, c_out, _, _ = per_sample_inputs(2, "cpu")
    m = randn((2, 3, 4), torch.float32, "cpu", 15).requires_grad_(True)
    z = randn((2, 3, 4), torch.float32, "cpu", 16).requires_grad_(True)
    boundary_output(m, z, alpha, sigma, c_skip, c_out, "epsilon").sum().backward()
    assert m.grad is not None and z.grad is None


# ---------------------------------------------------------------------------------------------------------------
# Solver step
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_solver_matches_reference(device, launches, shape, dtype, prediction_type):
    alpha, sigma, _, _, a_prev, w = per_sample_inputs(shape[0], device)  # includes w_min, w_max, t=19 and t=999
    teacher_out = randn((2 * shape[0], *shape[1:]), dtype, device, 17)
    z = randn(shape, dtype, device, 18)
    out = solver_step(teacher_out, z, alpha, sigma, a_prev, w, prediction_type)
    ref = solver_step_reference(teacher_out, z, alpha, sigma, a_prev, w, prediction_type)
    assert launches == {"_solver_kernel": 1}
    assert out.dtype == dtype and not out.requires_grad
    assert_close(out, ref, what=f"z_s ({prediction_type})")


def test_solver_w_zero_ignores_uncond(device):
    """w = 0: no guidance, so the unconditional rows must not matter (catches a swapped cond/uncond half)."""
    alpha, sigma, _, _, a_prev, _ = per_sample_inputs(2, device)
    w = torch.zeros(2, device=device)
    z, cond = randn((2, 4, 5, 3), torch.float32, device, 19), randn((2, 4, 5, 3), torch.float32, device, 20)
    uncond = [randn(cond.shape, torch.float32, device, seed) for seed in (21, 22)]
    outs = [solver_step(torch.cat([cond, u]), z, alpha, sigma, a_prev, w, "epsilon") for u in uncond]
    assert torch.equal(outs[0], outs[1])


def test_solver_layouts(device):
    alpha, sigma, _, _, a_prev, w = per_sample_inputs(3, device)
    big = randn((6, 4, 9, 12), torch.float16, device, 23)
    z = randn((3, 4, 9, 12), torch.float16, device, 24)
    cases = [
        (big.to(memory_format=torch.channels_last), z.to(memory_format=torch.channels_last)),  # in place
        (big.to(memory_format=torch.channels_last), z),  # mixed → copies
        (big[:, :, :, 2:], z[:, :, :, 1:-1]),  # strided views
    ]
    for teacher_out, zz in cases:
        out = solver_step(teacher_out, zz, alpha, sigma, a_prev, w, "sample")
        assert_close(out, solver_step_reference(teacher_out, zz, alpha, sigma, a_prev, w, "sample"))
    assert cases[0][1].stride() == solver_step(*cases[0], alpha, sigma, a_prev, w, "sample").stride()


# ---------------------------------------------------------------------------------------------------------------
# Errors and the mismatch report
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_bad_inputs_raise_clear_errors(monkeypatch, mode):
    monkeypatch.setenv(KERNELS_ENV, mode)
    z = torch.zeros(2, 4, 3, 3)
    alpha, sigma, c_skip, c_out, a_prev, w = per_sample_inputs(2, "cpu")
    with pytest.raises(ValueError, match="pred and target must have the same shape"):
        consistency_loss(z, z[:, :3])
    with pytest.raises(ValueError, match="loss_type must be 'l2' or 'huber'"):
        consistency_loss(z, z, "l1")
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        consistency_loss(z, z, "huber", 0.0)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        boundary_output(z, z, alpha, sigma, c_skip, c_out, "eps")
    with pytest.raises(ValueError, match="c_out must be a 1-D tensor of length B=2"):
        boundary_output(z, z, alpha, sigma, c_skip, c_out[:1], "epsilon")
    with pytest.raises(ValueError, match=r"teacher_out must be \[2B, ...\]"):
        solver_step(z, z, alpha, sigma, a_prev, w, "epsilon")
    with pytest.raises(TypeError, match="z must be float32, bfloat16 or float16"):
        solver_step(torch.cat([z, z]), z.long(), alpha, sigma, a_prev, w, "epsilon")


def test_mismatch_report_says_where():
    expected = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    actual = expected.clone()
    actual[1, 2, 3] += 0.5
    report = mismatch_report(actual, expected, 1e-5, 1e-6)
    assert "1 of 24 elements" in report and "index (1, 2, 3): actual 23.5, expected 23" in report
    assert mismatch_report(expected, expected.clone(), 1e-5, 1e-6) is None
    nan = expected.clone()
    nan[0, 0, 1] = float("nan")
    assert "index (0, 0, 1)" in mismatch_report(nan, expected, 1e-5, 1e-6)
    with pytest.raises(AssertionError, match="z_s: 1 of 24"):
        assert_close(actual, expected, what="z_s")


def test_kernels_compile_for_nvidia_targets():
    """Without a GPU, compile each kernel to a cubin for sm_90 (H100/H200) with Triton's bundled ptxas, the way the
    CUDA path specializes it (16-byte-aligned pointers, sizes divisible by 16): catches compiled-path-only errors."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from fastlcm.kernels import boundary, loss, solver

    def compile_(kernel, signature, constexprs):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        aligned = [["tt.divisibility", 16]]
        attrs = {(i,): aligned for i, (k, v) in enumerate(signature.items()) if v.startswith("*") or k == "n"}
        src = ASTSource(fn=JITFunction(kernel.fn), signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            options = dispatch.launch_options(torch.device("cuda"))
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except RuntimeError as exc:
            if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
                pytest.skip(f"no ptxas: {exc}")
            raise
        assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"

    per_sample = {f"{p}_ptr": "*fp32" for p in ("alpha", "sigma")}
    block = {"BLOCK": dispatch.BLOCK}
    loss_sig = {"p_ptr": "*bf16", "q_ptr": "*bf16", "partial_ptr": "*fp32", "grad_ptr": "*bf16", "n": "i32",
                "inv_n": "fp32", "c": "fp32"}  # fmt: skip
    compile_(loss._loss_fwd_kernel, loss_sig, {"HUBER": True, "WRITE_GRAD": True, "BLOCK": loss.LOSS_BLOCK})
    compile_(loss._scale_kernel, {"src_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp16", "n": "i32"}, block)
    compile_(loss._scale_inplace_kernel, {"grad_ptr": "*bf16", "scale_ptr": "*fp32", "n": "i32"}, block)
    fwd_sig = {"m_ptr": "*bf16", "z_ptr": "*fp32", "out_ptr": "*fp32", **per_sample, "cskip_ptr": "*fp64",
               "cout_ptr": "*fp64", "n": "i32"}  # fmt: skip
    bwd_sig = {"g_ptr": "*fp32", "out_ptr": "*bf16", **per_sample, "cout_ptr": "*fp32", "n": "i32"}
    solver_sig = {"t_ptr": "*bf16", "z_ptr": "*bf16", "out_ptr": "*bf16", **per_sample, "aprev_ptr": "*fp32",
                  "w_ptr": "*fp32", "n": "i32", "batch": "i32"}  # fmt: skip
    for pred in (0, 1, 2):
        compile_(boundary._boundary_fwd_kernel, fwd_sig, {"PRED": pred, **block})
        compile_(boundary._boundary_bwd_kernel, bwd_sig, {"PRED": pred, **block})
        compile_(solver._solver_kernel, solver_sig, {"PRED": pred, **block})
