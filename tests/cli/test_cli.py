"""The `fastlcm` console script: help lists every subcommand, --version names the Rust core."""

from __future__ import annotations

import shutil
import subprocess
import sys

from fastlcm import native_core_version
from fastlcm.cli import COMMANDS, main


def _run(*argv: str) -> subprocess.CompletedProcess:
    exe = shutil.which("fastlcm")
    cmd = [exe, *argv] if exe else [sys.executable, "-m", "fastlcm", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    names = {"train", "generate", "demo", "eval", "make-shards", "precompute", "bench"}
    for name in names:
        assert name in out.stdout
    assert {c[0] for c in COMMANDS} == names


def test_version_reports_package_and_native_core():
    out = _run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fastlcm ")
    assert f"rust core {native_core_version()}" in out.stdout


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "fastlcm", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "make-shards" in out.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_cli_parser_does_not_import_torch():
    """`fastlcm --help` stays fast: building the parser must not import torch, diffusers, transformers or numpy."""
    code = (
        "import sys; import fastlcm.cli as c; c.build_parser(); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"parser construction imported: {out.stdout.strip()}"
