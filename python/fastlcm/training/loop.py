"""The training loop of `fastlcm train`: latent consistency distillation on Accelerate.

One code path for every mode: the model family (read from the teacher folder) only changes how the teacher loads
and how captions become conditioning (:mod:`fastlcm.families`); LCM-LoRA (--lora / --lora_rank) only changes what
the student, teacher and target are (:mod:`fastlcm.training.lora`), what is optimized, checkpointed and exported,
and drops the EMA update (its target is the student itself).

Runs the same under ``fastlcm train …`` and ``accelerate launch -m fastlcm train …``. Each process builds its own
``fastlcm.data.ShardLoader`` for its rank (the loader is never passed through ``accelerator.prepare``, which
would dispatch batches from rank 0). The step is :mod:`fastlcm.training.step`, what it is built from
:mod:`fastlcm.training.setup`; checkpoints, validation and export have modules of their own beside this one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from fastlcm.config import TrainConfig
from fastlcm.errors import ConfigError, NonFiniteLossError
from fastlcm.families import Family, detect
from fastlcm.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from fastlcm.training.compile import compile_notice
from fastlcm.training.export import export_models, push_to_hub
from fastlcm.training.setup import cpu_only_multiprocess, make_shard_loader, park_frozen, run_length, setup
from fastlcm.training.step import TrainState, train_step
from fastlcm.training.validation import run_validation


def make_accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    """The run's Accelerator; refuses to train silently in another precision than asked for."""
    accelerator = Accelerator(
        cpu=cpu_only_multiprocess(), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision, log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    # Accelerate's process-wide state keeps the precision it was first made with; unset, --mixed_precision means
    # the launcher's choice (ACCELERATE_MIXED_PRECISION) or "no".
    wanted = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if accelerator.mixed_precision != wanted:
        raise ConfigError(
            f"--mixed_precision {wanted}: Accelerate was already initialized in this process with "
            f"mixed_precision={accelerator.mixed_precision} and keeps it; run each training in its own process")
    return accelerator


def tracker_config(cfg: TrainConfig) -> dict:
    """The config as tracker hyper-parameters (scalars only; the Hub token left out)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()
            if k != "hub_token"}


@contextlib.contextmanager
def frozen_on_device(st: TrainState):
    """Validation renders with the VAE and text encoders: bring them back from the CPU for it if parked."""
    if st.offloaded:
        park_frozen(st.teacher, st.accelerator.device)
    try:
        yield
    finally:
        if st.offloaded:
            park_frozen(st.teacher, "cpu")


class RunLog:
    """What the main process writes while training: ``metrics.jsonl`` (one line per step), the progress bar, the
    trackers; every process its ``keys-rank<R>.jsonl`` with --debug_log_keys."""

    def __init__(self, cfg: TrainConfig, accelerator, out: Path, max_steps: int | None, step: int):
        self.accelerator, self.main = accelerator, accelerator.is_main_process
        self.metrics = open(out / "metrics.jsonl", "a") if self.main else None
        self.keys = open(out / f"keys-rank{accelerator.process_index}.jsonl", "a") if cfg.debug_log_keys else None
        self.bar = tqdm(total=max_steps, initial=step, disable=not self.main, desc="distill", unit="step",
                        dynamic_ncols=True)

    def batch_keys(self, step: int, batch) -> None:
        if self.keys is not None:
            self.keys.write(json.dumps({"step": step, "keys": list(batch.keys)}) + "\n")

    def step(self, step: int, logs: dict, batches_seen: int, stats: dict) -> None:
        if self.main:
            skipped = sum((stats.get("skipped") or {}).values())
            wait = (stats.get("timings_s") or {}).get("wait", 0.0)
            self.bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.2g}",
                                 sps=f"{logs['samples_per_s']:.1f}", skipped=skipped, wait=f"{wait:.1f}s",
                                 refresh=False)
            self.bar.update(1)
            self.metrics.write(json.dumps({"step": step, **logs, "batches_seen": batches_seen, "loader": stats}) + "\n")
            self.metrics.flush()
        self.accelerator.log(logs, step=step)

    def close(self) -> None:
        self.bar.close()
        for f in (self.metrics, self.keys):
            if f is not None:
                f.close()


def train(cfg: TrainConfig, family: Family | None = None, loader_factory=None) -> dict:
    """Run the distillation described by a validated config; return a summary (steps, last loss, paths).

    ``family``: the teacher's, when the caller already knows it (:func:`fastlcm.training.preflight.preflight`);
    otherwise it is detected here. ``loader_factory(cfg, rank, world, epochs, seed)`` replaces the shard loader
    (tests)."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
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
    source = cfg.teacher_source()
    family = family or detect(source)
    cfg = cfg.with_family_defaults(family)
    teacher = family.load(source)
    per_epoch, max_steps, loader_epochs = run_length(cfg, world)
    st = setup(cfg, accelerator, teacher, num_training_steps=max_steps, seed=seed)
    factory = loader_factory or functools.partial(make_shard_loader, family=family)
    loader = factory(cfg, rank, world, loader_epochs, seed if cfg.seed is not None else 0)

    # ---- resume ----
    step, batches_seen = 0, 0
    resume = resolve_resume(cfg.resume_from_checkpoint, out)
    if cfg.resume_from_checkpoint and resume is None and main:
        print(f"fastlcm train: no checkpoint in {out}; starting a new run", file=sys.stderr)
    if resume is not None:
        meta, mine = load_checkpoint(accelerator, resume, st.target)
        step, batches_seen = meta["step"], meta["batches_seen"]
        loader.load_state_dict(mine["loader"])
        st.draws.load_state_dict(mine["draws"])
        st.caption_rng.setstate(mine["caption_rng"])

    if main:
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))
        if cfg.compile_unets != "none":
            print(f"fastlcm train: {compile_notice(cfg)}", file=sys.stderr)
    log = RunLog(cfg, accelerator, out, max_steps, step)
    try:
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
            log.batch_keys(step, batch)
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
            rate = cfg.train_batch_size * cfg.gradient_accumulation_steps * world / max(now - t0, 1e-9)
            t0 = now
            logs = {"loss": last_loss, "lr": st.lr_scheduler.get_last_lr()[0], "samples_per_s": rate}
            if per_epoch:
                logs["epoch"] = batches_seen // per_epoch
            log.step(step, logs, batches_seen, loader.stats() if hasattr(loader, "stats") else {})

            if step % cfg.checkpointing_steps == 0:
                per_rank = {"loader": loader.state_dict(), "draws": st.draws.state_dict(),
                            "caption_rng": st.caption_rng.getstate()}
                save_checkpoint(accelerator, out, step, st.target, per_rank, {"batches_seen": batches_seen},
                                cfg.checkpoints_total_limit, lcm=st.lcm_settings)
            if step % cfg.validation_steps == 0 and main:
                with frozen_on_device(st):
                    run_validation(st, step)
            finished = max_steps is not None and step >= max_steps
    finally:  # the logs are closed also when the step raises (a non-finite loss, a loader error)
        log.close()
    accelerator.wait_for_everyone()
    paths = {}
    if main:
        paths = export_models(st.unwrap, st.target, teacher, cfg, st.lcm_settings)
        if cfg.push_to_hub:
            paths["hub"] = push_to_hub(cfg)
    accelerator.end_training()
    return {"steps": step, "batches_seen": batches_seen, "last_loss": last_loss, "paths": paths}
