"""``fastlcm.data.ShardLoader``: the Rust streaming WebDataset loader as a Python iterable.

All work (reading shards, grouping, shuffling, decoding, resizing, cropping, normalizing) happens in Rust threads
with the GIL released; each batch's pixels are written straight into a freshly allocated (optionally pinned)
torch tensor. See the README section "Data loader" and the contract in the project docs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fastlcm import _native
from fastlcm._native import (  # noqa: F401  (re-exported by fastlcm.data)
    DecodeError,
    LoaderError,
    NoDataError,
    ShardSourceError,
    TarFormatError,
    TooManyRejectionsError,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


@dataclass
class SampleInfo:
    """Per-sample metadata of a batch, samples in stream order (shared by :class:`Batch` and
    :class:`fastlcm.data.LatentBatch`)."""

    keys: list[str]
    """WebDataset key of each sample (member name up to the first dot of its basename, with directories)."""
    captions: list[str]
    """Caption (first of .text/.txt/.caption; latent shards: .txt, else the json's caption), non-UTF-8 bytes
    replaced by U+FFFD."""
    json: list[dict | None]
    """Parsed .json member (None when absent or not a JSON object)."""
    original_sizes: torch.Tensor
    """int64 [B, 2]: (height, width) of the decoded source image."""
    crop_coords: torch.Tensor
    """int64 [B, 2]: (top, left) of the crop in the resized image."""
    flipped: torch.Tensor
    """bool [B]: whether the crop was flipped horizontally."""
    shards: list[str]
    """Shard URL/path each sample came from."""

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Batch(SampleInfo):
    """One fixed-shape batch of images."""

    pixels: torch.Tensor
    """[B, 3, R, R] in the loader's dtype: [-1, 1] (uint8: 0..255, not normalized); pinned if pin_memory."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _storage_refs(t: torch.Tensor) -> int | None:
    """How many tensors share ``t``'s storage (None if this torch lacks the counter)."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return None


class _BufferPool:
    """Reuses unpinned batch tensors nobody references any more.

    A fresh 37 MB ``torch.empty`` per batch costs ~1 ms of page faults per 512 px image on CPU; recycling a
    tensor is safe only when neither a Python reference nor a view/alias of its storage exists, which both
    checks below establish. Pinned tensors are never pooled: torch's caching host allocator already reuses
    them and tracks in-flight asynchronous copies, which this pool could not.
    """

    def __init__(self, size: int):
        self.size = size
        self.items: list[tuple[torch.Tensor, int, int]] = []  # (tensor, baseline refcount, baseline storage refs)

    def get(self, make) -> torch.Tensor:
        for i in range(len(self.items)):
            t, refs, uses = self.items[i]
            if sys.getrefcount(t) == refs and _storage_refs(t) == uses:
                return t
        t = make()
        uses = _storage_refs(t)
        if uses is not None and len(self.items) < self.size:
            # Counted now: the local and the call argument; when checked later the tuple slot adds one.
            refs = sys.getrefcount(t) + 1
            self.items.append((t, refs, uses))
        return t


def _parse_json(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _NativeStream:
    """What both Rust-backed loaders share: argument checks, iteration, fork refusal, resume and stats over a
    ``fastlcm._native.Loader``. A subclass sets ``self._native`` and implements ``next_batch``."""

    _fork_hint = ""

    def _common_args(self, shards, batch_size, seed, shuffle_buffer, threads, rank, world_size, epochs, on_error,
                     pin_memory, default_threads: int) -> list[str]:
        """Check the arguments both loaders take, set the attributes they share; return the shard specs."""
        if isinstance(shards, (str, os.PathLike)):
            specs = [os.fspath(shards)]
        elif isinstance(shards, Sequence) and shards and all(isinstance(s, (str, os.PathLike)) for s in shards):
            specs = [os.fspath(s) for s in shards]
        else:
            raise ValueError(f"shards must be a spec string or a non-empty list of them, got {shards!r}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        self.threads = _check_int("threads", default_threads if threads is None else threads, 1)
        self.rank = _check_int("rank", _env_int("RANK", 0) if rank is None else rank, 0)
        self.world_size = _check_int("world_size", _env_int("WORLD_SIZE", 1) if world_size is None else world_size, 1)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size, got rank={self.rank}, world_size={self.world_size}")
        if epochs is not None:
            _check_int("epochs", epochs, 1)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs a CUDA device (torch.cuda.is_available() is False)")
        self.pin_memory = bool(pin_memory)
        self._pid = os.getpid()
        self._exhausted = False
        return specs

    @property
    def urls(self) -> list[str]:
        """All shard URLs after brace expansion (before the split across ranks)."""
        return self._native.urls()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            raise LoaderError(
                f"{type(self).__name__} was created in process {self._pid} and used in process {os.getpid()} after "
                "a fork; its Rust threads do not exist in the child. Create the loader in the process that iterates "
                f"it{self._fork_hint}."
            )

    def __iter__(self):
        self._check_fork()
        if self._exhausted:
            self._native.reset()
            self._exhausted = False
        return self._batches()

    def _batches(self):
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-serializable position after the last returned batch (plus a fingerprint of the config)."""
        self._check_fork()
        return json.loads(self._native.state_json())

    def load_state_dict(self, state: dict) -> None:
        """Resume a loader with the same configuration exactly after the last batch its state_dict saw."""
        self._check_fork()
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state).__name__}")
        self._native.load_state_json(json.dumps(state))
        self._exhausted = False

    def stats(self) -> dict:
        """Counters: samples read/yielded, batches, bytes, shards opened/failed, skipped by reason, timings_s."""
        return json.loads(self._native.stats_json())


