"""`fastlcm bench step`: throughput of the trainer's LCD step on a random-weight teacher of the real architecture.

The teacher is built from the published SD1.5 / SDXL configs with random weights (no download; ``--family tiny``
is the small test teacher, ``--teacher PATH`` any local diffusers folder), then everything after loading goes
through the trainer's own functions (models.place_frozen / build_student / build_target / text_conditioner_for,
train.make_shard_loader / _optimizer, accelerator.prepare). The timed step is the body of ``train.train``'s loop:
lcd_step, the finite-loss check (a host sync, as in the trainer), backward, clipping, AdamW, LR schedule, EMA.

Three passes: ``--warmup`` untimed steps (compile time lands here), ``--steps`` steady-state steps timed end to end
(CUDA events on a GPU, perf_counter on CPU; batches come from the Rust loader, or with ``--synthetic-input`` one
fixed pinned batch so only the GPU is measured), then ``--parts-steps`` instrumented steps that synchronize around
each part to attribute time to it (VAE encode, text encode, teacher forward, target forward, student fwd+bwd,
optimizer, EMA, loader wait incl. H2D copy, other = elementwise LCD math, draws and the loss sync). The
synchronizations stop CPU/GPU overlap, so the instrumented step is slower than the steady one; the parts say
where the time goes, ``step_s`` says how long a step takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

# DESIGN.md "Measured anchors": diffusers' train_lcm_distill_sd_wds.py, NVIDIA H200, SD1.5-shaped random teacher,
# 512 px, batch 12, diffusers 0.42.1, torch 2.11.
REFERENCE = {
    "fp16+checkpointing": {"step_s": 0.614, "samples_per_s": 19.5, "peak_mem_gib": 23.1},
    "bf16": {"step_s": 0.437, "samples_per_s": 27.5, "peak_mem_gib": 33.0},
}
REFERENCE_PARTS_BF16 = {"vae_encode": 0.069, "text_encode": 0.004, "teacher_forward": 0.085, "target_forward": 0.046,
                        "student_forward_backward": 0.154, "optimizer": 0.011}  # fmt: skip
PARTS = ("loader_wait", "vae_encode", "text_encode", "teacher_forward", "target_forward", "student_forward_backward",
         "optimizer", "ema", "other")  # fmt: skip
PARTS_NOTE = ("parts: seconds per step from a separate instrumented pass that synchronizes the device around each "
              "part (no CPU/GPU overlap), so they sum to instrumented_step_s, not to step_s; loader_wait includes "
              "the host-to-device copy; other = LCD elementwise math, random draws and the trainer's loss sync")  # fmt: skip
CSV_COLUMNS = ("date", "commit", "gpu", "cpu", "family", "batch_size", "resolution", "mixed_precision",
               "gradient_checkpointing", "compile", "input", "steps", "samples_per_s", "step_s", "peak_mem_gib",
               "instrumented_step_s", *(f"part_{p}" for p in PARTS), "warmup_s", "setup_s", "torch", "diffusers",
               "command")  # fmt: skip
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024, "tiny": 64}

# Published architectures (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 configs).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0,
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu",
)  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl", "tiny"),
                        help="random-weight teacher architecture (tiny: the CPU test teacher)")  # fmt: skip
    parser.add_argument("--teacher", metavar="PATH", help="a local diffusers teacher folder instead of --family")
    parser.add_argument("--batch-size", type=int, default=12, help="per-device batch size (default 12)")
    parser.add_argument("--resolution", type=int, default=None, help="px (default: sd15 512, sdxl 1024, tiny 64)")
    parser.add_argument("--steps", type=int, default=30, help="timed steady-state steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--parts-steps", type=int, default=5, help="instrumented steps for the breakdown, 0 = none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student, teacher and target UNets")
    parser.add_argument("--synthetic-input", action="store_true",
                        help="feed one fixed pinned batch instead of the Rust loader (isolates the GPU)")  # fmt: skip
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the student's activations")
    parser.add_argument("--loader-threads", type=int, default=0, help="decode threads (0 = all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--out-csv", metavar="PATH", help="append a row to this CSV (e.g. benches/results/step.csv)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


# ----------------------------------------------------------------------------------------------------------------
# Teacher and trainer state
# ----------------------------------------------------------------------------------------------------------------


def build_random_teacher(family: str, workdir: Path):
    """A models.Teacher of the SD1.5 or SDXL architecture with random weights, in memory, frozen and in eval mode
    as models.load_teacher leaves it. Tokenizers are the small local test tokenizer; each text encoder's
    vocab_size is set to its length (the real 49408-token embedding would only add an unused lookup table)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastlcm import models
    from fastlcm.testing import BOS_TOKEN, EOS_TOKEN, ddim_scheduler, write_clip_tokenizer

    torch.manual_seed(0)
    toks = [write_clip_tokenizer(workdir / "tokenizer")]
    if family == "sdxl":
        toks.append(write_clip_tokenizer(workdir / "tokenizer_2", pad_token="!"))

    def text_config(tok, arch):
        return CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.convert_tokens_to_ids(BOS_TOKEN),
                              eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=tok.pad_token_id, **arch)  # fmt: skip

    sched = DDPMScheduler.from_config(ddim_scheduler("epsilon").config)
    vae = AutoencoderKL(**SD_VAE, sample_size=512 if family == "sd15" else 1024,
                        scaling_factor=0.18215 if family == "sd15" else 0.13025)  # fmt: skip
    if family == "sd15":
        unet, extra = UNet2DConditionModel(**SD15_UNET), {}
    else:
        unet = UNet2DConditionModel(**SDXL_UNET)
        extra = {"tokenizer_2": toks[1], "text_encoder_2": CLIPTextModelWithProjection(text_config(toks[1], CLIP_BIGG))}
    text = CLIPTextModel(text_config(toks[0], CLIP_L))
    for m in (text, vae, unet, extra.get("text_encoder_2")):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    fam = "sd" if family == "sd15" else "sdxl"
    return models.Teacher(fam, unet, vae, text, toks[0], sched, dict(sched.config), **extra)


