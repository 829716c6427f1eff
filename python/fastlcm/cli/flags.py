"""`fastlcm train`'s flags: TrainConfig from TOML files, packaged presets and command-line flags (one flag per
field, diffusers' names, the field's docstring as its help, its ``Literal`` type as its choices).

Precedence: the dataclass defaults ← ``--config FILE_OR_PRESET`` ← flags given on the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastlcm.config import TrainConfig, field_choices, scalar_type
from fastlcm.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def field_docs() -> dict[str, str]:
    """The attribute docstring of every TrainConfig field (used as --help text)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_toml(source: str | os.PathLike) -> dict[str, Any]:
    """Read a config file (or a packaged preset name such as ``sd15``) → dict of known keys."""
    path = Path(source)
    if not path.is_file():
        if str(source) in preset_names():
            path = PRESETS_DIR / f"{source}.toml"
        else:
            raise ConfigError(f"--config: no such file or preset: {source} (presets: {', '.join(preset_names())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: invalid TOML: {e}") from None
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        want = scalar_type(key)
        if want is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"--config {path}: key {key!r} must be {want.__name__}, got {value!r}")
    return {k: float(v) if scalar_type(k) is float else v for k, v in data.items()}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field. Defaults are suppressed so only flags actually given override the config file."""
    docs, choices = field_docs(), field_choices()
    parser.add_argument("--config", default=None, metavar="FILE_OR_PRESET",
                        help=f"TOML file with the same keys as the flags, or a preset ({', '.join(preset_names())}); "
                             "flags override it")
    for f in fields(TrainConfig):
        t = scalar_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text)
        if t is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        elif t is list:
            parser.add_argument(f"--{f.name}", nargs="+", metavar="TEXT", **kw)
        else:
            parser.add_argument(f"--{f.name}", type=t, choices=choices.get(f.name), **kw)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults ← ``--config`` file/preset ← command-line flags; not yet validated."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_toml(args.config))
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig(**values)


def load_config(argv: list[str]) -> TrainConfig:
    """Parse ``fastlcm train`` arguments into a config as ``fastlcm train`` runs it: validated, checked against the
    teacher, shards and installed packages (preflight), with the family's defaults filled (for tests and scripts)."""
    from fastlcm.training.preflight import preflight  # imports torch (the families): only when a config is loaded

    parser = argparse.ArgumentParser(prog="fastlcm train")
    add_config_arguments(parser)
    cfg = from_args(parser.parse_args(argv)).validate()
    family = preflight(cfg)  # None for a Hub id: its family is read when the run starts
    return cfg if family is None else cfg.with_family_defaults(family)
