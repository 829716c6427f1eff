"""What every benchmark shares: the machine/commit/date stamp of its rows (:func:`machine_info`) and the one way
rows are appended to ``benches/results/*.csv`` (:func:`csv_header_error` before measuring, :func:`append_csv`
after)."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the source tree (+dirty); ``$FASTLCM_COMMIT`` wins (an installed wheel has no .git)."""
    if os.environ.get("FASTLCM_COMMIT"):
        return os.environ["FASTLCM_COMMIT"]
    root = Path(__file__).resolve().parents[3]  # the source tree: python/fastlcm/bench/
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def csv_header_error(path: str | None, columns) -> str | None:
    """Why rows with ``columns`` cannot be appended to the CSV at ``path`` (its header names other columns), else
    None. Benchmarks check this before measuring, so that a long run is not lost at the end."""
    p = Path(path) if path else None
    if p is None or not p.is_file() or p.stat().st_size == 0:
        return None
    with p.open(newline="") as f:
        header = next(csv.reader(f), [])
    if header == list(columns):
        return None
    missing, extra = [c for c in columns if c not in header], [c for c in header if c not in columns]
    return (f"{path}: its header does not match this version's columns (missing {missing or 'none'}, unknown "
            f"{extra or 'none'}{', different order' if not (missing or extra) else ''}); append to a new file")


def append_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new); None/missing stay empty. A file
    whose header names other columns is left untouched: ValueError (see :func:`csv_header_error`)."""
    error = csv_header_error(path, columns)
    if error:
        raise ValueError(error)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.exists() or p.stat().st_size == 0
    with p.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
