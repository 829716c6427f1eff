"""`fastlcm` command line: one module per command in this package, argparse only.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Nothing here imports torch (or
any other heavy library) at import time: ``fastlcm --help`` and a mistyped flag answer at once, and ``run``
imports the library it drives. A command catches :class:`fastlcm.errors.FastlcmError` and prints it as one
line, ``fastlcm <command>: error: <message>``, with a non-zero exit.

Flag style: ``fastlcm train`` takes diffusers' snake_case flag names (``--train_batch_size``), so that a
command written for diffusers' scripts runs unchanged; every other command uses kebab-case (``--batch-size``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module in this package, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "train", "distill a teacher into a Latent Consistency Model (full UNet or LoRA)"),
    ("generate", "generate", "sample images from a distilled UNet or LCM-LoRA in 1-8 steps"),
    ("demo", "demo", "run the whole product on the embedded tiny default, no downloads"),
    ("eval", "eval", "distillation quality: few-step samplers vs the teacher's 50-step DDIM"),
    ("make-shards", "make_shards", "write WebDataset shards from an image folder or synthetic images"),
    ("precompute", "precompute", "encode image shards once into latent shards (VAE latents + text embeddings)"),
    ("bench", "bench", "benchmarks: loader, kernels, step"),
]


def _version_string() -> str:
    from fastlcm import __version__

    try:
        from fastlcm import native_core_version

        core = native_core_version()
    except ImportError:
        core = "not built"
    return f"fastlcm {__version__} (rust core {core}, python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlcm",
        description="Fast latent consistency distillation of Stable Diffusion teachers.",
    )
    parser.add_argument("--version", action="version", version=_version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"fastlcm.cli.{module}")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def fail(command: str, error: BaseException | str, code: int = 1) -> int:
    """Print ``fastlcm <command>: error: <message>`` (one line) to stderr; return ``code``."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"fastlcm {command}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
