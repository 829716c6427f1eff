"""``LoaderOptions``: every knob of the Rust loaders, declared once, with the only Python defaults.

Contract:

- One frozen dataclass holds every option of :class:`fastlcm.data.ShardLoader` and
  :class:`fastlcm.data.LatentShardLoader` (the loaders' keyword arguments are these fields). The trainer builds
  one from its config; the loaders expose the one they run with as ``loader.options``.
- Python checks only **types** (on construction, a one-line :class:`fastlcm.errors.LoaderOptionError` naming the
  field) and resolves the ``None`` "auto" values (:meth:`LoaderOptions.resolve`). Every range and consistency rule
  (``batch_size >= 1``, ``rank < world_size``, the choices of ``crop``/``dtype``/``on_error``, …) is the Rust core's
  (``LoaderConfig::validate``) and is checked when the options become a loader.
- The defaults here equal the core's (``fastlcm._native.loader_defaults()``); a test compares them field by field.

This module imports neither torch nor numpy (the CLI and the config import it).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from fastlcm.errors import LoaderOptionError

__all__ = ["AUTO_FIELDS", "LoaderOptions", "available_cores"]


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """Every option of the Rust loaders (see the module docstring for who checks what)."""

    batch_size: int
    """Samples per batch B; an epoch's final partial batch is dropped (``stats()["skipped"]["partial_batch"]``)."""
    resolution: int = 512
    """Output side R of the square ``[B, 3, R, R]`` pixels (the short side is resized to R, then cropped).
    Unused in raw mode."""
    seed: int = 0
    """Seed of every random choice: shard order, shuffle, resampling, crops and flips (any int; its low 64 bits
    are used). Batches depend only on (shards, seed, rank, world_size, epoch, options), never on ``threads``."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer; 0 reads shards in order (and each shard's members in order)."""
    threads: int | None = None
    """Decode threads; None = one per core this process may run on (raw mode, where the per-sample work is a
    cheap check: ``min(4, cores)``)."""
    rank: int | None = None
    """This process's rank; None = ``$RANK``, else 0. Ranks read disjoint shards."""
    world_size: int | None = None
    """Number of ranks; None = ``$WORLD_SIZE``, else 1."""
    resampled: bool = False
    """Draw shards with replacement from a per-rank seeded stream (an infinite stream; ``epochs`` is unused)."""
    epochs: int | None = 1
    """Passes over the shards; None = forever."""
    crop: Literal["random", "center"] = "random"
    """Where the R×R window is cut from the resized image."""
    random_flip: bool = False
    """Flip each crop horizontally with probability 1/2."""
    dtype: Literal["float32", "bfloat16", "float16", "uint8"] = "float32"
    """Element type of the pixels: floats in [-1, 1]; ``uint8`` 0..255, not normalized. Unused in raw mode."""
    pin_memory: bool | None = None
    """Allocate pixel (and latent) batches in pinned host memory; None = when CUDA is available."""
    on_error: Literal["skip", "raise"] = "skip"
    """A bad shard or sample is skipped and counted in ``stats()["skipped"]`` ("skip"), or raises ("raise")."""
    min_original_width: int = 0
    """Skip samples whose json ``original_width`` is smaller (0 = no filter)."""
    min_original_height: int = 0
    """Skip samples whose json ``original_height`` is smaller (0 = no filter)."""
    max_pwatermark: float | None = None
    """Skip samples whose json ``pwatermark`` is larger (None = no filter)."""
    max_consecutive_rejections: int = 10000
    """Raise :class:`fastlcm.errors.TooManyRejectionsError` after this many skipped samples in a row."""
    dct_scaling: bool = False
    """JPEG: decode at 1/2, 1/4 or 1/8 scale when the scaled short side stays >= 1.25 R (faster, slightly
    different pixels)."""
    prefetch_batches: int = 2
    """Batches decoded ahead of the caller."""
    http_timeout_s: float = 30.0
    """Connect, response and idle timeout of HTTP(S) shards (and the idle timeout of ``pipe:`` output)."""
    http_retries: int = 3
    """Retries per HTTP(S) shard after the first attempt (resuming with a Range request)."""
    raw: bool = False
    """Raw mode (:class:`fastlcm.data.LatentShardLoader`): no image decoding; each sample must have a valid
    ``latent.safetensors`` member and yields its members' bytes."""

    def __post_init__(self) -> None:
        for name, allowed in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not any(_is_instance(value, t) for t in allowed):
                want = " or ".join(_type_name(t) for t in allowed)
                raise LoaderOptionError(
                    f"invalid argument: LoaderOptions.{name} must be {want}, got {value!r} ({type(value).__name__})")

    def resolve(self, *, default_threads: int, cuda_available: bool) -> LoaderOptions:
        """These options with the ``None`` "auto" values made concrete: ``threads`` (``default_threads``),
        ``rank``/``world_size`` (``$RANK``/``$WORLD_SIZE``, else 0/1) and ``pin_memory`` (``cuda_available``;
        ``pin_memory=True`` without CUDA is refused)."""
        pin_memory = cuda_available if self.pin_memory is None else self.pin_memory
        if pin_memory and not cuda_available:
            raise LoaderOptionError("pin_memory=True needs a CUDA device (torch.cuda.is_available() is False)")
        return dataclasses.replace(
            self,
            threads=default_threads if self.threads is None else self.threads,
            rank=_env_int("RANK", 0) if self.rank is None else self.rank,
            world_size=_env_int("WORLD_SIZE", 1) if self.world_size is None else self.world_size,
            pin_memory=pin_memory,
        )


AUTO_FIELDS = ("threads", "rank", "world_size", "pin_memory")
"""Fields whose default ``None`` means "decide at run time" (:meth:`LoaderOptions.resolve`)."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LoaderOptionError(f"environment variable {name}={raw!r} is not an integer") from None


def _allowed_types(annotation: Any) -> tuple[Any, ...]:
    """``int | None`` → (int, None); ``Literal["a", "b"]`` → (str,) (the choices are the core's to check)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    if origin is Literal:
        return tuple({type(choice) for choice in typing.get_args(annotation)})
    return (None,) if annotation is type(None) else (annotation,)


def _is_instance(value: Any, allowed: Any) -> bool:
    if allowed is None:
        return value is None
    if isinstance(value, bool):
        return allowed is bool
    if allowed is float:
        return isinstance(value, (int, float))
    return isinstance(value, allowed)


def _type_name(allowed: Any) -> str:
    if allowed is None:
        return "None"
    return {int: "an int", float: "a number", bool: "a bool"}.get(allowed, f"a {allowed.__name__}")


_FIELD_TYPES: dict[str, tuple[Any, ...]] = {
    name: _allowed_types(hint) for name, hint in typing.get_type_hints(LoaderOptions).items()
}
