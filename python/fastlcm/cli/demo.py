"""`fastlcm demo`: the whole product on the embedded tiny default (:mod:`fastlcm.demo.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastlcm.cli import fail
from fastlcm.errors import FastlcmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("fastlcm-demo"), help="output folder (default ./fastlcm-demo)")
    parser.add_argument("--steps", type=int, default=600, help="distillation steps (default 600: a few CPU minutes)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--num-samples", type=int, default=4096, help="procedural images written as shards (4096)")
    parser.add_argument("--num-prompts", type=int, default=30, help="prompts in the evaluation (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and evaluation noise")


def run(args: argparse.Namespace) -> int:
    from fastlcm.demo import run as demo

    try:
        return demo.run(args)
    except FastlcmError as e:
        return fail("demo", e, 2)
