"""`fastlcm bench step`: throughput of the trainer's LCD step on a random-weight teacher of the real architecture.

The teacher is built from the published SD1.5 / SDXL configs with random weights (no download; ``--family tiny``
is the small test teacher, ``--teacher PATH`` any local diffusers folder). Everything after that is the trainer's
own code: ``train.setup`` (student, target, optimizer, schedule, accelerator.prepare, the speed levers) and
``train.train_step`` (batch → device, caption drop, lcd_step, the loss sync, backward, clipping, AdamW, LR
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

import contextlib
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fastlcm.bench.loader import csv_header_error
from fastlcm.bench.step_measure import PARTS, PARTS_NOTE, measure
from fastlcm.bench.step_models import build_random_teacher, fixed_batch, fixed_latent_batch, make_shards

# Levers the trainer always uses; the bench can switch each off to measure what it is worth (not TrainConfig
# fields): the fused Triton loss/solver/boundary kernels (off = FASTLCM_KERNELS=torch), the teacher's guidance in
# one 2B forward (off = two B forwards, as diffusers' script), and SDPA attention (off = diffusers' AttnProcessor:
# explicit matmul + softmax).
ABLATION_LEVERS = {"kernels": ("auto", "torch"), "teacher_cfg": ("batched", "split"), "attention": ("sdpa", "classic")}
"""{lever: (the trainer's setting, the ablated setting)}."""

# DESIGN.md "Measured anchors": diffusers' train_lcm_distill_sd_wds.py, NVIDIA H200, SD1.5-shaped random teacher,
# 512 px, batch 12, diffusers 0.42.1, torch 2.11.
REFERENCE = {
    "fp16+checkpointing": {"step_s": 0.614, "samples_per_s": 19.5, "peak_mem_gib": 23.1},
    "bf16": {"step_s": 0.437, "samples_per_s": 27.5, "peak_mem_gib": 33.0},
}
REFERENCE_PARTS_BF16 = {"vae_encode": 0.069, "text_encode": 0.004, "teacher_forward": 0.085, "target_forward": 0.046,
                        "student_forward_backward": 0.154, "optimizer": 0.011}  # fmt: skip
CSV_COLUMNS = ("date", "commit", "gpu", "cpu", "family", "batch_size", "resolution", "levers", "lora_rank",
               "trainable_params", "mixed_precision", "gradient_checkpointing", "compile", "optimizer_impl",
               "loader_dtype", "device_prefetch", "channels_last", "compile_unets", "compile_mode", "input", "steps",
               "samples_per_s", "step_s",
               "peak_mem_gib", "instrumented_step_s", *(f"part_{p}" for p in PARTS), "warmup_s", "compile_cache",
               "setup_s", "torch", "diffusers", "command")  # fmt: skip
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024, "tiny": 64}
INPUTS = {"loader": "rust loader", "synthetic": "synthetic (fixed pinned batch)",
          "latents": "cached latents (fixed pinned batch)"}  # fmt: skip


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


def levers_from_args(args) -> dict:
    """The single-run lever set given by the flags."""
    return {"mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
            "optimizer_impl": args.optimizer_impl, "loader_dtype": args.loader_dtype,
            "device_prefetch": args.device_prefetch, "channels_last": args.channels_last,
            "compile_unets": "all" if args.compile else args.compile_unets, "compile_mode": args.compile_mode,
            "input": "synthetic" if args.synthetic_input else args.input, "kernels": args.kernels,
            "teacher_cfg": args.teacher_cfg, "attention": args.attention,
            "lora_rank": args.lora_rank or None}  # fmt: skip


@contextlib.contextmanager
def ablations(st, levers: dict):
    """Apply the set's :data:`ABLATION_LEVERS` to a trainer state for the duration of its measurement; the shared
    teacher gets its attention processors back afterwards."""
    from fastlcm.kernels import forced_kernels

    with contextlib.ExitStack() as stack:
        if levers.get("kernels", "auto") != "auto":
            stack.enter_context(forced_kernels(levers["kernels"]))
        if levers.get("teacher_cfg", "batched") != "batched":
            stack.callback(setattr, st, "settings", st.settings)
            st.settings = dataclasses.replace(st.settings, teacher_cfg_batched=False)
        if levers.get("attention", "sdpa") != "sdpa":
            from diffusers.models.attention_processor import AttnProcessor

            for unet in {id(m): m for m in (st.teacher.unet, st.unwrap, st.target) if m is not None}.values():
                saved = unet.attn_processors
                unet.set_attn_processor(AttnProcessor())
                stack.callback(unet.set_attn_processor, saved)
        yield


# ----------------------------------------------------------------------------------------------------------------
# Trainer state and inputs
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_dirs(prefix: str):
    """A list holding one new temporary folder; every folder in the list (callers append theirs, e.g. the synthetic
    shards) is removed on exit, whatever happens."""
    dirs = [Path(tempfile.mkdtemp(prefix=prefix))]
    try:
        yield dirs
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state. Its first initialization otherwise fixes the mixed precision of every
    later Accelerator in the process: lever sets differ in it, and a `fastlcm train` run in the same process after
    the bench (tests, notebooks) must not inherit the bench's."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_state(cfg, teacher, device_name: str):
    """A fresh Accelerator (its global state reset: lever sets differ in mixed precision) and train.setup."""
    from accelerate import Accelerator

    from fastlcm.train import setup

    reset_accelerate()
    accelerator = Accelerator(cpu=device_name == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)  # fmt: skip
    return setup(cfg, accelerator, teacher, num_training_steps=cfg.max_train_steps, seed=0)


def make_batches(st, levers: dict, args, shards: str | None):
    """(batch iterator, loader or None) for the lever set's input."""
    import itertools

    from fastlcm.train import make_shard_loader

    cuda = st.accelerator.device.type == "cuda"
    if levers["input"] == "latents":
        return itertools.repeat(fixed_latent_batch(st.teacher, args.batch_size, args.resolution, cuda)), None
    if levers["input"] == "synthetic":
        dtype = st.cfg.pixel_dtype(cuda)
        return itertools.repeat(fixed_batch(args.batch_size, args.resolution, cuda, dtype)), None
    cfg = dataclasses.replace(st.cfg, train_shards_path_or_url=shards)
    loader = make_shard_loader(cfg, 0, 1, None, 0)
    return iter(loader), loader


# ----------------------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------------------


def _teacher_resolution(path: str) -> int:
    """8 × the UNet's sample_size (the teacher's native resolution), 512 when the config does not say."""
    try:
        return 8 * int(json.loads((Path(path) / "unet" / "config.json").read_text())["sample_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def _reference_key(args, levers: dict) -> str | None:
    """The DESIGN.md reference run with the same settings as this lever set, if any."""
    if args.family != "sd15" or args.teacher or args.batch_size != 12 or args.resolution != 512:
        return None
    if levers.get("lora_rank"):  # DESIGN.md's reference runs are full distillation
        return None
    if levers["mixed_precision"] == "fp16" and levers["gradient_checkpointing"]:
        return "fp16+checkpointing"
    if levers["mixed_precision"] == "bf16" and not levers["gradient_checkpointing"]:
        return "bf16"
    return None


def config_for(args, tmp: Path, levers: dict):
    """The TrainConfig the bench trains under: the trainer's defaults plus the bench's flags and levers."""
    from fastlcm.config import TrainConfig

    return TrainConfig(pretrained_teacher_model=args.teacher or str(tmp / "teacher"), output_dir=str(tmp / "out"),
                       seed=0, report_to="none", train_batch_size=args.batch_size, resolution=args.resolution,
                       dataloader_num_workers=args.loader_threads,
                       max_train_steps=args.warmup + args.steps + args.parts_steps,
                       precomputed_latents=levers["input"] == "latents",
                       **{k: v for k, v in levers.items() if k != "input" and k not in ABLATION_LEVERS})  # fmt: skip


def load_teacher(args, tmp: Path, device_name: str):
    """The bench's teacher (random-weight SD1.5/SDXL built on the device, the tiny one, or --teacher)."""
    import torch

    from fastlcm import models
    from fastlcm.config import local_teacher_family
    from fastlcm.testing import make_tiny_teacher

    cfg = config_for(args, tmp, levers_from_args(args))
    if args.teacher or args.family == "tiny":
        if not args.teacher:
            make_tiny_teacher(tmp / "teacher", sample_size=args.resolution // 8)
        family = local_teacher_family(cfg.pretrained_teacher_model)
        return models.load_teacher(cfg), family
    family = "sd" if args.family == "sd15" else "sdxl"
    with torch.device(device_name):
        return build_random_teacher(args.family, tmp), family


def check_args(args) -> str | None:
    """An error message for bad flags (exit 2), else None; fills args.resolution and args.device."""
    import torch

    if args.teacher and not (Path(args.teacher) / "model_index.json").is_file():
        return f"--teacher {args.teacher}: no model_index.json there"
    args.resolution = args.resolution or (_teacher_resolution(args.teacher) if args.teacher
                                          else DEFAULT_RESOLUTION[args.family])  # fmt: skip
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--parts-steps", args.parts_steps, 0),
                             ("--loader-threads", args.loader_threads, 0)):  # fmt: skip
        if value < low:
            return f"{flag} must be >= {low}, got {value}"
    if args.resolution % 8:
        return f"--resolution must be a multiple of 8, got {args.resolution}"
    csv_error = csv_header_error(args.out_csv, CSV_COLUMNS)
    if csv_error:
        return f"--out-csv {csv_error}"
    if args.lora_rank < 0:
        return f"--lora-rank must be >= 0, got {args.lora_rank}"
    if args.lora_rank and args.matrix:  # add_lora adapts the shared teacher's UNet in place
        return "--lora-rank is for single runs; --matrix sets are full distillation"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu" and args.mixed_precision == "fp16":
        return "--mixed-precision fp16 needs a CUDA device"
    return None


def result_record(args, st, levers: dict, result: dict, setup_s: float, stats, info: dict, name: str) -> dict:
    """The JSON object of one measured lever set (and, flattened, its CSV row: :func:`csv_row`)."""
    import diffusers
    import torch

    device = st.accelerator.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {info['cpu']}"
    family = f"teacher:{args.teacher}" if args.teacher else args.family
    config = {"family": family, "batch_size": args.batch_size, "resolution": args.resolution, "levers": name,
              "lora_rank": None, **{k: v for k, v in levers.items() if k != "input"},
              "trainable_params": sum(p.numel() for p in st.unwrap.parameters() if p.requires_grad),
              "compile": levers["compile_unets"] != "none",
              "loader_dtype": st.cfg.pixel_dtype(device.type == "cuda"), "input": INPUTS[levers["input"]],
              "steps": args.steps, "warmup": args.warmup, "parts_steps": args.parts_steps,
              "dtypes": {k: str(v).replace("torch.", "") for k, v in st.dtypes.items()},
              "torch": torch.__version__, "diffusers": diffusers.__version__, **info}  # fmt: skip
    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "step"] else sys.argv[1:]
    ref_key = _reference_key(args, levers)
    return {**result, "gpu": gpu, "config": config, "setup_s": setup_s, "parts_note": PARTS_NOTE,
            "reference": {"source": "DESIGN.md: diffusers train_lcm_distill_sd_wds.py on NVIDIA H200, SD1.5-shaped "
                                    "random teacher, 512 px, batch 12", "runs": REFERENCE,
                          "parts_bf16": REFERENCE_PARTS_BF16, "matching": ref_key},
            "loader_stats": stats, "command": "fastlcm bench step " + shlex.join(argv)}  # fmt: skip


def measure_set(args, teacher, family, tmp: Path, name: str, levers: dict, shards: str | None, info: dict,
                t_setup: float) -> dict:
    """Trainer state, inputs and measurement of one lever set on a built teacher: its :func:`result_record`
    (``setup_s`` counted from ``t_setup``). Used by single runs and by each set of a matrix."""
    cfg = config_for(args, tmp, levers).apply_defaults(family)
    st = make_state(cfg, teacher, args.device)
    batches, loader = make_batches(st, levers, args, shards)
    setup_s = time.perf_counter() - t_setup
    with ablations(st, levers):
        result = measure(st, batches, args)
    stats = loader.stats() if loader is not None else None
    return result_record(args, st, levers, result, setup_s, stats, info, name)


def csv_row(out: dict) -> dict:
    row = {**out["config"], **{k: out[k] for k in ("samples_per_s", "step_s", "peak_mem_gib", "instrumented_step_s",
                                                   "warmup_s", "compile_cache", "setup_s", "command")},
           **{f"part_{k}": v for k, v in out["parts"].items()}, "gpu": out["gpu"]}  # fmt: skip
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def run(args) -> int:
    error = check_args(args)
    if error:
        print(f"fastlcm bench step: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.matrix:
            from fastlcm.bench.step_matrix import run_matrix

            return run_matrix(args)
        return _run_single(args)
    finally:
        reset_accelerate()


def _run_single(args) -> int:
    from fastlcm.bench.loader import append_csv, machine_info  # the loader bench's machine/commit/date stamp
    from fastlcm.config import ConfigError
    from fastlcm.data import LoaderError

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
    except (ConfigError, ValueError, OSError, LoaderError) as e:
        print(f"fastlcm bench step: error: {e}", file=sys.stderr)
        return 1
    if args.out_csv:
        append_csv(args.out_csv, [csv_row(out)], CSV_COLUMNS)
    if args.json:
        print(json.dumps(out))
        return 0
    print_report(out, out["reference"]["matching"])
    return 0


def levers_text(c: dict) -> str:
    """The levers of a run's config, short: "bf16, fused AdamW, uint8+prefetch, channels_last, compile all"."""
    bits = [f"LoRA rank {c['lora_rank']}"] if c.get("lora_rank") else []
    bits += [c["mixed_precision"] + (" + grad ckpt" if c["gradient_checkpointing"] else ""),
             f"{c['optimizer_impl']} AdamW",
             ("latents" if c["input"].startswith("cached") else c["loader_dtype"])
             + (" + side-stream H2D" if c["device_prefetch"] else "")]
    if c["channels_last"]:
        bits.append("channels_last")
    if c["compile_unets"] != "none":
        bits.append(f"compile {c['compile_unets']} ({c['compile_mode']})")
    off = {"kernels": "torch-reference kernels", "teacher_cfg": "teacher CFG as 2 forwards",
           "attention": "classic attention"}  # fmt: skip
    trainer = {lever: settings[0] for lever, settings in ABLATION_LEVERS.items()}
    bits += [text for lever, text in off.items() if c.get(lever, trainer[lever]) != trainer[lever]]
    return ", ".join(bits)


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
