"""`fastlcm bench loader|kernels|step`: benchmarks that print what they measured and on which machine.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int`` like the top-level commands.
"""

from __future__ import annotations

import importlib
import importlib.util

BENCHES: list[tuple[str, str, str, int]] = [
    ("loader", "fastlcm.bench.loader", "images/s of the Rust loader (optionally vs webdataset + PIL)", 3),
    ("kernels", "fastlcm.bench.kernels", "Triton loss/solver kernels vs eager torch and torch.compile (GPU)", 5),
    ("step", "fastlcm.bench.step", "LCD training-step throughput and per-part breakdown (GPU)", 8),
]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module, help_text, issue in BENCHES:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if importlib.util.find_spec(module) is not None:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_bench_run=mod.run)
        else:
            p.set_defaults(_bench_run=_not_implemented(name, issue))


def _not_implemented(name: str, issue: int):
    def run(_args) -> int:
        import sys

        print(f"fastlcm bench {name}: not implemented yet (tracked in issue {issue})", file=sys.stderr)
        return 2

    return run


def run(args) -> int:
    return int(args._bench_run(args) or 0)
