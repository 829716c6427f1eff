"""Data path: the Rust-backed ShardLoader, the cached-latents LatentShardLoader, and a slow pure-Python
reference reader (a test oracle).

Names are imported lazily so that light users of the package (``fastlcm --help``, ``make-shards``) do not pay for
importing torch.
"""

from __future__ import annotations

import importlib

_LATENT_NAMES = ("LatentBatch", "LatentFormatError", "LatentShardLoader")

__all__ = [
    "Batch",
    "DecodeError",
    "LatentBatch",
    "LatentFormatError",
    "LatentShardLoader",
    "LoaderError",
    "NoDataError",
    "ShardLoader",
    "ShardSourceError",
    "TarFormatError",
    "TooManyRejectionsError",
]


def __getattr__(name: str):
    if name in _LATENT_NAMES:
        return getattr(importlib.import_module("fastlcm.data.latents"), name)
    if name in __all__:
        return getattr(importlib.import_module("fastlcm.data.loader"), name)
    raise AttributeError(f"module 'fastlcm.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
