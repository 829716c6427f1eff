"""`fastlcm bench step`: throughput of the trainer's LCD step on a random-weight teacher of the real architecture.

The teacher is built from the published SD1.5 / SDXL configs with random weights (no download; ``--family tiny``
is the small test teacher, ``--teacher PATH`` any local diffusers folder). Everything after that is the trainer's
own code: ``training.setup.setup`` (student, target, optimizer, schedule, accelerator.prepare, the speed levers) and
``training.step.train_step`` (batch → device, caption drop, lcd_step, the loss sync, backward, clipping, AdamW, LR
schedule, EMA) — the bench only adds its timing hooks.

Three passes: ``--warmup`` untimed steps (compile time lands here), ``--steps`` steady-state steps timed end to end
(CUDA events on a GPU, perf_counter on CPU), then ``--parts-steps`` instrumented steps that synchronize around
each part to attribute time to it (VAE encode, text encode, teacher forward, target forward, student fwd+bwd,
optimizer, EMA, loader wait incl. H2D copy, other = elementwise LCD math, draws and the loss sync). The
synchronizations stop CPU/GPU overlap, so the instrumented step is slower than the steady one; the parts say
where the time goes, ``step_s`` says how long a step takes.

Input (``--input``): ``loader`` = the Rust loader on synthetic JPEG shards; ``synthetic`` = one fixed pinned image
batch (only the GPU is measured); ``latents`` = one fixed pinned batch of cached latents and embeddings (the
``--precomputed_latents`` path: no VAE, no text encoder). ``--matrix`` runs several named lever sets in one
process on one teacher (see fastlcm.bench.step_matrix).
"""

from __future__ import annotations

import json
import sys
import time

