"""`fastlcm train`: latent consistency distillation on Accelerate (DESIGN.md "The LCD step", steps 13–14 here).

One code path for every mode: the model family (SD 1.x/2.x or SDXL, read from the teacher folder) only changes
how captions become conditioning (models.text_conditioner_for); LCM-LoRA (--lora / --lora_rank) only changes
what the student, teacher and target are (models.add_lora), what is optimized, checkpointed and exported, and
drops the EMA update (its target is the student itself).

Runs the same under ``fastlcm train …`` and ``accelerate launch -m fastlcm train …``. Each process builds its own
``fastlcm.data.ShardLoader`` for its rank (the loader is never passed through ``accelerator.prepare``, which
would dispatch batches from rank 0). Checkpoints, validation and export live in checkpoint.py, validation.py
and export.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from fastlcm.config import ConfigError, TrainConfig
from fastlcm.config_flags import add_config_arguments, from_args


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before the update, so nothing corrupt is applied or saved."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = from_args(args).validate()
    except ConfigError as e:
        print(f"fastlcm train: error: {e}", file=sys.stderr)
        return 2
    from fastlcm.checkpoint import CheckpointError

    known: tuple[type[BaseException], ...] = (ConfigError, NonFiniteLossError, CheckpointError)
    try:
        from fastlcm.data import LoaderError

        known += (LoaderError,)
    except ImportError:  # pragma: no cover - loader not built
        pass
    try:
        train(cfg)
    except known as e:
        print(f"fastlcm train: error: {e}", file=sys.stderr)
        return 1
    return 0


def make_shard_loader(cfg: TrainConfig, rank: int, world_size: int, epochs: int | None, seed: int):
    """This process's loader (ShardLoader, or LatentShardLoader with --precomputed_latents): its own shard split,
    never re-dispatched by Accelerate."""
    import torch

    if cfg.precomputed_latents:
        from fastlcm.config import local_teacher_family
        from fastlcm.data.latents import LatentShardLoader

        return LatentShardLoader(
            cfg.train_shards_path_or_url, cfg.train_batch_size, seed=seed, shuffle_buffer=cfg.shuffle_buffer,
            threads=cfg.loader_threads, rank=rank, world_size=world_size, epochs=epochs,
            expect_family=local_teacher_family(cfg.pretrained_teacher_model), expect_resolution=cfg.resolution,
        )
    from fastlcm.data import ShardLoader

    return ShardLoader(
        cfg.train_shards_path_or_url, cfg.train_batch_size, cfg.resolution, seed=seed,
        shuffle_buffer=cfg.shuffle_buffer, threads=cfg.loader_threads, rank=rank, world_size=world_size,
        epochs=epochs, crop="center" if cfg.center_crop else "random", random_flip=cfg.random_flip,
        min_original_width=cfg.min_original_width, min_original_height=cfg.min_original_height,
        max_pwatermark=cfg.max_pwatermark, dtype=cfg.pixel_dtype(torch.cuda.is_available()),
    )


def drop_captions(captions, p: float, rng: random.Random) -> list[str]:
    """--proportion_empty_prompts: each caption becomes "" with probability p (seeded, per sample)."""
    return ["" if p > 0 and rng.random() < p else c for c in captions]


def run_length(cfg: TrainConfig, world_size: int) -> tuple[int | None, int | None, int | None]:
    """(batches per epoch per process, optimizer steps to run, loader epochs) as the diffusers script counts them.

    With --max_train_samples an epoch is ceil(samples / global batch) batches of an endlessly reshuffled stream;
    without it an epoch is one pass over the shards and the length is only known if --max_train_steps is set.
    """
    if cfg.max_train_samples:
        per_epoch = math.ceil(cfg.max_train_samples / (cfg.train_batch_size * world_size))
        steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(per_epoch / cfg.gradient_accumulation_steps)
        return per_epoch, steps, None
    if cfg.max_train_steps:
        return None, cfg.max_train_steps, None
    return None, None, cfg.num_train_epochs


def _optimizer(cfg: TrainConfig, params, lr: float):
    import torch

    kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, **kw)
    params = list(params)
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    impl = cfg.optimizer_impl
    if impl == "fused" or (impl == "auto" and on_cuda):
        return torch.optim.AdamW(params, fused=True, **kw)
    if impl == "foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    return torch.optim.AdamW(params, **kw)


def _tracker_config(cfg: TrainConfig) -> dict:
    out = {}
    for k, v in cfg.to_dict().items():
        if k == "hub_token":
            continue
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _cpu_only_multiprocess() -> bool:
    """Several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without CUDA: CPU DDP (gloo).

    `accelerate launch --cpu` starts a single process unless MPI is configured, so this is how CPU-only
    multi-process runs (and the 2-process test) work.
    """
    import os

    import torch

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclasses.dataclass
class TrainState:
    """Everything one training step touches, assembled by :func:`setup` (used by train() and `fastlcm bench step`)."""

    cfg: TrainConfig
    accelerator: Any
    teacher: Any
    student: Any  # as prepared by Accelerate (DDP-wrapped on several processes)
    unwrap: Any  # the bare student module (checkpoints, validation, export)
    target: Any  # EMA target, None for LoRA (the target is the student)
    optimizer: Any
    lr_scheduler: Any
    lcd_models: Any
    grid: Any
    settings: Any
    draws: Any
    caption_rng: random.Random
    dtypes: dict
    mover: "BatchMover"
    offloaded: bool = False  # --precomputed_latents: VAE and text encoders parked on the CPU

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def setup(cfg: TrainConfig, accelerator, teacher, *, num_training_steps: int | None, seed: int) -> TrainState:
    """Student, target, optimizer, LR schedule, ``accelerator.prepare``, LCD models/settings and draws, with the
    speed levers of the config applied (optimizer_impl, channels_last, compile_unets, precomputed_latents)."""
    import torch
    from diffusers.optimization import get_scheduler

    from fastlcm import models
    from fastlcm.checkpoint import register_lora_state_hooks
    from fastlcm.lcd.math import SolverGrid
    from fastlcm.lcd.step import LCDModels, LCDSettings, TorchDraws

    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    lora = cfg.use_lora
    if lora:  # student = teacher UNet + adapters; teacher = adapters off; target = the student, no grad, no EMA
        d = 0
        dtypes = models.place_frozen(teacher, cfg, device, accelerator.mixed_precision)
        student, target = models.add_lora(teacher.unet, cfg), None
    else:  # student = teacher rebuilt with a guidance projection; target = its EMA copy
        d = models.guidance_dim(teacher.unet, cfg)
        init = models.load_student_init(cfg)
        with device:  # the new UNet is initialized on the device (seconds, not a minute of CPU init for SDXL);
            student = models.build_student(teacher.unet, d, init_unet=init)  # weights from the fp32 teacher
        del init
        dtypes = models.place_frozen(teacher, cfg, device, accelerator.mixed_precision)
        target = models.build_target(student).to(device)
    student.to(device)  # before the optimizer is built, so --optimizer_impl auto sees where the parameters live
    if cfg.enable_xformers_memory_efficient_attention:
        try:
            for unet in {id(u): u for u in (teacher.unet, student, target) if u is not None}.values():
                unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # noqa: BLE001 - xformers raises assorted errors when unusable
            raise ConfigError(f"--enable_xformers_memory_efficient_attention: xformers is not usable here ({e})") from e
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    models.set_memory_format((teacher.unet, student, target), cfg.channels_last)
    grid = SolverGrid.build(teacher.noise_scheduler.alphas_cumprod.to(device, torch.float64), cfg.num_ddim_timesteps)

    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * world
    optimizer = _optimizer(cfg, models.trainable_parameters(student), lr)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=(num_training_steps or 1) * world)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    if lora:
        register_lora_state_hooks(accelerator, student, teacher.family)
    unwrap = accelerator.unwrap_model(student)

    wd = dtypes["text"]
    autocast = (lambda: torch.autocast(device.type, dtype=wd)) if wd != torch.float32 else None
    text = models.text_conditioner_for(teacher, device, cfg)
    offloaded = False
    if cfg.precomputed_latents:  # embeddings come with the batch; "" and c∅ are computed once, here
        text = models.PrecomputedConditioner(text)
        offloaded = _park_frozen(teacher, "cpu")
    run_student = student if cfg.compile_unets == "none" else models.compiled(student, cfg.compile_mode)
    frozen = (lambda m: models.compiled(m, cfg.compile_mode)) if cfg.compile_unets == "all" else (lambda m: m)
    if lora:  # teacher and target are the student's own UNet, the teacher with its adapters switched off around
        # the call: compiled, that one module gets a graph per adapter state (dynamo's guards check the flag)
        run_target = frozen(unwrap)
        run_teacher = models.AdaptersDisabled(run_target)
    else:
        run_teacher, run_target = frozen(teacher.unet), frozen(target)
    lcd_models = LCDModels(
        vae=teacher.vae, text=text, student=run_student, teacher=run_teacher, target=run_target,
        prediction_type=teacher.prediction_type, scaling_factor=teacher.vae.config.scaling_factor,
        teacher_dtype=dtypes["unet"], **({"autocast": autocast} if autocast else {}),
    )
    settings = LCDSettings(w_min=cfg.w_min, w_max=cfg.w_max, guidance_dim=d, timestep_scaling=cfg.timestep_scaling_factor,
                           loss_type=cfg.loss_type, huber_c=cfg.huber_c, vae_encode_batch_size=cfg.vae_encode_batch_size)
    cuda = device.type == "cuda"
    mover = BatchMover(device, side_stream=cfg.device_prefetch and cuda,
                       mark_cudagraph_step=cfg.compile_unets != "none" and cfg.compile_mode == "reduce-overhead")
    return TrainState(cfg, accelerator, teacher, student, unwrap, target, optimizer, lr_scheduler, lcd_models, grid,
                      settings, TorchDraws(device, seed * 1000 + rank), random.Random(seed * 1000 + rank + 7), dtypes,
                      mover, offloaded)


def _park_frozen(teacher, device) -> bool:
    """Move the VAE and text encoders (not needed by the step with cached latents) to ``device``."""
    import torch

    for m in (teacher.vae, teacher.text_encoder, teacher.text_encoder_2):
        if m is not None:
            m.to(device)
    if torch.device(device).type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


@dataclasses.dataclass
class DeviceBatch:
    """A batch on the training device: ``pixels`` [-1, 1] (image shards) or the cached latent fields."""

    captions: list
    pixels: Any = None
    latent_mean: Any = None
    latent_std: Any = None
    prompt_embeds: Any = None
    pooled_embeds: Any = None
    original_sizes: Any = None
    crop_coords: Any = None
    keys: list = dataclasses.field(default_factory=list)


class BatchMover:
    """Host batch → :class:`DeviceBatch`. uint8 pixels are normalized (x/127.5 − 1, fp32) on the device after the
    copy. With ``side_stream`` (CUDA, --device_prefetch) the copy and normalize run on a side stream: they are
    queued while the GPU still runs the previous step's backward/optimizer/EMA (the host is ahead of the device),
    and the compute stream waits only for them. Batches are pulled from the loader one at a time, so a
    checkpoint's loader state is exactly the batches trained on."""

    FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_embeds")

    def __init__(self, device, side_stream: bool = False, mark_cudagraph_step: bool = False):
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if side_stream and self.device.type == "cuda" else None
        self.mark_cudagraph_step = mark_cudagraph_step

    def _copy(self, batch) -> DeviceBatch:
        import torch

        out = DeviceBatch(list(batch.captions), original_sizes=getattr(batch, "original_sizes", None),
                          crop_coords=getattr(batch, "crop_coords", None), keys=list(getattr(batch, "keys", [])))
        if getattr(batch, "latent_mean", None) is not None:
            for name in self.FIELDS:
                value = getattr(batch, name, None)
                setattr(out, name, None if value is None else value.to(self.device, torch.float32, non_blocking=True))
        else:
            x = batch.pixels.to(self.device, non_blocking=True)
            out.pixels = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x
        return out

    def __call__(self, batch) -> DeviceBatch:
        import torch

        if self.mark_cudagraph_step:  # reduce-overhead: a new step begins (outputs of the last one may be reused)
            torch.compiler.cudagraph_mark_step_begin()
        if self.stream is None:
            return self._copy(batch)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = self._copy(batch)
        main.wait_stream(self.stream)
        for t in (out.pixels, *(getattr(out, n) for n in self.FIELDS)):
            if t is not None:
                t.record_stream(main)  # allocated on the side stream, used (and freed) on the main one
        return out


