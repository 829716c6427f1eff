"""``fastlcm.data.ShardLoader``: the Rust streaming WebDataset loader as a Python iterable.

All work (reading shards, grouping, shuffling, decoding, resizing, cropping, normalizing) happens in Rust threads
with the GIL released; each batch's pixels are written straight into a freshly allocated (optionally pinned)
torch tensor, which the Rust side checks (CPU, contiguous, dtype, size) before writing. See the README section
"Data loader" and the contract in the project docs.

Options are one :class:`fastlcm.data.LoaderOptions` (the keyword arguments of the loaders are its fields, and
``loader.options`` is the resolved one the loader runs with); the Rust core checks their ranges. A loader belongs to
the process that created it: used after a fork it raises :class:`fastlcm.errors.LoaderError` (the core checks).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fastlcm import _native
from fastlcm.data.options import LoaderOptions, available_cores
from fastlcm.errors import LoaderOptionError, LoaderStateError


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


def _shard_specs(shards: Any) -> list[str]:
    """A spec string / path, or a sequence of them, as the list of spec strings the core expands."""
    if isinstance(shards, (str, os.PathLike)):
        return [os.fspath(shards)]
    if isinstance(shards, Sequence) and all(isinstance(s, (str, os.PathLike)) for s in shards):
        return [os.fspath(s) for s in shards]
    raise LoaderOptionError(f"invalid argument: shards must be a spec string or a list of them, got {shards!r}")


def _option_keywords(init: Callable) -> Callable:
    """Gives ``init(self, ..., **options)`` a signature that lists the :class:`LoaderOptions` fields (but ``raw``,
    which the class decides) as keywords with their defaults, for ``help()`` and editors; the defaults stay
    written only in LoaderOptions."""
    sig = inspect.signature(init)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params} | {"raw"}
    for f in dataclasses.fields(LoaderOptions):
        if f.name not in taken:
            default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=f.type))
    init.__signature__ = sig.replace(parameters=params)
    return init


class _NativeStream:
    """What both Rust-backed loaders share: options, iteration, resume and stats over a ``fastlcm._native.Loader``.
    A subclass calls ``_open`` and implements ``next_batch``."""

    options: LoaderOptions
    """The options this loader runs with, "auto" values resolved (threads, rank, world_size, pin_memory)."""

    def _open(self, shards: Any, options: LoaderOptions, default_threads: int) -> None:
        """Resolve the options and create the Rust loader (which checks them)."""
        if not isinstance(options, LoaderOptions):
            raise LoaderOptionError(f"invalid argument: options must be a LoaderOptions, got {type(options).__name__}")
        self.options = options.resolve(default_threads=default_threads, cuda_available=torch.cuda.is_available())
        self._native = _native.Loader(_shard_specs(shards), self.options)
        self._exhausted = False

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self.options.batch_size

    @property
    def threads(self) -> int:
        """Decode threads."""
        return self.options.threads

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.options.rank

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.options.world_size

    @property
    def pin_memory(self) -> bool:
        """Whether batches are allocated in pinned host memory."""
        return self.options.pin_memory

    @property
    def urls(self) -> list[str]:
        """All shard URLs after brace expansion (before the split across ranks)."""
        return self._native.urls()

    def __iter__(self):
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
        return json.loads(self._native.state_json())

    def load_state_dict(self, state: dict) -> None:
        """Resume a loader with the same configuration exactly after the last batch its state_dict saw; a state
        of another configuration raises :class:`fastlcm.errors.LoaderStateError` naming the differing option."""
        if not isinstance(state, dict):
            raise LoaderStateError(f"state_dict must be a dict, got {type(state).__name__}")
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

    @_option_keywords
    def __init__(self, shards: str | Sequence[str], batch_size: int, resolution: int, **options: Any):
        """``shards``: spec string(s) (brace patterns, ``::`` lists, paths, file://, http(s)://, pipe:CMD).
        The keyword arguments are the fields of :class:`fastlcm.data.LoaderOptions` (except ``raw``)."""
        self._setup(shards, LoaderOptions(batch_size=batch_size, resolution=resolution, **options))

    @classmethod
    def from_options(cls, shards: str | Sequence[str], options: LoaderOptions) -> ShardLoader:
        """A loader of ``shards`` with ``options`` (which must have ``raw=False``)."""
        loader = cls.__new__(cls)
        loader._setup(shards, options)
        return loader

    def _setup(self, shards: Any, options: LoaderOptions) -> None:
        if isinstance(options, LoaderOptions) and options.raw:
            raise LoaderOptionError("invalid argument: raw=True options are for LatentShardLoader (ShardLoader "
                                    "decodes images)")
        self._open(shards, options, default_threads=available_cores())
        self.dtype: torch.dtype = getattr(torch, self.options.dtype)  # the pixels' dtype (a name the core accepted)
        self._pool = None if self.pin_memory else _BufferPool(self.options.prefetch_batches + 2)

    @property
    def resolution(self) -> int:
        """Output side R."""
        return self.options.resolution

    def next_batch(self) -> Batch | None:
        """The next batch, or None at the end of the stream."""
        r = self.resolution
        shape = (self.batch_size, 3, r, r)
        if self._pool is None:
            pixels = torch.empty(shape, dtype=self.dtype, pin_memory=True)
        else:
            pixels = self._pool.get(lambda: torch.empty(shape, dtype=self.dtype))
        # Rust checks the tensor (CPU, contiguous, dtype, size) and fills it with the GIL released.
        meta = self._native.next_batch(pixels)
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
