"""Which implementation runs (Triton or the torch reference), how Triton kernels are launched, and input checks.

``FASTLCM_KERNELS`` picks the path for every op, read at each call so a test or a user can flip it at run time:

* ``auto`` (default): Triton for CUDA tensors when Triton is importable, the torch reference otherwise;
* ``triton``: always Triton; tensors on the CPU run under the Triton interpreter;
* ``torch``: always the torch reference.

Interpreter vs compiled kernels: ``triton.jit`` decides between a compiled ``JITFunction`` and the interpreter's
``InterpretedFunction`` when it *decorates* a function (it reads ``TRITON_INTERPRET`` then). Here the kernel
bodies are plain Python functions wrapped by :class:`TritonKernel`, which builds the compiled variant for CUDA
tensors and the interpreted one for CPU tensors on first use. Both can live in one process, nothing global is
changed, and ``TRITON_INTERPRET=1`` is not needed (when it is set, every launch is interpreted, as Triton does).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

_TRITON_IMPORT_ERROR: BaseException | None = None
try:  # optional: without Triton every op runs its torch reference
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - ImportError, or a broken install failing otherwise at import
    triton = tl = None
    _TRITON_IMPORT_ERROR = exc

if tl is not None:
    # Combine function for block sums: ``tl.reduce(x, 0, sum_combine)``. ``tl.sum`` itself is a ``@triton.jit``
    # library function fixed to the compiled variant at import time, so an interpreted kernel cannot call it; the
    # builtin ``tl.reduce`` works in both, and the interpreter recognizes Triton's own ``_sum_combine`` (np.sum).
    sum_combine = getattr(tl.standard, "_sum_combine", None)
    if sum_combine is None:  # pragma: no cover - older/newer Triton without the private helper: slower interpreter

        @triton.jit
        def sum_combine(a, b):
            return a + b

else:  # pragma: no cover
    sum_combine = None

KERNELS_ENV = "FASTLCM_KERNELS"
KERNEL_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    """The value of ``FASTLCM_KERNELS`` (default ``auto``), validated."""
    raw = os.environ.get(KERNELS_ENV, "auto")
    mode = raw.strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV} must be one of {', '.join(KERNEL_MODES)}; got {raw!r}")
    return mode


@contextlib.contextmanager
def forced_kernels(mode: str) -> Iterator[None]:
    """Run a block with ``FASTLCM_KERNELS=mode`` (restored afterwards; process-wide, not thread-local)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV} must be one of {', '.join(KERNEL_MODES)}; got {mode!r}")
    previous = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = previous


def triton_available() -> bool:
    """True when ``import triton`` works (it is optional: the torch reference needs nothing else)."""
    return tl is not None


def select_backend(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op over ``tensors`` (all on one device), following ``FASTLCM_KERNELS``."""
    mode = kernel_mode()
    if mode == "torch":
        return "torch"
    device = tensors[0].device
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{KERNELS_ENV}=triton but Triton cannot be imported ({_TRITON_IMPORT_ERROR!r}); "
                "install triton or set FASTLCM_KERNELS=torch"
            )
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"{KERNELS_ENV}=triton supports CUDA tensors and CPU (interpreter), got {device}")
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "torch"


class TritonKernel:
    """A Triton kernel body, compiled for CUDA tensors and interpreted for CPU tensors.

    ``kernel[grid](*args, device=..., **constexprs)`` launches it. The body uses ``triton.language`` builtins only:
    ``@triton.jit`` functions — including Triton's library ones such as ``tl.sum`` — are fixed to one variant when
    decorated, so a block sum is ``tl.reduce(x, 0, sum_combine)``.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._variants: dict[bool, object] = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def variant(self, device: torch.device):
        from triton import knobs

        interpret = device.type != "cuda" or bool(knobs.runtime.interpret)
        if interpret not in self._variants:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                self._variants[interpret] = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction

                self._variants[interpret] = JITFunction(self.fn)
        return self._variants[interpret]

    def __getitem__(self, grid):
        def launch(*args, device: torch.device, **kwargs):
            if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):  # launch on the tensors' GPU, not the current one
                    return self.variant(device)[grid](*args, **kwargs)
            return self.variant(device)[grid](*args, **kwargs)

        return launch