def _no_part(_name):
    return contextlib.nullcontext()


def train_step(st: TrainState, batch, *, part=None, lcd_models=None, check_finite: bool = True) -> float:
    """One micro-batch (DESIGN.md steps 1–14): batch → device, caption dropping, lcd_step, the finite-loss check
    (a host sync; raises NonFiniteLossError before any update), backward, clipping, optimizer and LR schedule, and
    after each optimizer step the EMA of the target. Returns the loss (mean over processes).

    ``part(name)`` (a context-manager factory) and ``lcd_models`` (instrumented models) are the bench's hooks."""
    import torch

    from fastlcm.lcd.math import ema_update
    from fastlcm.lcd.step import lcd_step

    part = part or _no_part
    acc, cfg = st.accelerator, st.cfg
    with part("loader_wait"):
        dev = st.mover(batch)
    captions = drop_captions(batch.captions, cfg.proportion_empty_prompts, st.caption_rng)
    with acc.accumulate(st.student):
        loss = lcd_step(dev.pixels, captions, lcd_models or st.lcd_models, st.grid, st.settings, st.draws, dev).loss
        mean_loss = acc.reduce(loss.detach().clone(), "mean") if st.world > 1 else loss.detach()
        value = float(mean_loss)
        if check_finite and not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss ({value})")
        with part("student_forward_backward"):
            acc.backward(loss)
        with part("optimizer"):
            if acc.sync_gradients:
                acc.clip_grad_norm_(st.student.parameters(), cfg.max_grad_norm)
            st.optimizer.step()
            st.lr_scheduler.step()
            st.optimizer.zero_grad(set_to_none=True)
    # 14. target ← μ·target + (1 − μ)·student, after each optimizer step (LoRA: the target is the student)
    if acc.sync_gradients and st.target is not None:
        with part("ema"), torch.no_grad():
            ema_update(st.target.parameters(), st.unwrap.parameters(), cfg.ema_decay)
    return value