def make_shards(resolution: int, count: int):
    """(spec, tmpdir): ``count`` synthetic JPEGs of resolution..2*resolution px, via `fastlcm make-shards --synthetic`."""
    from fastlcm.bench.loader import make_synthetic

    return make_synthetic(Namespace(synthetic=count, min_size=resolution, max_size=2 * resolution))


@dataclasses.dataclass
class FixedBatch:
    """--synthetic-input: the fields of fastlcm.data.Batch the step reads, fixed (pixels pinned on CUDA)."""

    pixels: object
    captions: list
    original_sizes: object
    crop_coords: object
    keys: list = dataclasses.field(default_factory=list)


def fixed_batch(batch_size: int, resolution: int, pin: bool) -> FixedBatch:
    import torch

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, resolution, resolution, generator=gen) * 2 - 1
    sizes = torch.tensor([[resolution, resolution]] * batch_size, dtype=torch.int64)
    caps = [f"a photo of a red circle number {i} on a textured background" for i in range(batch_size)]
    return FixedBatch(pixels.pin_memory() if pin else pixels, caps, sizes, torch.zeros_like(sizes),
                      [f"{i:08d}" for i in range(batch_size)])  # fmt: skip


@dataclasses.dataclass
class Trainer:
    """What the timed step touches, assembled exactly as train.train does."""

    cfg: object
    accelerator: object
    student: object
    unwrap: object
    target: object
    optimizer: object
    lr_scheduler: object
    lcd_models: object
    grid: object
    settings: object
    draws: object
    caption_rng: object
    dtypes: dict


