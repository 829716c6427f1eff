"""`fastlcm bench kernels`: the Triton ops vs the eager torch composition and torch.compile, on a CUDA GPU.

For each op and latent size it times the call (CUDA events, after warmup), converts the time into effective
bandwidth — the bytes an ideal implementation must move (listed in ``IDEAL_BYTES``) divided by the time, the same
count for every implementation — and relates it to the card's measured copy bandwidth (``dst.copy_(src)`` of a
large buffer: read + write). Before timing, the Triton result is checked against eager. Rows are appended to
``benches/results/kernels.csv`` stamped with the GPU name, commit and date.

Cold cache: a latent batch of these sizes (0.4–25 MB per tensor) fits in a GPU's L2 cache (about 50 MB on H100/H200),
so calling an op again and again on the same tensors would measure L2, not DRAM, bandwidth — and compare it with a
DRAM copy. Each timed call therefore takes the next of several input copies, as many as needed to move at least
twice the L2 size per round (``--l2-warm`` reuses one set, for comparison).

Sizes: ``sd15:B`` = B×4×64×64 (512 px), ``sdxl:B`` = B×4×128×128 (1024 px), or an explicit ``BxCxHxW``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from fastlcm.bench.common import append_csv, csv_header_error, machine_info

OPS = ("loss", "boundary", "boundary_fwd", "solver")
IDEAL_BYTES = {
    # multiples of N·(element size) that any implementation must read + write
    "loss": 3,  # forward + backward: read pred, target; write ∂loss/∂pred
    "boundary": 5,  # forward (read m, z; write f) + backward (read ∂f; write ∂m)
    "boundary_fwd": 3,  # target f⁻ under no_grad: read m, z; write f
    "solver": 4,  # read the 2B teacher output and z; write z_s
}
DEFAULT_SIZES = "sd15:12,sd15:48,sdxl:12,sdxl:48"
RECORD = "benches/results/kernels.csv"
CSV_FIELDS = (
    "date_utc", "commit", "gpu", "torch", "triton", "op", "shape", "dtype", "impl", "ms", "gbps", "pct_copy_bw",
    "speedup_vs_eager", "copy_gbps", "check", "timing",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default=None, help=f"comma list of sd15:B, sdxl:B or BxCxHxW (default {DEFAULT_SIZES})"
    )
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--loss-type", default="huber", choices=("l2", "huber"))
    parser.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    parser.add_argument("--warmup", type=int, default=25, help="untimed calls per measurement (default 25)")
    parser.add_argument("--iters", type=int, default=200, help="timed calls per measurement (default 200)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time replays of a CUDA graph of --graph-calls calls (device time, no launch overhead)")
    parser.add_argument("--graph-calls", type=int, default=20,
                        help="calls captured per graph (default 20; at least one per input copy)")
    parser.add_argument("--l2-warm", action="store_true",
                        help="time every call on the same inputs (L2-resident) instead of rotating input copies")
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer size for the copy bandwidth (default 1024)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--wrapper-overhead", action="store_true",
                        help="time fastlcm's host code around each launch instead, launches stubbed out (runs on CPU)")
    parser.add_argument("--calls", type=int, default=20000, help="--wrapper-overhead: calls per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="--wrapper-overhead: rounds; the best and the median are reported (default 5)")
    parser.add_argument("--record", default=None,
                        help="CSV the rows are appended to (default benches/results/kernels.csv, or "
                             "kernel_wrapper.csv with --wrapper-overhead)")  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="do not append to the CSV")
    # Smoke test of this code path without a GPU (Triton interpreter, wall-clock timings, never recorded).
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)


def parse_size(spec: str) -> tuple[int, ...]:
    spec = spec.strip().lower()
    family, _, batch = spec.partition(":")
    if batch:
        latent = {"sd15": 64, "sdxl": 128}.get(family)
        if latent is None or not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"--sizes: {spec!r} is not sd15:B, sdxl:B or BxCxHxW")
        return (int(batch), 4, latent, latent)
    dims = spec.split("x")
    if len(dims) < 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ValueError(f"--sizes: {spec!r} is not sd15:B, sdxl:B or BxCxHxW")
    return tuple(int(d) for d in dims)


class Timer:
    """Seconds per call: CUDA events on the GPU, perf_counter (after a sync) otherwise.

    With ``graph_calls`` (CUDA only) the calls are captured into one CUDA graph of that many calls and the graph's
    replays are timed: what is left is the device time of the kernels, without Python and launch overhead.
    """

    def __init__(self, device, warmup: int, iters: int, graph_calls: int = 0):
        self.device, self.warmup, self.iters, self.graph_calls = device, warmup, iters, graph_calls

    def __call__(self, fn) -> float:
        import torch

        if self.graph_calls and self.device.type == "cuda":
            return self._graphed(fn)
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / self.iters
        t0 = time.perf_counter()
        for _ in range(self.iters):
            fn()
        return (time.perf_counter() - t0) / self.iters


    def _graphed(self, fn) -> float:
        import torch

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
            for _ in range(max(self.warmup, 3)):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.graph_calls):
                fn()
        replays = max(3, self.iters // self.graph_calls)
        graph.replay()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / (replays * self.graph_calls)


def copy_bandwidth(device, mib: int, timer: Timer) -> float:
    """GB/s of ``dst.copy_(src)`` over a ``mib`` MiB buffer, counting the read and the write."""
    import torch

    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds / 1e9


def input_copies(per_call_bytes: int, l2_bytes: int, warm: bool) -> int:
    """How many input sets the timed calls rotate through: enough that one round of calls moving
    ``per_call_bytes`` each (the op's ideal traffic) moves ≥ 2× the L2 size."""
    if warm:
        return 1
    return max(2, min(256, -(-2 * l2_bytes // per_call_bytes)))


def l2_cache_bytes(device) -> int:
    """The GPU's L2 size (50 MiB when torch does not say); 0 for the CPU smoke test (two copies: the rotation still
    runs)."""
    import torch

    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)


def rotating(calls: list):
    """One zero-arg callable that calls the next of ``calls`` each time, starting with the first."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


def make_cases(op: str, shape, dtype, device, loss_type: str, prediction_type: str, compile_: bool, copies: int = 1):
    """{impl: zero-arg callable returning the op's output(s)} for one op and size; each call uses the next of
    ``copies`` independent input sets (the first call of every impl uses the first set)."""
    compiled: dict = {}  # one torch.compile per impl, shared by the copies (same shapes: no recompiles)
    sets = [_make_cases(op, shape, dtype, device, loss_type, prediction_type, compile_, seed, compiled)
            for seed in range(copies)]  # fmt: skip
    fns = {}
    for impl in sets[0]:
        fns[impl] = rotating([s[impl] for s in sets])
    return fns


def _make_cases(op: str, shape, dtype, device, loss_type: str, prediction_type: str, compile_: bool, seed: int,
                compiled_fns: dict):  # fmt: skip
    import torch

    from fastlcm import kernels
    from fastlcm.lcd import math as lcd_math

    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = shape[0]

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    def per_sample(lo, hi):
        return (torch.rand(batch, generator=gen) * (hi - lo) + lo).to(device)

    alpha = per_sample(0.05, 0.99)
    sigma, c_skip, c_out = (1 - alpha**2).sqrt(), per_sample(0.0, 1.0), per_sample(0.0, 1.0)
    a_prev, w = per_sample(0.05, 0.99), per_sample(3.0, 15.0)

    def compiled(fn):  # the first copy's compiled function serves every copy
        if not compile_:
            return None
        if "compile" not in compiled_fns:
            compiled_fns["compile"] = torch.compile(fn, dynamic=False)
        return compiled_fns["compile"]

    if op == "loss":
        pred, target = rnd(*shape).requires_grad_(True), rnd(*shape)

        def eager_loss(p, q):
            return lcd_math.consistency_loss(p, q, loss_type, 0.001)

        fns = {"triton": lambda p, q: kernels.consistency_loss(p, q, loss_type, 0.001), "eager": eager_loss,
               "compile": compiled(eager_loss)}  # fmt: skip
        return {
            k: (lambda f=f: (lambda loss: (loss, *torch.autograd.grad(loss, pred)))(f(pred, target)))
            for k, f in fns.items() if f
        }  # fmt: skip
    if op in ("boundary", "boundary_fwd"):
        m, z, g = rnd(*shape), rnd(*shape), rnd(*shape)
        if op == "boundary":
            m.requires_grad_(True)

        def eager_boundary(m_, z_, a_, s_, cs_, co_):
            x0 = lcd_math.predicted_x0(m_.float(), z_.float(), a_, s_, prediction_type)
            return lcd_math.consistency_output(z_.float(), x0, cs_, co_).to(dtype)

        fns = {"triton": lambda *a: kernels.boundary_output(*a, prediction_type), "eager": eager_boundary,
               "compile": compiled(eager_boundary)}  # fmt: skip
        if op == "boundary_fwd":
            return {k: (lambda f=f: f(m, z, alpha, sigma, c_skip, c_out)) for k, f in fns.items() if f}
        return {
            k: (lambda f=f: (lambda out: (out, *torch.autograd.grad(out, m, g)))(f(m, z, alpha, sigma, c_skip, c_out)))
            for k, f in fns.items() if f
        }  # fmt: skip
    if op == "solver":
        teacher_out, z = rnd(2 * batch, *shape[1:]), rnd(*shape)

        def eager_solver(t_, z_, a_, s_, ap_, w_):
            cond, uncond = t_.float().chunk(2)
            zf = z_.float()
            x0 = lcd_math.guided(lcd_math.predicted_x0(cond, zf, a_, s_, prediction_type),
                                 lcd_math.predicted_x0(uncond, zf, a_, s_, prediction_type), w_)  # fmt: skip
            eps = lcd_math.guided(lcd_math.predicted_eps(cond, zf, a_, s_, prediction_type),
                                  lcd_math.predicted_eps(uncond, zf, a_, s_, prediction_type), w_)  # fmt: skip
            return lcd_math.ddim_step(x0, eps, ap_).to(dtype)

        fns = {"triton": lambda *a: kernels.solver_step(*a, prediction_type), "eager": eager_solver,
               "compile": compiled(eager_solver)}  # fmt: skip
        return {k: (lambda f=f: _no_grad(f, teacher_out, z, alpha, sigma, a_prev, w)) for k, f in fns.items() if f}
    raise ValueError(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


def _check(triton_out, eager_out, dtype) -> str:
    import torch

    from fastlcm.kernels.compare import TOLERANCES, mismatch_report

    outs = triton_out if isinstance(triton_out, tuple) else (triton_out,)
    refs = eager_out if isinstance(eager_out, tuple) else (eager_out,)
    for a, e in zip(outs, refs):
        rtol, atol = TOLERANCES[a.dtype if a.dtype in TOLERANCES else torch.float32]
        report = mismatch_report(a, e, rtol, atol)
        if report:
            return "MISMATCH: " + report
    return "ok"


def _sizes_and_ops(args, smoke: bool) -> tuple[list, list[str]]:
    sizes = [parse_size(s) for s in (args.sizes or ("2x4x8x8" if smoke else DEFAULT_SIZES)).split(",")]
    ops = [o.strip() for o in args.ops.split(",")]
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")
    return sizes, ops


def run(args) -> int:
    if args.wrapper_overhead:
        try:
            sizes, ops = _sizes_and_ops(args, smoke=False)
        except ValueError as exc:
            print(f"fastlcm bench kernels: {exc}", file=sys.stderr)
            return 2
        from fastlcm.bench import kernel_wrapper

        error = None if args.no_record else csv_header_error(args.record or kernel_wrapper.RECORD,
                                                              kernel_wrapper.CSV_FIELDS)  # fmt: skip
        if error:
            print(f"fastlcm bench kernels: --record {error}", file=sys.stderr)
            return 2
        return kernel_wrapper.run(args, sizes, ops)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastlcm bench kernels: needs a CUDA GPU, and torch.cuda.is_available() is False on this machine; "
              "nothing was measured", file=sys.stderr)  # fmt: skip
        return 2
    from fastlcm import kernels

    if not kernels.triton_available():
        print("fastlcm bench kernels: Triton is not importable; install triton", file=sys.stderr)
        return 2
    smoke = device.type == "cpu"
    try:
        sizes, ops = _sizes_and_ops(args, smoke)
    except ValueError as exc:
        print(f"fastlcm bench kernels: {exc}", file=sys.stderr)
        return 2
    error = None if args.no_record or smoke else csv_header_error(args.record or RECORD, CSV_FIELDS)
    if error:
        print(f"fastlcm bench kernels: --record {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    compile_ = not args.no_compile and not smoke
    if args.cuda_graph and (smoke or compile_):
        print("fastlcm bench kernels: --cuda-graph needs a CUDA device and --no-compile", file=sys.stderr)
        return 2
    if args.graph_calls < 1:
        print(f"fastlcm bench kernels: --graph-calls must be >= 1, got {args.graph_calls}", file=sys.stderr)
        return 2
    timer = Timer(device, args.warmup, args.iters)
    timing = "cuda-graph replay" if args.cuda_graph else "host launch"
    l2_bytes = l2_cache_bytes(device)
    gpu = torch.cuda.get_device_name(device) if not smoke else "cpu (smoke test: Triton interpreter)"
    copy_gbps = copy_bandwidth(device, min(args.copy_mib, 16) if smoke else args.copy_mib, timer)
    import triton

    info = machine_info()  # the loader bench's commit/date stamp
    meta = {"date_utc": info["date"], "commit": info["commit"], "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__}  # fmt: skip
    rows, failed = [], False
    with kernels.forced_kernels("triton"):
        for shape in sizes:
            numel = 1
            for d in shape:
                numel *= d
            ideal = {op: IDEAL_BYTES[op] * numel * torch.tensor([], dtype=dtype).element_size() for op in ops}
            for op in ops:
                copies = input_copies(ideal[op], l2_bytes, args.l2_warm)
                cases = make_cases(op, shape, dtype, device, args.loss_type, args.prediction_type, compile_, copies)
                check = _check(cases["triton"](), cases["eager"](), dtype)
                failed |= check != "ok"
                case_timer = timer
                if args.cuda_graph:  # whole rounds of the input copies in each graph
                    calls = -(-max(args.graph_calls, copies) // copies) * copies
                    case_timer = Timer(device, args.warmup, max(args.iters, calls), calls)
                times = {impl: case_timer(fn) for impl, fn in cases.items()}
                inputs = "L2-warm: one input set" if copies == 1 else f"{copies} input copies"
                for impl, seconds in times.items():
                    gbps = ideal[op] / seconds / 1e9
                    rows.append({**meta, "op": op, "shape": "x".join(map(str, shape)), "dtype": args.dtype,
                                 "impl": impl, "ms": seconds * 1e3, "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps,
                                 "speedup_vs_eager": times["eager"] / seconds, "copy_gbps": copy_gbps,
                                 "check": check if impl == "triton" else "",
                                 "timing": f"{timing}, {inputs}"})  # fmt: skip
    if args.json:
        print(json.dumps({**meta, "copy_gbps": copy_gbps, "ideal_bytes_per_element": IDEAL_BYTES, "rows": rows},
                         indent=2))  # fmt: skip
    else:
        print(f"GPU: {gpu}   torch {meta['torch']}   triton {meta['triton']}   commit {meta['commit']}")
        inputs = ("one set (L2-warm)" if args.l2_warm
                  else f"rotated copies, >= 2x the {l2_bytes / 2**20:.0f} MiB L2 per round")  # fmt: skip
        print(f"copy bandwidth (dst.copy_(src), read+write): {copy_gbps:.1f} GB/s; timing: {timing}; inputs: {inputs}")
        print("GB/s = ideal bytes (IDEAL_BYTES x N x element size) / time; loss/boundary include the backward")
        print(f"{'op':<13}{'shape':<16}{'dtype':<10}{'impl':<9}{'ms':>9}{'GB/s':>9}{'%copy':>8}{'x eager':>9}  check")
        for r in rows:
            print(f"{r['op']:<13}{r['shape']:<16}{r['dtype']:<10}{r['impl']:<9}{r['ms']:>9.4f}{r['gbps']:>9.1f}"
                  f"{r['pct_copy_bw']:>7.1f}%{r['speedup_vs_eager']:>9.2f}  {r['check']}")  # fmt: skip
    if smoke:
        print("(CPU smoke test: timings are meaningless and nothing is recorded)", file=sys.stderr)
    elif not args.no_record:
        formatted = [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        record = args.record or RECORD
        append_csv(record, formatted, CSV_FIELDS)
        print(f"appended {len(rows)} rows to {record}", file=sys.stderr)
    if failed:
        print("fastlcm bench kernels: a Triton result did not match eager (see the check column)", file=sys.stderr)
        return 1
    return 0