@contextlib.contextmanager
def _frozen_on_device(st: TrainState):
    """Validation renders with the VAE and text encoders: bring them back from the CPU for it if parked."""
    if st.offloaded:
        _park_frozen(st.teacher, st.accelerator.device)
    try:
        yield
    finally:
        if st.offloaded:
            _park_frozen(st.teacher, "cpu")


def train(cfg: TrainConfig, loader_factory=None) -> dict:
    """Run the distillation described by a validated config; return a summary (steps, last loss, paths)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from fastlcm import models
    from fastlcm.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
    from fastlcm.export import export_models, push_to_hub
    from fastlcm.validation import run_validation

    out = Path(cfg.output_dir)
    reports = [r.strip() for r in cfg.report_to.split(",") if r.strip() and r.strip() != "none"]
    accelerator = Accelerator(
        cpu=_cpu_only_multiprocess(), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=reports or None, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    # Accelerate's process-wide state keeps the precision it was first made with; unset, --mixed_precision means
    # the launcher's choice (ACCELERATE_MIXED_PRECISION) or "no". Never train silently in another precision.
    wanted = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if accelerator.mixed_precision != wanted:
        raise ConfigError(
            f"--mixed_precision {wanted}: Accelerate was already initialized in this process with "
            f"mixed_precision={accelerator.mixed_precision} and keeps it; run each training in its own process")
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    if cfg.seed is not None:
        set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)  # every rank: each may write its keys log before rank 0 gets here
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- models, optimizer, schedule, data ----
    cfg.apply_defaults(models.detect_family(cfg))  # w_min etc. for a Hub-id teacher (local ones: at validate())
    teacher = models.load_teacher(cfg)
    per_epoch, max_steps, loader_epochs = run_length(cfg, world)
    st = setup(cfg, accelerator, teacher, num_training_steps=max_steps, seed=seed)
    target, unwrap, draws, caption_rng = st.target, st.unwrap, st.draws, st.caption_rng
    loader = (loader_factory or make_shard_loader)(cfg, rank, world, loader_epochs, seed if cfg.seed is not None else 0)
    wd = st.dtypes["text"]

    # ---- resume ----
    step, batches_seen = 0, 0
    resume = resolve_resume(cfg.resume_from_checkpoint, out)
    if cfg.resume_from_checkpoint and resume is None and main:
        print(f"fastlcm train: no checkpoint in {out}; starting a new run", file=sys.stderr)
    if resume is not None:
        meta, mine = load_checkpoint(accelerator, resume, target)
        step, batches_seen = meta["step"], meta["batches_seen"]
        loader.load_state_dict(mine["loader"])
        draws.load_state_dict(mine["draws"])
        caption_rng.setstate(mine["caption_rng"])

    if main:
        accelerator.init_trackers(cfg.tracker_project_name, config=_tracker_config(cfg))
        if cfg.compile_unets != "none":
            print(f"fastlcm train: {models.compile_notice(cfg)}", file=sys.stderr)
    metrics = open(out / "metrics.jsonl", "a") if main else None
    keys_log = open(out / f"keys-rank{rank}.jsonl", "a") if cfg.debug_log_keys else None
    bar = tqdm(total=max_steps, initial=step, disable=not main, desc="distill", unit="step", dynamic_ncols=True)
    loss_sum, micro, last_loss, t0 = 0.0, 0, float("nan"), time.perf_counter()
    finished = max_steps is not None and step >= max_steps
    it = iter(loader)
    while not finished:
        batch = next(it, None)
        if world > 1 and loader_epochs is not None:  # a finite split can end earlier on one rank: stop together
            alive = accelerator.reduce(torch.tensor(float(batch is not None), device=device), "sum")
            batch = batch if alive.item() == world else None
        if batch is None:
            break
        batches_seen += 1
        if keys_log is not None:
            keys_log.write(json.dumps({"step": step, "keys": list(batch.keys)}) + "\n")
        try:
            value = train_step(st, batch)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e} at step {step + 1} (batch {batches_seen}); stopped before the update, nothing was saved for "
                f"this step (last checkpoint: {resolve_resume('latest', out) or 'none'})") from None
        loss_sum, micro = loss_sum + value, micro + 1
        if not accelerator.sync_gradients:
            continue

        step += 1
        last_loss, loss_sum, micro = loss_sum / micro, 0.0, 0
        now = time.perf_counter()
        samples = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
        rate = samples / max(now - t0, 1e-9)
        t0 = now
        logs = {"loss": last_loss, "lr": st.lr_scheduler.get_last_lr()[0], "samples_per_s": rate}
        if per_epoch:
            logs["epoch"] = batches_seen // per_epoch
        stats = loader.stats() if hasattr(loader, "stats") else {}
        if main:
            skipped = sum((stats.get("skipped") or {}).values())
            wait = (stats.get("timings_s") or {}).get("wait", 0.0)
            bar.set_postfix(loss=f"{last_loss:.4g}", lr=f"{logs['lr']:.2g}", sps=f"{rate:.1f}",
                            skipped=skipped, wait=f"{wait:.1f}s", refresh=False)
            bar.update(1)
            metrics.write(json.dumps({"step": step, **logs, "batches_seen": batches_seen, "loader": stats}) + "\n")
            metrics.flush()
        accelerator.log(logs, step=step)

        if step % cfg.checkpointing_steps == 0:
            per_rank = {"loader": loader.state_dict(), "draws": draws.state_dict(), "caption_rng": caption_rng.getstate()}
            save_checkpoint(accelerator, out, step, target, per_rank, {"batches_seen": batches_seen},
                            cfg.checkpoints_total_limit)
        if step % cfg.validation_steps == 0 and main:
            unets = {"online": unwrap} if target is None else {"online": unwrap, "target": target}
            with _frozen_on_device(st):
                run_validation(accelerator, teacher, unets, cfg, step, wd if wd != torch.float32 else None)
        finished = max_steps is not None and step >= max_steps

    bar.close()
    for f in (metrics, keys_log):
        if f is not None:
            f.close()
    accelerator.wait_for_everyone()
    paths = {}
    if main:
        paths = export_models(unwrap, target, teacher, cfg)
        if cfg.push_to_hub:
            paths["hub"] = push_to_hub(cfg)
    accelerator.end_training()
    return {"steps": step, "batches_seen": batches_seen, "last_loss": last_loss, "paths": paths}