def build_trainer(cfg, teacher, device_name: str | None, compile_: bool) -> Trainer:
    import random

    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from fastlcm import models
    from fastlcm.lcd.math import SolverGrid
    from fastlcm.lcd.step import LCDModels, LCDSettings, TorchDraws
    from fastlcm.train import _optimizer

    accelerator = Accelerator(cpu=device_name == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)  # fmt: skip
    device = accelerator.device
    d = models.guidance_dim(teacher.unet, cfg)
    student = models.build_student(teacher.unet, d)
    dtypes = models.place_frozen(teacher, cfg, device, accelerator.mixed_precision)
    target = models.build_target(student).to(device)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    grid = SolverGrid.build(teacher.noise_scheduler.alphas_cumprod.to(device, torch.float64), cfg.num_ddim_timesteps)
    optimizer = _optimizer(cfg, models.trainable_parameters(student), cfg.learning_rate)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps or 1)  # fmt: skip
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    unwrap = accelerator.unwrap_model(student)
    wd = dtypes["text"]
    autocast = (lambda: torch.autocast(device.type, dtype=wd)) if wd != torch.float32 else None
    run_student, run_teacher, run_target = student, teacher.unet, target
    if compile_:
        run_student, run_teacher, run_target = (torch.compile(m) for m in (student, teacher.unet, target))
    lcd_models = LCDModels(
        vae=teacher.vae, text=models.text_conditioner_for(teacher, device, cfg), student=run_student,
        teacher=run_teacher, target=run_target, prediction_type=teacher.prediction_type,
        scaling_factor=teacher.vae.config.scaling_factor, teacher_dtype=dtypes["unet"],
        **({"autocast": autocast} if autocast else {}),
    )  # fmt: skip
    settings = LCDSettings(w_min=cfg.w_min, w_max=cfg.w_max, guidance_dim=d, timestep_scaling=cfg.timestep_scaling_factor,
                           loss_type=cfg.loss_type, huber_c=cfg.huber_c, vae_encode_batch_size=cfg.vae_encode_batch_size)  # fmt: skip
    return Trainer(cfg, accelerator, student, unwrap, target, optimizer, lr_scheduler, lcd_models, grid, settings,
                   TorchDraws(device, 0), random.Random(7), dtypes)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The step (train.train's loop body) and its instrumentation
# ----------------------------------------------------------------------------------------------------------------


class Clock:
    """Accumulates seconds per part; with ``sync`` it synchronizes the device before and after each part."""

    def __init__(self, device, sync: bool):
        self.device, self.sync, self.parts = device, sync, dict.fromkeys(PARTS, 0.0)

    def _sync(self) -> None:
        import torch

        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def part(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.parts[name] += time.perf_counter() - t0


def _timed_call(fn, clock: Clock, name: str):
    def call(*args, **kwargs):
        with clock.part(name):
            return fn(*args, **kwargs)

    return call


class _TimedVAE:
    def __init__(self, vae, clock: Clock):
        self._vae, self._clock = vae, clock

    def parameters(self):
        return self._vae.parameters()

    def encode(self, x):
        with self._clock.part("vae_encode"):
            return self._vae.encode(x)


class _TimedText:
    def __init__(self, text, clock: Clock):
        self._text, self._clock = text, clock

    def encode(self, captions, batch=None):
        with self._clock.part("text_encode"):
            return self._text.encode(captions, batch)

    def unconditional(self, batch_size, batch=None):
        with self._clock.part("text_encode"):
            return self._text.unconditional(batch_size, batch)


def instrumented(lcd_models, clock: Clock):
    return dataclasses.replace(
        lcd_models, vae=_TimedVAE(lcd_models.vae, clock), text=_TimedText(lcd_models.text, clock),
        student=_timed_call(lcd_models.student, clock, "student_forward_backward"),
        teacher=_timed_call(lcd_models.teacher, clock, "teacher_forward"),
        target=_timed_call(lcd_models.target, clock, "target_forward"),
    )  # fmt: skip


def train_step(tr: Trainer, batches, lcd_models, clock: Clock | None) -> float:
    """One optimizer step as train.train runs it (gradient accumulation 1, one process); returns the loss."""
    from fastlcm.lcd.math import ema_update
    from fastlcm.lcd.step import lcd_step
    from fastlcm.train import drop_captions

    part = clock.part if clock is not None else (lambda _name: contextlib.nullcontext())
    cfg, acc = tr.cfg, tr.accelerator
    with part("loader_wait"):
        batch = next(batches)
        pixels = batch.pixels.to(acc.device, non_blocking=True)
    captions = drop_captions(batch.captions, cfg.proportion_empty_prompts, tr.caption_rng)
    with acc.accumulate(tr.student):
        loss = lcd_step(pixels, captions, lcd_models, tr.grid, tr.settings, tr.draws, batch).loss
        value = float(loss.detach())  # the trainer's finite-loss check: one host sync per step
        with part("student_forward_backward"):
            acc.backward(loss)
        with part("optimizer"):
            if acc.sync_gradients:
                acc.clip_grad_norm_(tr.student.parameters(), cfg.max_grad_norm)
            tr.optimizer.step()
            tr.lr_scheduler.step()
            tr.optimizer.zero_grad(set_to_none=True)
    with part("ema"):
        ema_update(tr.target.parameters(), tr.unwrap.parameters(), cfg.ema_decay)
    return value


def measure(tr: Trainer, batches, args) -> dict:
    import torch

    device = tr.accelerator.device
    cuda = device.type == "cuda"
    losses = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(train_step(tr, batches, tr.lcd_models, None))
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(train_step(tr, batches, tr.lcd_models, None))
    if cuda:
        end.record()
        end.synchronize()
        step_s = start.elapsed_time(end) / 1e3 / args.steps
    else:
        step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    clock = Clock(device, sync=True)
    models_i = instrumented(tr.lcd_models, clock)
    t_total = 0.0
    for _ in range(args.parts_steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(train_step(tr, batches, models_i, clock))
        if cuda:
            torch.cuda.synchronize(device)
        t_total += time.perf_counter() - t0
    n = max(args.parts_steps, 1)
    parts = {k: v / n for k, v in clock.parts.items()}
    # student_forward_backward also holds the student's forward, timed inside lcd_step by the wrapper
    parts["other"] = max(0.0, t_total / n - sum(v for k, v in parts.items() if k != "other"))
    out = {"step_s": step_s, "samples_per_s": args.batch_size / step_s, "peak_mem_gib": peak, "warmup_s": warmup_s,
           "instrumented_step_s": t_total / n if args.parts_steps else None,
           "parts": {k: round(v, 6) for k, v in parts.items()} if args.parts_steps else {},
           "nonfinite_losses": sum(not math.isfinite(v) for v in losses)}  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------------------


def _teacher_resolution(path: str) -> int:
    """8 × the UNet's sample_size (the teacher's native resolution), 512 when the config does not say."""
    try:
        return 8 * int(json.loads((Path(path) / "unet" / "config.json").read_text())["sample_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def _reference_key(args) -> str | None:
    if args.family != "sd15" or args.teacher or args.batch_size != 12 or args.resolution != 512:
        return None
    if args.mixed_precision == "fp16" and args.gradient_checkpointing:
        return "fp16+checkpointing"
    if args.mixed_precision == "bf16" and not args.gradient_checkpointing:
        return "bf16"
    return None


def _config(args, tmp: Path):
    """The TrainConfig the bench trains under: the trainer's defaults plus the bench's flags."""
    from fastlcm.config import TrainConfig

    return TrainConfig(pretrained_teacher_model=args.teacher or str(tmp / "teacher"), output_dir=str(tmp / "out"),
                       seed=0, report_to="none", train_batch_size=args.batch_size, resolution=args.resolution,
                       mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                       dataloader_num_workers=args.loader_threads,
                       max_train_steps=args.warmup + args.steps + args.parts_steps)  # fmt: skip


def run(args) -> int:
    import torch

    from fastlcm.bench.loader import machine_info  # the loader bench's machine/commit/date stamp
    from fastlcm.config import ConfigError
    from fastlcm.data import LoaderError

    if args.teacher and not (Path(args.teacher) / "model_index.json").is_file():
        print(f"fastlcm bench step: error: --teacher {args.teacher}: no model_index.json there", file=sys.stderr)
        return 2
    args.resolution = args.resolution or (_teacher_resolution(args.teacher) if args.teacher
                                          else DEFAULT_RESOLUTION[args.family])  # fmt: skip
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--parts-steps", args.parts_steps, 0),
                             ("--loader-threads", args.loader_threads, 0)):  # fmt: skip
        if value < low:
            print(f"fastlcm bench step: error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if args.resolution % 8:
        print(f"fastlcm bench step: error: --resolution must be a multiple of 8, got {args.resolution}", file=sys.stderr)
        return 2
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cpu" and args.mixed_precision == "fp16":
        print("fastlcm bench step: error: --mixed-precision fp16 needs a CUDA device", file=sys.stderr)
        return 2
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="fastlcm-bench-step-"))
    shard_tmp = None
    t_setup = time.perf_counter()
    try:
        from fastlcm import models
        from fastlcm.testing import make_tiny_teacher
        from fastlcm.train import make_shard_loader

        from fastlcm.config import local_teacher_family

        cfg = _config(args, tmp)
        if args.teacher or args.family == "tiny":
            if not args.teacher:
                make_tiny_teacher(tmp / "teacher", sample_size=args.resolution // 8)
            cfg.apply_defaults(local_teacher_family(cfg.pretrained_teacher_model))
            teacher = models.load_teacher(cfg)
        else:
            cfg.apply_defaults("sd" if args.family == "sd15" else "sdxl")
            teacher = build_random_teacher(args.family, tmp)
        tr = build_trainer(cfg, teacher, device_name, args.compile)
        device = tr.accelerator.device
        if args.synthetic_input:
            import itertools

            batches, loader = itertools.repeat(fixed_batch(args.batch_size, args.resolution, device.type == "cuda")), None
        else:
            cfg.train_shards_path_or_url, shard_tmp = make_shards(args.resolution, max(8 * args.batch_size, 32))
            loader = make_shard_loader(cfg, 0, 1, None, 0)
            batches = iter(loader)
        setup_s = time.perf_counter() - t_setup
        result = measure(tr, batches, args)
        stats = loader.stats() if loader is not None else None
    except (ConfigError, ValueError, OSError, LoaderError) as e:
        print(f"fastlcm bench step: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if shard_tmp is not None:
            shutil.rmtree(shard_tmp, ignore_errors=True)

    import diffusers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {info['cpu']}"
    family = f"teacher:{args.teacher}" if args.teacher else args.family
    config = {"family": family, "batch_size": args.batch_size, "resolution": args.resolution,
              "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
              "compile": args.compile, "input": "synthetic (fixed pinned batch)" if args.synthetic_input else "rust loader",
              "steps": args.steps, "warmup": args.warmup, "parts_steps": args.parts_steps,
              "dtypes": {k: str(v).replace("torch.", "") for k, v in tr.dtypes.items()},
              "torch": torch.__version__, "diffusers": diffusers.__version__, **info}  # fmt: skip
    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "step"] else sys.argv[1:]
    ref_key = _reference_key(args)
    out = {**result, "gpu": gpu, "config": config, "setup_s": setup_s, "parts_note": PARTS_NOTE,
           "reference": {"source": "DESIGN.md: diffusers train_lcm_distill_sd_wds.py on NVIDIA H200, SD1.5-shaped "
                                   "random teacher, 512 px, batch 12", "runs": REFERENCE, "parts_bf16": REFERENCE_PARTS_BF16,
                         "matching": ref_key},
           "loader_stats": stats, "command": "fastlcm bench step " + shlex.join(argv)}  # fmt: skip
    if args.out_csv:
        row = {**config, **{k: out[k] for k in ("samples_per_s", "step_s", "peak_mem_gib", "instrumented_step_s",
                                                "warmup_s", "setup_s", "command")},
               **{f"part_{k}": v for k, v in result["parts"].items()}, "gpu": gpu}  # fmt: skip
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        from fastlcm.bench.loader import append_csv

        append_csv(args.out_csv, [row], CSV_COLUMNS)
    if args.json:
        print(json.dumps(out))
        return 0
    print_report(out, ref_key)
    return 0


def print_report(out: dict, ref_key: str | None) -> None:
    c = out["config"]
    print(f"device: {out['gpu']}; commit {c['commit']}; {c['date']}; torch {c['torch']}, diffusers {c['diffusers']}")
    print(f"teacher {c['family']} (random weights), batch {c['batch_size']}, {c['resolution']} px, "
          f"{c['mixed_precision']}{', gradient checkpointing' if c['gradient_checkpointing'] else ''}"
          f"{', torch.compile' if c['compile'] else ''}; input: {c['input']}; dtypes {c['dtypes']}")  # fmt: skip
    print(f"setup {out['setup_s']:.1f} s, {c['warmup']} warm-up steps {out['warmup_s']:.1f} s, {c['steps']} timed steps")
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