def triton_kernel(fn: Callable) -> TritonKernel:
    """Decorator: mark a function as a Triton kernel body (see :class:`TritonKernel`)."""
    return TritonKernel(fn)


# ---------------------------------------------------------------------------------------------------------------
# Input checks and memory layout
# ---------------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_latents(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"{name} must have shape [B, ...] with at least one element, got {tuple(x.shape)}")


def check_per_sample(name: str, v: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sample scalar: a 1-D float tensor of length ``batch`` on ``device``; returned with unit stride."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D float tensor of length {batch}, got {type(v).__name__}")
    if v.ndim != 1 or v.shape[0] != batch:
        raise ValueError(f"{name} must be a 1-D tensor of length B={batch}, got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the latents are on {device}")
    if v.requires_grad:
        v = v.detach()
    return v if v.is_contiguous() else v.contiguous()


def check_per_sample_scalars(latents: torch.Tensor, **scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`check_per_sample` for each named scalar against the batch size and device of ``latents``, in order."""
    batch, device = latents.shape[0], latents.device
    return tuple(check_per_sample(name, v, batch, device) for name, v in scalars.items())


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when the dims tile memory exactly (no gaps, no overlap) in some order (contiguous, channels_last, …)."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(shape, strides) if sz != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def per_sample_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Make the tensors indexable as ``base + b·N + j`` with one shared element order ``j`` within each sample.

    Tensors that already are (batch-outermost, dense samples with identical strides, e.g. all contiguous or all
    channels_last) are returned as they are, so kernels read them in place; otherwise every one is made
    contiguous (one copy each). ``N`` is the per-sample element count; leading sizes may differ ([2B] vs [B]).
    """
    inner_shape = tensors[0].shape[1:]
    if all(t.is_contiguous() and t.shape[1:] == inner_shape for t in tensors):  # the common case, checked fast
        return tensors
    inner_shape = tuple(inner_shape)
    per_sample = 1
    for s in inner_shape:
        per_sample *= s
    inner_strides = tuple(tensors[0].stride()[1:])
    ok = all(tuple(t.shape[1:]) == inner_shape for t in tensors) and _dense(inner_shape, inner_strides)
    ok = ok and all(
        tuple(t.stride()[1:]) == inner_strides and (t.shape[0] == 1 or t.stride(0) == per_sample) for t in tensors
    )
    if ok:
        return tensors
    return tuple(t.contiguous() for t in tensors)


def flat_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Like :func:`per_sample_layout` for same-shape tensors read as flat arrays (order does not matter)."""
    shape = tensors[0].shape
    if all(t.is_contiguous() and t.shape == shape for t in tensors):  # the common case, checked fast
        return tensors
    shape, strides = tuple(shape), tuple(tensors[0].stride())
    if _dense(shape, strides) and all(tuple(t.shape) == shape and tuple(t.stride()) == strides for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def empty_like_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor with ``x``'s shape and strides (``x`` is dense here, so ``empty_like`` keeps them)."""
    out = torch.empty_like(x, dtype=dtype)
    # empty_like keeps the strides of dense tensors; checked only off the contiguous fast path
    if not x.is_contiguous() and out.stride() != x.stride():  # pragma: no cover
        raise RuntimeError(f"internal: layout not preserved ({x.stride()} -> {out.stride()})")
    return out


PREDICTION_CODES = {"epsilon": 0, "v_prediction": 1, "sample": 2}


def prediction_code(prediction_type: str) -> int:
    if prediction_type not in PREDICTION_CODES:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTION_CODES)}, got {prediction_type!r}")
    return PREDICTION_CODES[prediction_type]


BLOCK = 1024
"""Elements per Triton program for the elementwise ops (8 per thread at 4 warps: 16-byte loads for bf16/fp16)."""
NUM_WARPS = 4


def launch_options(device: torch.device) -> dict:
    """Launch keywords for the compiled path. FP fusion (FMA contraction) is off so each fp32 operation rounds
    like the separate eager torch ops of the reference (the kernels are memory-bound: it costs nothing)."""
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": False} if device.type == "cuda" else {}
