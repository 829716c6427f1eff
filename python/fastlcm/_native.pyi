"""Typed stub of ``fastlcm._native``, the PyO3 bindings of the Rust core ``fastlcm-data``.

Use :class:`fastlcm.data.ShardLoader` / :class:`fastlcm.data.LatentShardLoader` rather than ``Loader``; the
functions are safe to call anywhere (importing this module imports neither torch nor numpy). Every error the
core raises is one of the :mod:`fastlcm.errors` loader classes, re-exported here as the same objects.
"""

from typing import Any, final

import torch

from fastlcm.data.options import LoaderOptions
from fastlcm.errors import DecodeError as DecodeError
from fastlcm.errors import LatentFormatError as LatentFormatError
from fastlcm.errors import LoaderError as LoaderError
from fastlcm.errors import LoaderOptionError as LoaderOptionError
from fastlcm.errors import LoaderStateError as LoaderStateError
from fastlcm.errors import NoDataError as NoDataError
from fastlcm.errors import ShardNotFoundError as ShardNotFoundError
from fastlcm.errors import ShardPermissionError as ShardPermissionError
from fastlcm.errors import ShardSourceError as ShardSourceError
from fastlcm.errors import TarFormatError as TarFormatError
from fastlcm.errors import TooManyRejectionsError as TooManyRejectionsError

__all__ = [
    "core_version",
    "expand_shards",
    "loader_defaults",
    "Loader",
    "LoaderError",
    "LoaderOptionError",
    "LoaderStateError",
    "ShardSourceError",
    "ShardNotFoundError",
    "ShardPermissionError",
    "TarFormatError",
    "DecodeError",
    "NoDataError",
    "TooManyRejectionsError",
    "LatentFormatError",
]

def core_version() -> str:
    """Version of the Rust core (``fastlcm-data``)."""

def expand_shards(spec: str | list[str]) -> list[str]:
    """The shard URLs a spec (or a list of specs) expands to, exactly as a loader expands them: ``::`` lists
    (empty parts skipped) and brace expansion as webdataset's ``braceexpand``; raises LoaderOptionError naming the
    spec for unbalanced braces, more than 10,000,000 URLs, or no URL at all."""

def loader_defaults() -> dict[str, Any]:
    """The core's default of every option except ``batch_size``, by ``LoaderOptions`` field name."""

@final
class Loader:
    """The Rust loader behind ``ShardLoader`` and ``LatentShardLoader``."""

    def __new__(cls, shards: list[str], options: LoaderOptions) -> Loader:
        """A loader of the spec strings ``shards`` with ``options`` whose "auto" values are resolved
        (``LoaderOptions.resolve``); raises LoaderOptionError naming a bad option."""

    def urls(self) -> list[str]:
        """The expanded shard URLs (all ranks)."""

    def next_batch(
        self, tensor: torch.Tensor
    ) -> (
        tuple[
            list[str],
            list[str],
            list[bytes | None],
            list[tuple[int, int]],
            list[tuple[int, int]],
            list[bool],
            list[str],
        ]
        | None
    ):
        """Writes the next batch into ``tensor`` (CPU, contiguous ``[B, 3, R, R]`` of the loader's dtype; anything
        else raises LoaderOptionError) and returns ``(keys, captions, json_bytes, original_sizes, crop_coords,
        flipped, shards)``, or None at the end. Image mode only."""

    def next_raw_batch(
        self,
    ) -> tuple[list[str], list[str], list[bytes | None], list[dict[str, bytes]], list[str]] | None:
        """Raw mode: ``(keys, captions, json_bytes, members, shards)`` with one ``{extension: bytes}`` dict per
        sample, or None at the end."""

    def state_json(self) -> str:
        """Resume state (version 1 JSON: position and a fingerprint of the stream-defining options)."""

    def load_state_json(self, text: str) -> None:
        """Loads a ``state_json`` of a loader with the same configuration (else LoaderStateError)."""

    def reset(self) -> None:
        """Start over from the beginning."""

    def stats_json(self) -> str:
        """Counters as a JSON object string."""
