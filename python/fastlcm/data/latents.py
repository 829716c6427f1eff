"""``fastlcm.data.LatentShardLoader``: batches of cached VAE latents and text embeddings (``fastlcm precompute``).

The Rust core runs in raw mode: it streams, groups, shuffles, splits by rank, checks each sample's
``latent.safetensors`` framing in its worker threads and hands over the members' bytes, with the same order,
resume and stats semantics as :class:`fastlcm.data.ShardLoader`. This module parses the tensors
(``safetensors.torch.load``), checks them against the format and the caller's expectations, and stacks them into
float32 batches.

Latent shard format (one sample per source image; see the README section "Cached latents"):

- ``KEY.latent.safetensors``: ``mean`` and ``std`` [4, R/8, R/8] (the VAE posterior of the crop, unscaled),
  ``prompt_embeds`` [77, D], SDXL also ``pooled_embeds`` [1280]; metadata ``format=fastlcm-latents-1``,
  ``family`` (a registered family's name: sd|sdxl), ``resolution``, ``teacher``, ``scaling_factor``.
- ``KEY.json``: ``caption``, ``original_size`` [h, w], ``crop`` [top, left], ``flipped``, ``resolution``,
  ``source_shard``, ``source_key``. ``KEY.txt``: the caption.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fastlcm.data.loader import SampleInfo, _NativeStream, _option_keywords, _parse_json
from fastlcm.data.options import LoaderOptions, available_cores
from fastlcm.errors import DecodeError, LatentFormatError, LoaderOptionError
from fastlcm.families import FAMILIES

FORMAT = "fastlcm-latents-1"
"""Value of the ``format`` metadata key of every latent file this version reads and writes."""
LATENT_EXT = "latent.safetensors"


@dataclass
class LatentBatch(SampleInfo):
    """One fixed-shape batch of cached latents (original_sizes / crop_coords / flipped come from each sample's
    json: the source image and the crop that was encoded)."""

    latent_mean: torch.Tensor
    """float32 [B, 4, R/8, R/8]: VAE posterior mean (unscaled); pinned if pin_memory."""
    latent_std: torch.Tensor
    """float32 [B, 4, R/8, R/8]: VAE posterior standard deviation (unscaled)."""
    prompt_embeds: torch.Tensor
    """float32 [B, 77, D]: the teacher's text embeddings of the caption (SDXL: D = both encoders)."""
    pooled_embeds: torch.Tensor | None
    """float32 [B, P] pooled text embeddings (SDXL), None for SD."""


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file's bytes (``{}`` when absent)."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not a JSON object")
    return meta


@dataclass
class _Sample:
    family: str
    resolution: int
    tensors: dict[str, torch.Tensor]
    meta_json: dict
    caption: str


