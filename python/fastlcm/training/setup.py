"""Everything a run builds before its first step: the student, target and teacher of the mode (full distillation
or LCM-LoRA), the optimizer and LR schedule through ``accelerator.prepare``, the LCD models and settings with the
config's speed levers, this process's loader, and the run length as diffusers' script counts it."""

from __future__ import annotations

import math
import os
import random

import torch
from diffusers.optimization import get_scheduler

from fastlcm.config import TrainConfig
from fastlcm.errors import ConfigError
from fastlcm.families import Family, Teacher
from fastlcm.lcd.math import SolverGrid
from fastlcm.lcd.step import LCDModels, LCDSettings, TorchDraws
from fastlcm.training import lora as lora_lib
from fastlcm.training import models
from fastlcm.training.compile import compiled
from fastlcm.training.step import BatchMover, TrainState

_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype of Accelerate's mixed-precision name ("no" / None: float32)."""
    return _PRECISIONS.get(mixed_precision or "no", torch.float32)


def make_shard_loader(cfg: TrainConfig, rank: int, world_size: int, epochs: int | None, seed: int,
                      family: Family | None = None):
    """This process's loader (ShardLoader, or LatentShardLoader with --precomputed_latents: its samples must be of
    ``family`` — detected from the teacher when not given — and the config's resolution) on the config's
    :meth:`~TrainConfig.loader_options`: its own shard split, never re-dispatched by Accelerate."""
    from fastlcm.data import LatentShardLoader, ShardLoader

    options = cfg.loader_options(rank=rank, world_size=world_size, epochs=epochs, seed=seed,
                                 cuda=torch.cuda.is_available())
    if cfg.precomputed_latents:
        if family is None:
            from fastlcm.families import detect

            family = detect(cfg.teacher_source())
        return LatentShardLoader.from_options(cfg.train_shards_path_or_url, options, expect_family=family.name,
                                              expect_resolution=cfg.resolution)
    return ShardLoader.from_options(cfg.train_shards_path_or_url, options)


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


def optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """AdamW with the config's betas, decay and eps: bitsandbytes' 8-bit one, or torch's (fused on CUDA under
    --optimizer_impl auto; the same update rule either way)."""
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


def cpu_only_multiprocess() -> bool:
    """Several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without CUDA: CPU DDP (gloo).

    `accelerate launch --cpu` starts a single process unless MPI is configured, so this is how CPU-only
    multi-process runs (and the 2-process test) work.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def park_frozen(teacher: Teacher, device) -> None:
    """Move the VAE and text encoders (not needed by the step with cached latents) to ``device``."""
    for m in (teacher.vae, *teacher.text_encoders):
        m.to(device)
    if torch.device(device).type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def setup(cfg: TrainConfig, accelerator, teacher: Teacher, *, num_training_steps: int | None,
          seed: int) -> TrainState:
    """Student, target, optimizer, LR schedule, ``accelerator.prepare``, LCD models/settings and draws, with the
    speed levers of the config applied (optimizer_impl, channels_last, compile_unets, precomputed_latents).
    ``cfg`` has its family defaults (:meth:`TrainConfig.with_family_defaults`)."""
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    family, lora = teacher.family, cfg.use_lora

    def place():
        return family.place(teacher, device, precision_dtype(accelerator.mixed_precision),
                            vae_replaced=bool(cfg.pretrained_vae_model_name_or_path),
                            cast_unet=cfg.cast_teacher_unet)

    if lora:  # student = teacher UNet + adapters; teacher = adapters off; target = the student, no grad, no EMA
        d = 0
        dtypes = place()
        student, target = lora_lib.add_lora(teacher.unet, cfg), None
    else:  # student = teacher rebuilt with a guidance projection; target = its EMA copy
        d = models.guidance_dim(teacher.unet, cfg)
        init = models.load_student_init(cfg, teacher)
        with device:  # the new UNet is initialized on the device (seconds, not a minute of CPU init for SDXL);
            student = models.build_student(teacher.unet, d, init_unet=init)  # weights from the fp32 teacher
        del init
        dtypes = place()
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
    opt = optimizer(cfg, models.trainable_parameters(student), lr)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=(num_training_steps or 1) * world)
    student, opt, lr_scheduler = accelerator.prepare(student, opt, lr_scheduler)
    if lora:
        lora_lib.register_lora_state_hooks(accelerator, student, family)
    unwrap = accelerator.unwrap_model(student)

    wd = dtypes["text"]
    autocast = (lambda: torch.autocast(device.type, dtype=wd)) if wd != torch.float32 else None
    text = teacher.conditioner(device, cfg.resolution, cfg.use_fix_crop_and_size)
    offloaded = False
    if cfg.precomputed_latents:  # embeddings come with the batch; "" and c∅ are computed once, here
        text = models.PrecomputedConditioner(text, family.cached_fields)
        park_frozen(teacher, "cpu")
        offloaded = True
    run_student = student if cfg.compile_unets == "none" else compiled(student, cfg.compile_mode)
    frozen = (lambda m: compiled(m, cfg.compile_mode)) if cfg.compile_unets == "all" else (lambda m: m)
    if lora:  # teacher and target are the student's own UNet, the teacher with its adapters switched off around
        # the call: compiled, that one module gets a graph per adapter state (dynamo's guards check the flag)
        run_target = frozen(unwrap)
        run_teacher = lora_lib.AdaptersDisabled(run_target)
    else:
        run_teacher, run_target = frozen(teacher.unet), frozen(target)
    lcd_models = LCDModels(
        vae=teacher.vae, text=text, student=run_student, teacher=run_teacher, target=run_target,
        prediction_type=teacher.prediction_type, scaling_factor=teacher.vae.config.scaling_factor,
        teacher_dtype=dtypes["unet"], **({"autocast": autocast} if autocast else {}),
    )
    settings = LCDSettings(w_min=cfg.w_min, w_max=cfg.w_max, guidance_dim=d,
                           timestep_scaling=cfg.timestep_scaling_factor, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                           vae_encode_batch_size=cfg.vae_encode_batch_size)
    cuda = device.type == "cuda"
    mover = BatchMover(device, side_stream=cfg.device_prefetch and cuda,
                       mark_cudagraph_step=cfg.compile_unets != "none" and cfg.compile_mode == "reduce-overhead")
    return TrainState(cfg, accelerator, teacher, student, unwrap, target, opt, lr_scheduler, lcd_models, grid,
                      settings, TorchDraws(device, seed * 1000 + rank), random.Random(seed * 1000 + rank + 7),
                      dtypes, mover, offloaded)
