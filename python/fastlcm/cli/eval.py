"""`fastlcm eval`: distillation quality on the procedural task (:mod:`fastlcm.sampling.evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastlcm.cli import fail
from fastlcm.errors import FastlcmError
from fastlcm.sampling.options import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher pipeline folder (default: the shipped tiny teacher)")
    parser.add_argument("--student", type=Path, default=None,
                        help="full-distilled student UNet folder (omit: teacher rows only)")
    parser.add_argument("--out", type=Path, default=Path("fastlcm-eval"), help="folder for report.json and grid.png")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts)
    parser.add_argument("--guidance", type=float, default=d.guidance,
                        help="teacher CFG scale; student w = guidance - 1")
    parser.add_argument("--steps", type=str, default=",".join(map(str, d.steps)), help="comma-separated step counts")
    parser.add_argument("--reference-steps", type=int, default=d.reference_steps)
    parser.add_argument("--classifier", type=Path, default=None, help="caption classifier weights (default: shipped)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", type=str, default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--original-inference-steps", type=int, default=None, metavar="N",
                        help="the student's solver grid N (default: what its folder's fastlcm.json records, else 50)")
    parser.add_argument("--timestep-scaling", type=float, default=None, metavar="LAMBDA",
                        help="the student's timestep scaling (default: from its fastlcm.json, else 10)")


def run(args: argparse.Namespace) -> int:
    try:
        steps = tuple(int(s) for s in args.steps.split(",") if s.strip())
    except ValueError:
        return fail("eval", f"--steps must be comma-separated integers, got {args.steps!r}", 2)
    if not steps or min(steps) < 1:
        return fail("eval", f"--steps must be positive integers, got {args.steps!r}", 2)
    for flag, value in (("--num-prompts", args.num_prompts), ("--reference-steps", args.reference_steps),
                        ("--original-inference-steps", args.original_inference_steps or 1)):
        if value < 1:
            return fail("eval", f"{flag} must be >= 1, got {value}", 2)
    if args.timestep_scaling is not None and not args.timestep_scaling > 0:
        return fail("eval", f"--timestep-scaling must be > 0, got {args.timestep_scaling}", 2)
    import torch

    from fastlcm.demo.procedural import TINY_TEACHER, load_classifier
    from fastlcm.sampling.evaluate import evaluate, format_table
    from fastlcm.sampling.scheduler import LCMSettings, sampling_note

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = EvalConfig(num_prompts=args.num_prompts, guidance=args.guidance, steps=steps,
                     reference_steps=args.reference_steps, seed=args.seed, device=device,
                     original_inference_steps=args.original_inference_steps, timestep_scaling=args.timestep_scaling)
    try:
        if args.student is not None and args.original_inference_steps is None:
            note = sampling_note(LCMSettings.load(args.student), str(args.student))
            if note:
                print(f"fastlcm eval: note: {note}")
        report = evaluate(args.teacher or TINY_TEACHER, args.student, args.out, cfg,
                          classifier=load_classifier(args.classifier), log=print)
    except (FastlcmError, OSError) as e:
        return fail("eval", e, 2)
    print(format_table(report))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'grid.png'}")
    return 0
