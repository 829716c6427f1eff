"""`fastlcm` command line: one subcommand per module, imported only when that subcommand runs.

Each command module exposes ``add_arguments(parser)`` (must not import torch) and ``run(args) -> int``.
A command whose module has not landed yet still shows in ``--help`` and says so when invoked.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# (name, module, one-line help, issue that delivers it)
COMMANDS: list[tuple[str, str, str, int]] = [
    ("train", "fastlcm.train", "distill a teacher into a Latent Consistency Model (full UNet or LoRA)", 4),
    ("generate", "fastlcm.generate", "sample images from a distilled UNet or LCM-LoRA in 1-8 steps", 7),
    ("demo", "fastlcm.demo", "run the whole product on the embedded tiny default, no downloads", 7),
    ("eval", "fastlcm.evaluate", "distillation quality: few-step samplers vs the teacher's 50-step DDIM", 7),
    ("make-shards", "fastlcm.data.make_shards", "write WebDataset shards from an image folder or synthetic images", 3),
    ("precompute", "fastlcm.precompute", "encode image shards once into latent shards (VAE latents + text embeddings)", 8),
    ("bench", "fastlcm.bench", "benchmarks: loader, kernels, step", 3),
]


def _version_string() -> str:
    from fastlcm import __version__

    try:
        from fastlcm import native_core_version

        core = native_core_version()
    except ImportError:
        core = "not built"
    return f"fastlcm {__version__} (rust core {core}, python {sys.version.split()[0]})"


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlcm",
        description="Fast latent consistency distillation of Stable Diffusion teachers.",
    )
    parser.add_argument("--version", action="version", version=_version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text, issue in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if _module_exists(module):
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            p.set_defaults(_run=_not_implemented(name, issue))
    return parser


def _not_implemented(name: str, issue: int):
    def run(_args) -> int:
        print(f"fastlcm {name}: not implemented yet (tracked in issue {issue})", file=sys.stderr)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
