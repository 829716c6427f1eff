"""`fastlcm demo`: the whole product on the embedded tiny default, on a CPU, with no downloads.

1. writes WebDataset shards of the procedural captioned image set (``fastlcm.demo.procedural``);
2. distills the shipped tiny teacher (``fastlcm/assets/tiny_teacher``) with the real trainer (``fastlcm train``'s
   code path) fed by the Rust ShardLoader;
3. evaluates (``fastlcm eval``'s code path): every sampler's distance to the teacher's 50-step DDIM output and its
   caption accuracy, for the teacher's DDIM, the student before distillation and the distilled student;
4. prints the table and writes ``report.json`` and ``grid.png`` (rows: teacher 50-step DDIM, teacher DDIM 4,
   student 4, 2, 1 steps; same prompts and noise).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fastlcm.config import TrainConfig
from fastlcm.demo.procedural import TINY_TEACHER, write_procedural_shards
from fastlcm.errors import ConfigError
from fastlcm.sampling.evaluate import EvalTeacher, evaluate, format_table
from fastlcm.sampling.options import EvalConfig
from fastlcm.sampling.student import student_from_teacher
from fastlcm.training.loop import train


def _train_config(args: argparse.Namespace, shards: str, teacher: Path, out: Path) -> TrainConfig:
    cfg = TrainConfig(
        pretrained_teacher_model=str(teacher),
        train_shards_path_or_url=shards,
        output_dir=str(out / "train"),
        resolution=64,
        train_batch_size=args.batch_size,
        max_train_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler="constant",
        loss_type="huber",
        w_min=3.0,  # covers the evaluation's w = guidance − 1 = 6
        w_max=10.0,
        seed=args.seed,
        checkpointing_steps=max(args.steps, 1),  # one checkpoint at the end: the run can be resumed and extended
        validation_steps=10**9,  # the evaluation below replaces validation grids
        report_to="none",
        dataloader_num_workers=1,
    )
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    """The demo (``args`` as ``fastlcm demo`` parses them); ConfigError on a bad value."""
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--num-samples", args.num_samples),
                        ("--num-prompts", args.num_prompts)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.num_samples < args.batch_size:
        raise ConfigError(f"--num-samples ({args.num_samples}) must be >= --batch-size ({args.batch_size})")
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # Tiny models: one thread avoids oversubscription (much faster on small or shared CPUs).
        torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    print(f"[1/3] writing {args.num_samples} procedural captioned images as shards …", flush=True)
    paths = write_procedural_shards(out / "shards", args.num_samples, samples_per_shard=512, seed=args.seed)
    spec = str(out / "shards" / f"procedural-{{00000..{len(paths) - 1:05d}}}.tar")

    print(f"[2/3] distilling the tiny teacher for {args.steps} steps (Rust loader → LCD trainer) …", flush=True)
    cfg = _train_config(args, spec, TINY_TEACHER, out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = train(cfg)
    t_train = time.perf_counter() - t0
    student_dir = Path(cfg.output_dir) / "unet_target"

    print(f"[3/3] evaluating against the teacher's 50-step DDIM ({args.num_prompts} prompts) …", flush=True)
    teacher = EvalTeacher(TINY_TEACHER)
    before = student_from_teacher(teacher.unet)
    eval_cfg = EvalConfig(num_prompts=args.num_prompts, seed=args.seed,
                          extra={"train_steps": args.steps, "train_s": round(t_train, 1), "student": "EMA target"})
    baseline = evaluate(teacher, student_unet=before, config=eval_cfg)
    report = evaluate(teacher, student=student_dir, out_dir=out, config=eval_cfg)
    for k in eval_cfg.steps:
        report[f"undistilled_student_{k}"] = baseline[f"student_{k}"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(format_table(report))
    print()
    print(f"fastlcm demo finished in {time.perf_counter() - t0:.0f} s (training {t_train:.0f} s, "
          f"last loss {summary.get('last_loss', float('nan')):.4g})")
    print(f"  distilled UNet (EMA target): {student_dir}   online student: {Path(cfg.output_dir) / 'unet'}")
    print(f"  grid (rows: teacher DDIM 50, teacher DDIM 4, student 4, 2, 1 steps): {out / 'grid.png'}")
    print(f"  report: {out / 'report.json'}   (undistilled_student_* = the teacher as an LCM before training)")
    print(f"  sample yourself: fastlcm generate --unet {student_dir} --prompt \"a red circle at the top left on a "
          "black background\" --steps 4 --out sample.png")
    return 0
