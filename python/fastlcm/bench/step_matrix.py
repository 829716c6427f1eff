"""`fastlcm bench step --matrix NAME[,NAME…]`: several lever sets measured in one process on one teacher.

The random-weight teacher is built once (on the device); each set gets a fresh student, target, optimizer and
Accelerator (training.setup.setup), its own input, and a clean slate: the previous set's objects are dropped, dynamo's
caches reset, the CUDA cache emptied and the peak-memory counter reset. One table is printed and one CSV row per
set written (column ``levers`` = the set's name).

Sets: the two references, cumulative ``+`` sets in :data:`CHAIN` order, so each lever's gain is the ratio of a set
to the one before it, and :data:`VARIANTS`: one set with one change, compared with its base set —
``images+compile`` (the ``+compile`` levers on images: cached latents vs the image path under torch.compile),
``reference-bf16-ckpt`` (gradient checkpointing alone) and the ``latents:…`` ablations, which switch off one lever
the trainer always uses (the Triton kernels, the 2B teacher forward, SDPA attention) in the ``+latents`` set.
A set may be named twice (its two rows size the run-to-run noise).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback

# Everything off: what diffusers' script does (foreach AdamW, fp32 pixels copied on the compute stream, no
# channels_last, no compile, images through the VAE), in bf16 without gradient checkpointing.
REFERENCE_BF16 = {"mixed_precision": "bf16", "gradient_checkpointing": False, "optimizer_impl": "foreach",
                  "loader_dtype": "float32", "device_prefetch": False, "channels_last": False,
                  "compile_unets": "none", "compile_mode": "default", "input": "images", "kernels": "auto",
                  "teacher_cfg": "batched", "attention": "sdpa"}  # fmt: skip
CHAIN = (
    ("+fused-adam", {"optimizer_impl": "fused"}),
    ("+uint8-prefetch", {"loader_dtype": "uint8", "device_prefetch": True}),
    ("+channels-last", {"channels_last": True}),
    ("+latents", {"input": "latents"}),
    ("+compile", {"compile_unets": "all", "compile_mode": "default"}),
    ("+compile-ro", {"compile_mode": "reduce-overhead"}),
)
VARIANTS = {
    "images+compile": ("+compile", {"input": "images"}),
    "reference-bf16-ckpt": ("reference-bf16", {"gradient_checkpointing": True}),
    "latents:torch-kernels": ("+latents", {"kernels": "torch"}),
    "latents:split-cfg": ("+latents", {"teacher_cfg": "split"}),
    "latents:classic-attention": ("+latents", {"attention": "classic"}),
}
"""Sets outside the chain: {name: (base set, the one change)}; "images" = the run's image input."""
SETS = ("reference-bf16", "reference-fp16-ckpt", *(name for name, _ in CHAIN), *VARIANTS)


def base_set(name: str) -> str | None:
    """The set a set is compared with: the chain set before it, a variant's base; None for the references."""
    if name in VARIANTS:
        return VARIANTS[name][0]
    chain = [n for n, _ in CHAIN]
    if name in chain:
        return chain[chain.index(name) - 1] if chain.index(name) else "reference-bf16"
    return None


def lever_set(name: str, image_input: str) -> dict:
    """The levers of a named set; ``image_input`` (loader or synthetic) is the input of the image sets."""
    levers = _levers(name)
    if levers["input"] == "images":
        levers["input"] = image_input
    return levers


def _levers(name: str) -> dict:
    """A set's levers, with ``input`` "images" for the image sets."""
    if name in VARIANTS:
        base, change = VARIANTS[name]
        return {**_levers(base), **change}
    if name == "reference-fp16-ckpt":
        return {**REFERENCE_BF16, "mixed_precision": "fp16", "gradient_checkpointing": True}
    levers = dict(REFERENCE_BF16)
    if name == "reference-bf16":
        return levers
    for step_name, change in CHAIN:
        levers.update(change)
        if step_name == name:
            return levers
    raise ValueError(f"--matrix: unknown lever set {name!r} (sets: {', '.join(SETS)}, or all)")


