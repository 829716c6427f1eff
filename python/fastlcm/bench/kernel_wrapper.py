"""`fastlcm bench kernels --wrapper-overhead`: host time of fastlcm's own Python code around each Triton launch.

Every public op checks its inputs, picks the path (``FASTLCM_KERNELS``), fixes the memory layout, allocates its
output and only then launches. On small latents the host, not the GPU, sets the pace ("host launch" rows of
``bench kernels``), so this part is worth tracking on its own. Here the launch is replaced by a no-op and each op is
called many times: what is left is the wrapper (for ``loss`` and ``boundary``, including ``autograd.Function``'s
apply; the backward is not run). Triton's own dispatch and the CUDA launch are not in it. It runs without a GPU
(CPU tensors), so it can be compared across commits on any machine. Per op the best and the median of ``--rounds``
rounds are printed and appended to ``benches/results/kernel_wrapper.csv`` with the CPU's name; compare the best
(other load on the machine only ever adds time, so the minimum is the least noisy estimate, as with timeit).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

RECORD = "benches/results/kernel_wrapper.csv"
CSV_FIELDS = ("date_utc", "commit", "cpu", "device", "torch", "op", "shape", "us_per_call", "us_median", "rounds",
              "calls")  # fmt: skip


@contextlib.contextmanager
def stubbed_launches():
    """Every ``TritonKernel[grid](...)`` does nothing inside the block (outputs stay uninitialized)."""
    from fastlcm.kernels import dispatch

    original = dispatch.TritonKernel.__getitem__

    def no_launch(self, grid):
        return lambda *args, device, **kwargs: None

    dispatch.TritonKernel.__getitem__ = no_launch
    try:
        yield
    finally:
        dispatch.TritonKernel.__getitem__ = original


def op_calls(shape, device) -> dict:
    """{op: zero-arg callable} for one latent shape: the four public ops as the trainer calls them."""
    import torch

    from fastlcm import kernels

    batch = shape[0]
    x = lambda *s: torch.zeros(*s, device=device, dtype=torch.bfloat16)  # noqa: E731 - contents are never read
    per_sample = [torch.full((batch,), 0.5, device=device) for _ in range(6)]
    alpha, sigma, c_skip, c_out, a_prev, w = per_sample
    pred, target, z, teacher_out = x(*shape).requires_grad_(True), x(*shape), x(*shape), x(2 * batch, *shape[1:])
    return {
        "loss": lambda: kernels.consistency_loss(pred, target, "huber", 0.001),
        "boundary": lambda: kernels.boundary_output(pred, z, alpha, sigma, c_skip, c_out, "epsilon"),
        "boundary_fwd": lambda: kernels.boundary_output(target, z, alpha, sigma, c_skip, c_out, "epsilon"),
        "solver": lambda: kernels.solver_step(teacher_out, z, alpha, sigma, a_prev, w, "epsilon"),
    }


def time_call(fn, calls: int, rounds: int) -> tuple[float, float]:
    """(best, median) over ``rounds`` of the mean seconds per call of ``calls`` calls (after ``calls // 10``
    warm-up calls)."""
    for _ in range(max(1, calls // 10)):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return min(samples), statistics.median(samples)


def run(args, sizes, ops) -> int:
    import torch

    from fastlcm.bench.common import append_csv, machine_info
    from fastlcm.kernels import forced_kernels

    if args.calls < 1 or args.rounds < 1:
        print("fastlcm bench kernels: --calls and --rounds must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    info = machine_info()
    rows = []
    with forced_kernels("triton"), stubbed_launches():
        for shape in sizes:
            calls = op_calls(shape, device)
            for op in ops:
                best, median = time_call(calls[op], args.calls, args.rounds)
                rows.append({"date_utc": info["date"], "commit": info["commit"], "cpu": info["cpu"],
                             "device": str(device), "torch": torch.__version__, "op": op,
                             "shape": "x".join(map(str, shape)), "us_per_call": best * 1e6, "us_median": median * 1e6,
                             "rounds": args.rounds, "calls": args.calls})  # fmt: skip
    print(f"fastlcm's wrapper around each Triton launch (launch stubbed out), CPU {info['cpu']}, "
          f"{info['cores']} cores, tensors on {device}; commit {info['commit']}; torch {torch.__version__}")
    print(f"{args.rounds} rounds x {args.calls} calls; loss/boundary include autograd.Function.apply")
    print(f"{'op':<14}{'shape':<16}{'best us':>9}{'median us':>11}")
    for r in rows:
        print(f"{r['op']:<14}{r['shape']:<16}{r['us_per_call']:>9.2f}{r['us_median']:>11.2f}")
    if not args.no_record:
        record = args.record or RECORD
        append_csv(record, [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                   CSV_FIELDS)  # fmt: skip
        print(f"appended {len(rows)} rows to {record}", file=sys.stderr)
    return 0
