"""`fastlcm bench loader|kernels|step`: benchmarks that print what they measured and on which machine.

Each benchmark module in :mod:`fastlcm.bench` declares its own flags (``add_arguments``, torch-free like every
command's) and ``run(args) -> int``; this module only dispatches to them.
"""

from __future__ import annotations

import importlib

# (name, module, one-line help)
BENCHES: list[tuple[str, str, str]] = [
    ("loader", "fastlcm.bench.loader", "images/s of the Rust loader (optionally vs webdataset + PIL)"),
    ("kernels", "fastlcm.bench.kernels", "Triton loss/solver kernels vs eager torch and torch.compile (GPU)"),
    ("step", "fastlcm.bench.step", "LCD training-step throughput and per-part breakdown (GPU)"),
]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module, help_text in BENCHES:
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args) -> int:
    return int(args._bench_run(args) or 0)
