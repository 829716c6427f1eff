"""What the LCD step is conditioned on (:class:`Conditioning`) and who makes it from captions
(:class:`TextConditioner`, implemented by each model family in :mod:`fastlcm.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


@dataclass
class Conditioning:
    """UNet conditioning for a batch: text embeddings, plus added conditioning for families that use it."""

    prompt_embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __getitem__(self, rows) -> "Conditioning":
        """The conditioning of some samples (``rows``: a slice or an index tensor over the batch)."""
        added = None if self.added is None else {k: v[rows] for k, v in self.added.items()}
        return Conditioning(self.prompt_embeds[rows], added)

    def cat(self, other: "Conditioning") -> "Conditioning":
        added = None if self.added is None else {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.prompt_embeds, other.prompt_embeds]), added)

    def to(self, dtype: torch.dtype) -> "Conditioning":
        added = None if self.added is None else {k: v.to(dtype) for k, v in self.added.items()}
        return Conditioning(self.prompt_embeds.to(dtype), added)

    def unet_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.added is not None:
            kw["added_cond_kwargs"] = self.added
        return kw


class TextConditioner(Protocol):
    """Turns captions into :class:`Conditioning` (SD: one CLIP encoder; SDXL adds a second and time ids).

    ``embed`` gives the tensors that depend only on the captions (what ``fastlcm precompute`` caches, named as in
    the family's ``cached_fields``); ``restore`` turns such tensors plus the batch's per-sample metadata (SDXL:
    original sizes and crops) into the step's conditioning, so ``encode(c, b) == restore(embed(c), b)``.
    ``prepare_unconditional`` computes what ``unconditional`` needs from the encoders (SD: the embedding of ""),
    so that the encoders may leave the device afterwards (cached latents)."""

    def embed(self, captions: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def restore(self, fields: dict[str, torch.Tensor], batch: Any = None) -> Conditioning: ...

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning: ...

    def prepare_unconditional(self) -> None: ...

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning: ...