def parse_sets(spec: str) -> list[str]:
    names = list(SETS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("--matrix: name at least one lever set")
    for n in names:
        if n not in SETS:
            raise ValueError(f"--matrix: unknown lever set {n!r} (sets: {', '.join(SETS)}, or all)")
    return names


def _free(device) -> None:
    import torch

    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - only a cache reset
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_matrix(args) -> int:
    import torch

    from fastlcm.bench import step_core as bench
    from fastlcm.bench.common import append_csv, machine_info

    try:
        names = parse_sets(args.matrix)
    except ValueError as e:
        print(f"fastlcm bench step: error: {e}", file=sys.stderr)
        return 2
    image_input = "synthetic" if args.synthetic_input or args.input == "synthetic" else "loader"
    sets = [(n, lever_set(n, image_input)) for n in names]
    if args.device == "cpu" and any(lv["mixed_precision"] == "fp16" for _, lv in sets):
        print("fastlcm bench step: error: --matrix reference-fp16-ckpt needs a CUDA device", file=sys.stderr)
        return 2
    info = machine_info()
    records = []
    device = torch.device(args.device)
    table = not args.json
    try:
        with bench.scratch_dirs("fastlcm-bench-matrix-") as dirs:
            tmp = dirs[0]
            t0 = time.perf_counter()
            teacher, family = bench.load_teacher(args, tmp, args.device)
            teacher_s = time.perf_counter() - t0
            shards = None
            if any(lv["input"] == "loader" for _, lv in sets):
                shards, shard_tmp = bench.make_shards(args.resolution, args.batch_size)
                dirs.append(shard_tmp)
            if table:
                print_header(args, device, info, teacher_s)
            measured: dict[str, float] = {}
            for name, levers in sets:
                record = _run_set(args, teacher, family, tmp, name, levers, shards, info)
                compare(record, measured)
                records.append(record)
                if "error" not in record and args.out_csv:  # row by row: a run cut short keeps what it measured
                    append_csv(args.out_csv, [bench.csv_row(record)], bench.CSV_COLUMNS)
                if table:
                    print_row(record)
                _free(device)
    except (ValueError, OSError) as e:
        print(f"fastlcm bench step: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"sets": records, "teacher_build_s": teacher_s}))
    else:
        print_footer()
    return 0 if all("error" not in r for r in records) else 1


def _run_set(args, teacher, family, tmp, name, levers, shards, info) -> dict:
    """Measure one lever set; an error (out of memory, a compile failure) is recorded, not raised, so the other
    sets still run."""
    from fastlcm.bench import step_core as bench

    try:
        return bench.measure_set(args, teacher, family, tmp, name, levers, shards, info, time.perf_counter())
    except Exception as e:  # noqa: BLE001 - reported in the table and on stderr
        traceback.print_exc()
        first = (str(e).splitlines() or [""])[0][:160]
        print(f"fastlcm bench step: lever set {name} failed: {type(e).__name__}: {first}", file=sys.stderr)
        return {"config": {"levers": name, **levers}, "error": f"{type(e).__name__}: {first}"}


def print_header(args, device, info: dict, teacher_s: float) -> None:
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {info['cpu']}"
    family = f"teacher:{args.teacher}" if args.teacher else args.family
    print(f"device: {gpu}; commit {info['commit']}; {info['date']}; torch {torch.__version__}; teacher {family} "
          f"(random weights, built in {teacher_s:.1f} s), batch {args.batch_size}, {args.resolution} px, "
          f"{args.warmup} warm-up + {args.steps} timed steps")  # fmt: skip
    print(f"{'set':<27}{'samples/s':>10}{'step s':>9}{'peak GiB':>9}{'warm-up s':>10}{'vs base':>8}  "
          f"{'base':<16}levers", flush=True)  # fmt: skip


def compare(record: dict, measured: dict[str, float]) -> None:
    """Add ``base`` and ``vs_base`` (base step time / this step time: > 1 = faster than its base) to a record when
    its base set was measured earlier in the run (the first measurement of a set named twice), and note its time."""
    name = record["config"]["levers"]
    base = base_set(name)
    record["base"] = base
    if "error" in record:
        return
    record["vs_base"] = measured[base] / record["step_s"] if base in measured else None
    measured.setdefault(name, record["step_s"])


def print_row(r: dict) -> None:
    from fastlcm.bench.step_core import levers_text

    name = r["config"]["levers"]
    if "error" in r:
        print(f"{name:<27}  failed: {r['error']}", flush=True)
        return
    peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
    gain = "" if r.get("vs_base") is None else f"{r['vs_base']:.2f}x"
    cache = f"; compile cache {r['compile_cache']} at the start" if r.get("compile_cache") else ""
    print(f"{name:<27}{r['samples_per_s']:>10.1f}{r['step_s']:>9.3f}{peak:>9}{r['warmup_s']:>10.1f}{gain:>8}  "
          f"{r['base'] or '':<16}{levers_text(r['config'])}; {r['config']['input']}{cache}", flush=True)  # fmt: skip


def print_footer() -> None:
    from fastlcm.bench.step_core import REFERENCE

    for key, ref in REFERENCE.items():
        print(f"{'ref H200 ' + key:<27}{ref['samples_per_s']:>10.1f}{ref['step_s']:>9.3f}{ref['peak_mem_gib']:>9.1f}"
              f"{'':>18}  diffusers' script (DESIGN.md; compare like for like only on an H200)")  # fmt: skip
    print("warm-up s includes torch.compile time for compiled sets; vs base = base step time / this step time "
          "(for a latents:… ablation, below 1 by what the switched-off lever is worth)")
