"""`fastlcm demo`: run what fastlcm can do today on an embedded tiny default, with no downloads.

Today it builds a tiny random-weight teacher and tiny WebDataset shards, loads the teacher into the stock
diffusers pipeline and samples from it. Issue 7 replaces this with distilling a shipped trained teacher.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("fastlcm-demo"), help="output folder (default ./fastlcm-demo)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps for the teacher check (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, shards and noise")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from fastlcm.testing import load_tiny_pipeline, make_tiny_shards, make_tiny_teacher

    if args.steps < 1:
        raise SystemExit("fastlcm demo: --steps must be >= 1")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = make_tiny_teacher(out / "teacher", seed=args.seed)
    shards = make_tiny_shards(out / "shards", num_samples=32, samples_per_shard=16, seed=args.seed)
    pipe = load_tiny_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    images = pipe(
        prompts,
        num_inference_steps=args.steps,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    grid = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(out / "teacher_samples.png")
    print(f"fastlcm demo ({time.perf_counter() - t0:.1f} s)")
    print(f"  tiny teacher (random weights, diffusers layout): {teacher}")
    print(f"  shards: {len(shards)} × 16 captioned images in {out / 'shards'}")
    print(f"  {args.steps}-step samples from the stock diffusers pipeline: {out / 'teacher_samples.png'}")
    print("  distillation of a shipped trained teacher joins this demo with issue 7")
    return 0
