"""Data path: the Rust-backed ShardLoader, the cached-latents LatentShardLoader, their one options object
(``LoaderOptions``), the loader errors, and a slow pure-Python reference reader (a test oracle).

Names are imported lazily so that light users of the package (``fastlcm --help``, ``make-shards``, the config)
do not pay for importing torch: ``LoaderOptions`` and the errors never import it, the loaders do.
"""

from __future__ import annotations

import importlib

_ERRORS = (
    "DecodeError",
    "LatentFormatError",
    "LoaderError",
    "LoaderOptionError",
    "LoaderStateError",
    "NoDataError",
    "ShardNotFoundError",
    "ShardPermissionError",
    "ShardSourceError",
    "TarFormatError",
    "TooManyRejectionsError",
)
_HOMES = {
    **{name: "fastlcm.errors" for name in _ERRORS},
    "LoaderOptions": "fastlcm.data.options",
    "Batch": "fastlcm.data.loader",
    "SampleInfo": "fastlcm.data.loader",
    "ShardLoader": "fastlcm.data.loader",
    "LatentBatch": "fastlcm.data.latents",
    "LatentShardLoader": "fastlcm.data.latents",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'fastlcm.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
