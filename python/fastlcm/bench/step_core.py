"""The shared half of `fastlcm bench step` (single runs in :mod:`.step`, ``--matrix`` in :mod:`.step_matrix`):
the lever sets, the reference numbers, the trainer state and inputs of one set, its measurement and its record.
Everything after the teacher is built is the trainer's own code (:func:`fastlcm.training.setup.setup`,
:func:`fastlcm.training.step.train_step`); the bench only adds its timing hooks (:mod:`.step_measure`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fastlcm.bench.common import csv_header_error
from fastlcm.bench.step_measure import PARTS, PARTS_NOTE, measure
from fastlcm.bench.step_models import build_random_teacher, fixed_batch, fixed_latent_batch

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
    """A fresh Accelerator (its global state reset: lever sets differ in mixed precision) and training.setup.setup."""
    from accelerate import Accelerator

    from fastlcm.training.setup import setup

    reset_accelerate()
    accelerator = Accelerator(cpu=device_name == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)  # fmt: skip
    return setup(cfg, accelerator, teacher, num_training_steps=cfg.max_train_steps, seed=0)


def make_batches(st, levers: dict, args, shards: str | None):
    """(batch iterator, loader or None) for the lever set's input."""
    import itertools

    from fastlcm.training.setup import make_shard_loader

    cuda = st.accelerator.device.type == "cuda"
    if levers["input"] == "latents":
        return itertools.repeat(fixed_latent_batch(st.teacher, args.batch_size, args.resolution, cuda)), None
    if levers["input"] == "synthetic":
        dtype = st.cfg.pixel_dtype(cuda)
        return itertools.repeat(fixed_batch(args.batch_size, args.resolution, cuda, dtype)), None
    cfg = dataclasses.replace(st.cfg, train_shards_path_or_url=shards)
    loader = make_shard_loader(cfg, 0, 1, None, 0)
    return iter(loader), loader


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
    """(teacher, family): a random-weight SD1.5/SDXL teacher built on the device, the tiny one, or --teacher."""
    import torch

    from fastlcm.families import ModelSource, detect
    from fastlcm.testing import make_tiny_teacher

    if args.teacher or args.family == "tiny":
        if not args.teacher:
            make_tiny_teacher(tmp / "teacher", sample_size=args.resolution // 8)
        source = ModelSource(args.teacher or str(tmp / "teacher"))
        family = detect(source)
        return family.load(source), family
    with torch.device(device_name):
        teacher = build_random_teacher(args.family, tmp)
    return teacher, teacher.family


def check_args(args) -> str | None:
    """An error message for bad flags (exit 2), else None; fills args.resolution and args.device."""
    import torch

    from fastlcm.errors import ConfigError
    from fastlcm.families import ModelSource, detect

    if args.teacher:
        source = ModelSource(args.teacher, local_files_only=True)
        try:
            args.resolution = args.resolution or detect(source).native_resolution(source)
        except (ConfigError, OSError) as e:
            return f"--teacher {e}"
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.family]
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
    cfg = config_for(args, tmp, levers).with_family_defaults(family)
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