class ShardLoader(_NativeStream):
    """Streams WebDataset tar shards into ready training batches (see the class docs in the README).

    Iterating yields :class:`Batch` objects; the final partial batch of an epoch is dropped (counted in
    ``stats()["skipped"]["partial_batch"]``). Iterating again after the end starts over from the beginning.
    Batches depend only on (shards, seed, rank, world_size, epoch, options), never on ``threads``.
    """

    _fork_hint = " (it needs no DataLoader worker processes)"

    def __init__(
        self,
        shards: str | Sequence[str],
        batch_size: int,
        resolution: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        threads: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        resampled: bool = False,
        epochs: int | None = 1,
        crop: str = "random",
        random_flip: bool = False,
        dtype: str = "float32",
        pin_memory: bool | None = None,
        on_error: str = "skip",
        min_original_width: int = 0,
        min_original_height: int = 0,
        max_pwatermark: float | None = None,
        max_consecutive_rejections: int = 10000,
        dct_scaling: bool = False,
        prefetch_batches: int = 2,
        http_timeout_s: float = 30.0,
        http_retries: int = 3,
    ):
        specs = self._common_args(shards, batch_size, seed, shuffle_buffer, threads, rank, world_size, epochs,
                                  on_error, pin_memory, default_threads=available_cores())
        self.resolution = _check_int("resolution", resolution, 1)
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        _check_int("min_original_width", min_original_width, 0)
        _check_int("min_original_height", min_original_height, 0)
        if max_pwatermark is not None and not isinstance(max_pwatermark, (int, float)):
            raise ValueError(f"max_pwatermark must be a number or None, got {max_pwatermark!r}")
        _check_int("max_consecutive_rejections", max_consecutive_rejections, 1)
        _check_int("prefetch_batches", prefetch_batches, 1)
        _check_int("http_retries", http_retries, 0)
        if not isinstance(http_timeout_s, (int, float)) or not http_timeout_s > 0:
            raise ValueError(f"http_timeout_s must be > 0, got {http_timeout_s!r}")
        self.dtype = _DTYPES[dtype]
        self._pool = None if self.pin_memory else _BufferPool(prefetch_batches + 2)
        self._native = _native.Loader(
            specs,
            self.batch_size,
            self.resolution,
            seed=seed & 0xFFFF_FFFF_FFFF_FFFF,
            shuffle_buffer=shuffle_buffer,
            threads=self.threads,
            rank=self.rank,
            world_size=self.world_size,
            resampled=bool(resampled),
            epochs=epochs,
            crop=crop,
            random_flip=bool(random_flip),
            dtype=dtype,
            on_error=on_error,
            min_original_width=min_original_width,
            min_original_height=min_original_height,
            max_pwatermark=None if max_pwatermark is None else float(max_pwatermark),
            max_consecutive_rejections=max_consecutive_rejections,
            dct_scaling=bool(dct_scaling),
            prefetch_batches=prefetch_batches,
            http_timeout_s=float(http_timeout_s),
            http_retries=http_retries,
        )

    def next_batch(self) -> Batch | None:
        """The next batch, or None at the end of the stream."""
        self._check_fork()
        r = self.resolution
        shape = (self.batch_size, 3, r, r)
        if self._pool is None:
            pixels = torch.empty(shape, dtype=self.dtype, pin_memory=True)
        else:
            pixels = self._pool.get(lambda: torch.empty(shape, dtype=self.dtype))
        # The tensor stays referenced by `pixels` while Rust fills it (GIL released inside).
        meta = self._native.next_batch(pixels.data_ptr(), pixels.numel() * pixels.element_size())
        if meta is None:
            self._exhausted = True
            return None
        keys, captions, raw_json, sizes, crops, flipped, shards = meta
        return Batch(
            pixels=pixels,
            keys=keys,
            captions=captions,
            json=[_parse_json(j) for j in raw_json],
            original_sizes=torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
            crop_coords=torch.tensor(crops, dtype=torch.int64).reshape(-1, 2),
            flipped=torch.tensor(flipped, dtype=torch.bool),
            shards=shards,
        )

    def __repr__(self) -> str:
        return (
            f"ShardLoader({len(self.urls)} shards, batch_size={self.batch_size}, resolution={self.resolution}, "
            f"rank={self.rank}/{self.world_size}, threads={self.threads}, dtype={self.dtype})"
        )