class LatentShardLoader(_NativeStream):
    """Streams latent shards written by ``fastlcm precompute`` into :class:`LatentBatch` objects.

    Options mean what they mean for :class:`fastlcm.data.ShardLoader` (the same :class:`LoaderOptions`, run with
    ``raw=True``; ``resolution``, ``crop``, ``random_flip``, ``dtype`` and ``dct_scaling`` are unused, and
    ``threads`` defaults to ``min(4, cores)``: the per-sample work is a cheap check). ``on_error="skip"`` skips and
    counts samples whose safetensors member is damaged (``stats()["skipped"]["corrupt_latent"]``) or missing
    (``missing_latent``); ``"raise"`` raises :class:`LatentFormatError` naming the shard and member. A sample
    that is well-formed but of another format, family or resolution than ``expect_family`` /
    ``expect_resolution`` (or than the first sample, when they are None) is a configuration error: it always
    raises :class:`LatentFormatError` naming the shard and key.
    """

    @_option_keywords
    def __init__(self, shards: str | Sequence[str], batch_size: int, *, expect_family: str | None = None,
                 expect_resolution: int | None = None, **options: Any):
        """The keyword arguments besides ``expect_*`` are the fields of :class:`fastlcm.data.LoaderOptions`."""
        self._setup(shards, LoaderOptions(batch_size=batch_size, **options), expect_family, expect_resolution)

    @classmethod
    def from_options(cls, shards: str | Sequence[str], options: LoaderOptions, *, expect_family: str | None = None,
                     expect_resolution: int | None = None) -> LatentShardLoader:
        """A loader of ``shards`` with ``options`` (run with ``raw=True``, whatever ``options.raw`` says)."""
        loader = cls.__new__(cls)
        loader._setup(shards, options, expect_family, expect_resolution)
        return loader

    def _setup(self, shards: Any, options: LoaderOptions, expect_family: str | None,
               expect_resolution: int | None) -> None:
        if expect_family is not None and expect_family not in FAMILIES:
            raise LoaderOptionError(f"expect_family must be one of {tuple(FAMILIES)} or None, got {expect_family!r}")
        if expect_resolution is not None and (isinstance(expect_resolution, bool)
                                              or not isinstance(expect_resolution, int) or expect_resolution < 8):
            raise LoaderOptionError(f"expect_resolution must be an int >= 8 or None, got {expect_resolution!r}")
        self.expect_family, self.expect_resolution = expect_family, expect_resolution
        self._layout: dict[str, tuple] | None = None  # tensor shapes of the first sample; every later one must match
        self._layout_from = ""
        if isinstance(options, LoaderOptions):
            options = dataclasses.replace(options, raw=True)
        self._open(shards, options, default_threads=min(4, available_cores()))

    def _parse(self, members: dict[str, bytes], raw_json: bytes | None, caption: str, key: str,
               shard: str) -> _Sample:
        def fail(why: str) -> LatentFormatError:
            return LatentFormatError(f"{shard}: sample {key!r} ({key}.{LATENT_EXT}): {why}")

        data = members[LATENT_EXT]
        try:
            meta = read_metadata(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise fail(f"unreadable safetensors header: {e}") from None
        if meta.get("format") != FORMAT:
            raise fail(f"metadata format is {meta.get('format')!r}, expected {FORMAT!r} "
                       "(latent shards are written by `fastlcm precompute`)")
        family, res_text = meta.get("family"), meta.get("resolution", "")
        if family not in FAMILIES:
            raise fail(f"metadata family is {family!r}, expected one of {tuple(FAMILIES)}")
        if not res_text.isdigit() or int(res_text) % 8 or int(res_text) == 0:
            raise fail(f"metadata resolution {res_text!r} is not a positive multiple of 8")
        resolution = int(res_text)
        if self.expect_family is not None and family != self.expect_family:
            raise fail(f"family {family!r} but the loader expects {self.expect_family!r} "
                       "(these latents come from another teacher family)")
        if self.expect_resolution is not None and resolution != self.expect_resolution:
            raise fail(f"resolution {resolution} but the loader expects {self.expect_resolution} "
                       "(precompute again with --resolution, or train at the cached resolution)")
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise fail(f"cannot load tensors: {e}") from None
        cached = FAMILIES[family].cached_fields  # the text fields this family's precompute writes
        need = ["mean", "std", *cached]
        missing = [n for n in need if n not in tensors]
        if missing:
            raise fail(f"missing tensor(s) {missing} (has {sorted(tensors)})")
        lat = (FAMILIES[family].latent_channels, resolution // 8, resolution // 8)
        for name, ok, want in [
            ("mean", tuple(tensors["mean"].shape) == lat, f"{list(lat)}"),
            ("std", tuple(tensors["std"].shape) == lat, f"{list(lat)}"),
            ("prompt_embeds", tensors["prompt_embeds"].ndim == 2, "[tokens, dim]"),
            ("pooled_embeds", "pooled_embeds" not in cached or tensors["pooled_embeds"].ndim == 1, "[dim]"),
        ]:
            if not ok:
                raise fail(f"tensor {name} has shape {list(tensors[name].shape)}, expected {want}")
        info = _parse_json(raw_json)
        if info is None:
            raise fail("missing or unreadable .json member (needs original_size, crop, flipped)")
        try:
            sizes = [int(v) for v in info["original_size"]]
            crop = [int(v) for v in info["crop"]]
            flipped = bool(info.get("flipped", False))
            if len(sizes) != 2 or len(crop) != 2:
                raise ValueError("original_size and crop must have two values")
        except (KeyError, TypeError, ValueError) as e:
            raise fail(f".json member lacks a valid original_size / crop: {e}") from None
        info = {**info, "original_size": sizes, "crop": crop, "flipped": flipped}
        if not caption and isinstance(info.get("caption"), str):
            caption = info["caption"]
        return _Sample(family, resolution, tensors, info, caption)

    def _check_layout(self, s: _Sample, key: str, shard: str) -> None:
        layout = {"family": (s.family,), "resolution": (s.resolution,),
                  **{n: tuple(t.shape) for n, t in s.tensors.items() if n in
                     ("mean", "std", "prompt_embeds", "pooled_embeds")}}
        if self._layout is None:
            self._layout, self._layout_from = layout, f"{shard}: sample {key!r}"
        elif layout != self._layout:
            diff = {k: (layout.get(k), self._layout.get(k)) for k in set(layout) | set(self._layout)
                    if layout.get(k) != self._layout.get(k)}
            raise LatentFormatError(
                f"{shard}: sample {key!r} ({key}.{LATENT_EXT}) does not match the earlier samples "
                f"(first seen: {self._layout_from}): (this, earlier) = {diff}; mixed teachers or resolutions "
                "in one latent dataset are not supported")

    def next_batch(self) -> LatentBatch | None:
        """The next batch, or None at the end of the stream."""
        try:
            meta = self._native.next_raw_batch()
        except DecodeError as e:
            raise LatentFormatError(str(e)) from e
        if meta is None:
            self._exhausted = True
            return None
        keys, captions, raw_json, members, shards = meta
        samples = []
        for i, key in enumerate(keys):
            s = self._parse(members[i], raw_json[i], captions[i], key, shards[i])
            self._check_layout(s, key, shards[i])
            samples.append(s)
        b = len(samples)

        def stack(name: str) -> torch.Tensor:
            shape = (b, *samples[0].tensors[name].shape)
            out = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin_memory)
            for i, s in enumerate(samples):
                out[i].copy_(s.tensors[name])
            return out

        return LatentBatch(
            latent_mean=stack("mean"),
            latent_std=stack("std"),
            prompt_embeds=stack("prompt_embeds"),
            pooled_embeds=stack("pooled_embeds") if "pooled_embeds" in FAMILIES[samples[0].family].cached_fields
            else None,
            keys=keys,
            captions=[s.caption for s in samples],
            json=[s.meta_json for s in samples],
            original_sizes=torch.tensor([s.meta_json["original_size"] for s in samples], dtype=torch.int64),
            crop_coords=torch.tensor([s.meta_json["crop"] for s in samples], dtype=torch.int64),
            flipped=torch.tensor([s.meta_json["flipped"] for s in samples], dtype=torch.bool),
            shards=shards,
        )

    def stats(self) -> dict[str, Any]:
        """Counters as ShardLoader's; ``skipped`` has ``corrupt_latent`` / ``missing_latent`` instead of the
        image reasons (and no ``missing_caption``: a caption is optional here)."""
        return json.loads(self._native.stats_json())

    def __repr__(self) -> str:
        return (f"LatentShardLoader({len(self.urls)} shards, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, threads={self.threads})")