from fastlcm.bench.common import append_csv, machine_info
from fastlcm.bench.step_core import (
    ABLATION_LEVERS, CSV_COLUMNS, INPUTS, PARTS_NOTE, REFERENCE, REFERENCE_PARTS_BF16, check_args, csv_row,
    levers_from_args, levers_text, load_teacher, measure_set, reset_accelerate, scratch_dirs,
)  # fmt: skip
from fastlcm.bench.step_models import make_shards
from fastlcm.bench.step_matrix import run_matrix


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl", "tiny"),
                        help="random-weight teacher architecture (tiny: the CPU test teacher)")  # fmt: skip
    parser.add_argument("--teacher", metavar="PATH", help="a local diffusers teacher folder instead of --family")
    parser.add_argument("--batch-size", type=int, default=12, help="per-device batch size (default 12)")
    parser.add_argument("--resolution", type=int, default=None, help="px (default: sd15 512, sdxl 1024, tiny 64)")
    parser.add_argument("--steps", type=int, default=30, help="timed steady-state steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--parts-steps", type=int, default=5, help="instrumented steps for the breakdown, 0 = none")
    parser.add_argument("--input", choices=tuple(INPUTS), default="loader",
                        help="loader: Rust loader on synthetic shards; synthetic: one fixed pinned image batch; "
                             "latents: one fixed pinned cached-latent batch (no VAE / text encoder)")  # fmt: skip
    parser.add_argument("--synthetic-input", action="store_true", help="same as --input synthetic")
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the student's activations")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="LCM-LoRA distillation with adapters of this rank (train's --lora_rank; 0 = full UNet "
                             "distillation, the default); single runs only")  # fmt: skip
    parser.add_argument("--optimizer-impl", default="auto", choices=("auto", "fused", "foreach"),
                        help="AdamW implementation (train's --optimizer_impl; auto = fused on CUDA)")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="UNets in channels_last memory format")
    parser.add_argument("--compile-unets", default="none", choices=("none", "student", "all"),
                        help="torch.compile the student, or student + teacher + target")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="same as --compile-unets all")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    parser.add_argument("--loader-dtype", default="auto", choices=("auto", "float32", "bfloat16", "uint8"),
                        help="pixel dtype from the loader (auto: uint8 on CUDA; uint8 is normalized on the device)")  # fmt: skip
    parser.add_argument("--device-prefetch", action=argparse.BooleanOptionalAction, default=True,
                        help="H2D copy + normalize on a side CUDA stream (default on; no effect on CPU)")  # fmt: skip
    parser.add_argument("--kernels", default="auto", choices=ABLATION_LEVERS["kernels"],
                        help="fused Triton kernels (auto, as the trainer) or the torch reference (ablation)")
    parser.add_argument("--teacher-cfg", default="batched", choices=ABLATION_LEVERS["teacher_cfg"],
                        help="teacher guidance in one 2B forward (batched, as the trainer) or two B forwards")
    parser.add_argument("--attention", default="sdpa", choices=ABLATION_LEVERS["attention"],
                        help="SDPA attention (as the trainer) or diffusers' classic AttnProcessor (ablation)")
    parser.add_argument("--matrix", metavar="NAME[,NAME...]",
                        help="run these lever sets in one process on one teacher (or 'all'): "
                             "reference-bf16, reference-fp16-ckpt, +fused-adam, +uint8-prefetch, +channels-last, "
                             "+latents, +compile, +compile-ro (the + sets are cumulative, in this order), and "
                             "one-change variants: images+compile, reference-bf16-ckpt, latents:torch-kernels, "
                             "latents:split-cfg, latents:classic-attention; the lever flags above are then "
                             "ignored")  # fmt: skip
    parser.add_argument("--loader-threads", type=int, default=0, help="decode threads (0 = all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--out-csv", metavar="PATH", help="append a row to this CSV (e.g. benches/results/step.csv)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args) -> int:
    error = check_args(args)
    if error:
        print(f"fastlcm bench step: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.matrix:
            return run_matrix(args)
        return _run_single(args)
    finally:
        reset_accelerate()


def _run_single(args) -> int:
    from fastlcm.errors import FastlcmError

    levers = levers_from_args(args)
    info = machine_info()
    t_setup = time.perf_counter()
    try:
        with scratch_dirs("fastlcm-bench-step-") as dirs:
            tmp = dirs[0]
            teacher, family = load_teacher(args, tmp, args.device)
            shards = None
            if levers["input"] == "loader":
                shards, shard_tmp = make_shards(args.resolution, args.batch_size)
                dirs.append(shard_tmp)
            out = measure_set(args, teacher, family, tmp, "flags", levers, shards, info, t_setup)
    except (FastlcmError, ValueError, OSError) as e:
        print(f"fastlcm bench step: error: {e}", file=sys.stderr)
        return 1
    if args.out_csv:
        append_csv(args.out_csv, [csv_row(out)], CSV_COLUMNS)
    if args.json:
        print(json.dumps(out))
        return 0
    print_report(out, out["reference"]["matching"])
    return 0


def print_report(out: dict, ref_key: str | None) -> None:
    c = out["config"]
    print(f"device: {out['gpu']}; commit {c['commit']}; {c['date']}; torch {c['torch']}, diffusers {c['diffusers']}")
    print(f"teacher {c['family']} (random weights), batch {c['batch_size']}, {c['resolution']} px; "
          f"{levers_text(c)}; input: {c['input']}; dtypes {c['dtypes']}")  # fmt: skip
    cache = f" (compile cache {out['compile_cache']} at the start)" if out["compile_cache"] else ""
    print(f"setup {out['setup_s']:.1f} s, {c['warmup']} warm-up steps {out['warmup_s']:.1f} s{cache}, "
          f"{c['steps']} timed steps")  # fmt: skip
    peak = "n/a" if out["peak_mem_gib"] is None else f"{out['peak_mem_gib']:.1f} GiB"
    print(f"{'':<34}{'step s':>9}{'samples/s':>11}{'peak':>11}")
    print(f"{'fastlcm (this run)':<34}{out['step_s']:>9.3f}{out['samples_per_s']:>11.1f}{peak:>11}")
    for name, ref in REFERENCE.items():
        mark = "  <- same settings" if name == ref_key else ""
        print(f"{'reference H200 ' + name:<34}{ref['step_s']:>9.3f}{ref['samples_per_s']:>11.1f}"
              f"{ref['peak_mem_gib']:>7.1f} GiB{mark}")  # fmt: skip
    if ref_key:
        print(f"speed-up vs reference {ref_key}: {REFERENCE[ref_key]['step_s'] / out['step_s']:.2f}x "
              "(compare only on the same card; the reference is an H200)")  # fmt: skip
    if out["parts"]:
        print(f"per-part seconds per step (instrumented pass, synchronized; instrumented step "
              f"{out['instrumented_step_s']:.3f} s):")  # fmt: skip
        for k, v in out["parts"].items():
            ref = REFERENCE_PARTS_BF16.get(k)
            print(f"  {k:<26}{v:>9.4f}" + (f"   reference bf16 H200 {ref:.3f}" if ref is not None else ""))
        print("  (" + PARTS_NOTE + ")")
    if out["nonfinite_losses"]:
        print(f"warning: {out['nonfinite_losses']} non-finite losses (random weights); the trainer would have stopped")
