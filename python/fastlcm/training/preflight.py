"""What `fastlcm train` checks against the outside world before any model loads: the teacher (a diffusers folder
or a Hub id) and its model family, the VAE, the shard files, and the optional packages the flags ask for.

:meth:`fastlcm.config.TrainConfig.validate` checks the values themselves; :func:`preflight` probes the file system
once and returns the teacher's family, which the caller hands on (``train(cfg, family)``) instead of reading
``model_index.json`` again.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastlcm import _native
from fastlcm.config import TrainConfig
from fastlcm.errors import ConfigError, LoaderOptionError
from fastlcm.families import Family, check_location, detect

REMOTE = ("pipe:", "http://", "https://")


def preflight(cfg: TrainConfig) -> Family | None:
    """Check what ``cfg`` names outside itself; return the teacher's family (None for a Hub id: it is detected when
    the run starts, so this check needs no network). Raises :class:`ConfigError` naming the flag."""
    check_location("--pretrained_teacher_model", cfg.pretrained_teacher_model)
    if cfg.pretrained_vae_model_name_or_path:
        check_location("--pretrained_vae_model_name_or_path", cfg.pretrained_vae_model_name_or_path)
    check_shards("--train_shards_path_or_url", cfg.train_shards_path_or_url)
    packages = [(f"--report_to {r}", r, r) for r in ("wandb", "comet_ml") if r in cfg.trackers]
    if cfg.use_8bit_adam:
        packages.append(("--use_8bit_adam", "bitsandbytes", "bitsandbytes (or pip install 'fastlcm[bnb]')"))
    if cfg.enable_xformers_memory_efficient_attention:
        packages.append(("--enable_xformers_memory_efficient_attention", "xformers", "xformers"))
    for flag, module, install in packages:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{flag} needs {module}: pip install {install}")
    if not Path(cfg.pretrained_teacher_model).expanduser().is_dir():
        return None
    try:
        return detect(cfg.teacher_source())
    except ConfigError as e:
        raise type(e)(f"--pretrained_teacher_model: {e}") from None


def check_shards(flag: str, spec: str) -> list[str]:
    """The shard URLs ``spec`` expands to (the loader's own grammar, bounded); local specs must name at least one
    existing file (URLs and pipe: commands are checked by the loader when it opens them)."""
    try:
        urls = _native.expand_shards(spec)
    except LoaderOptionError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if not urls:
        raise ConfigError(f"{flag} is empty")
    if any(u.startswith(REMOTE) for u in urls):
        return urls
    local = [u.removeprefix("file://").removeprefix("file:") for u in urls]
    if not any(Path(p).expanduser().is_file() for p in local):
        raise ConfigError(f"{flag}: {spec!r} matches no file")
    return urls
