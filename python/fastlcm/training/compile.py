"""torch.compile for the LCD step's UNet forwards, with a compile cache that outlives /tmp.

:func:`compiled` wraps a module for the step (the module itself stays uncompiled: checkpoints, validation and export
use it); :func:`compile_cache_dir` is where inductor keeps compiled graphs between runs, :func:`compile_notice`
the log line ``fastlcm train`` prints when it compiles.
"""

from __future__ import annotations

import os

import torch

COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _torch_default_cache_dir() -> str:
    """Inductor's own default cache folder (``$TMPDIR/torchinductor_<user>``)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: the same rule
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())
    return default_cache_dir()


def compile_cache_dir() -> str:
    """Where torch.compile keeps its compiled graphs and kernels between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when
    the user set it, else ``$XDG_CACHE_HOME/fastlcm/torchinductor`` (``~/.cache/…``), set for this process.
    Inductor's own default is under /tmp, which job schedulers and containers often wipe; a resumed or repeated run
    then pays the minutes of compilation again. Importing torch._dynamo (diffusers, accelerate and peft all do)
    writes that /tmp default into ``$TORCHINDUCTOR_CACHE_DIR``, so a value equal to it counts as unset. Where the
    home cache cannot be created (a read-only home), inductor's default stays."""
    current = os.environ.get(COMPILE_CACHE_ENV)
    default = _torch_default_cache_dir()
    if not current or os.path.abspath(current) == os.path.abspath(default):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        ours = os.path.join(base, "fastlcm", "torchinductor")
        try:
            os.makedirs(ours, exist_ok=True)
        except OSError:
            ours = default
        os.environ[COMPILE_CACHE_ENV] = ours
    return os.environ[COMPILE_CACHE_ENV]


def compile_cache_state() -> str:
    """What the next torch.compile starts from: ``"cold"`` (nothing in :func:`compile_cache_dir`) or ``"warm (N
    files)"``."""
    n = sum(len(files) for _, _, files in os.walk(compile_cache_dir()))
    return f"warm ({n} file{'s' if n != 1 else ''})" if n else "cold"


def compile_notice(cfg) -> str:
    """One line for the log when --compile_unets is on: what compiles, that the first steps pay for it, and the
    cache it starts from."""
    which = "the student" if cfg.compile_unets == "student" else "the student, teacher and target"
    return (f"torch.compile ({cfg.compile_mode}) of {which}: the first steps compile (minutes when the cache is "
            f"cold); compile cache {compile_cache_dir()}: {compile_cache_state()}")


def compiled(module, mode: str):
    """A torch.compile wrapper of ``module`` for the LCD step's forwards; ``module`` itself stays uncompiled (its
    state_dict, checkpoints, validation and export are unchanged). Compiled artifacts persist in
    :func:`compile_cache_dir`."""
    compile_cache_dir()
    return torch.compile(module, mode=None if mode == "default" else mode)
