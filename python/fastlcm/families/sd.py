"""Stable Diffusion 1.x / 2.x: one CLIP text encoder (last hidden states), a 4-channel VAE,
``StableDiffusionPipeline``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fastlcm.families.base import Teacher, UNetFamily
from fastlcm.lcd.conditioning import Conditioning


class SDTextConditioner:
    """SD 1.x / 2.x: CLIP last hidden states; c∅ = the embedding of "" (computed once, broadcast)."""

    def __init__(self, tokenizer, text_encoder, device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, torch.device(device)
        self._null: torch.Tensor | None = None

    @torch.no_grad()
    def embed(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return {"prompt_embeds": self.text_encoder(ids)[0]}

    def restore(self, fields: dict[str, torch.Tensor], batch: Any = None) -> Conditioning:
        return Conditioning(fields["prompt_embeds"])

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning:
        return self.restore(self.embed(captions), batch)

    def prepare_unconditional(self) -> None:
        if self._null is None:
            self._null = self.embed([""])["prompt_embeds"]

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning:
        self.prepare_unconditional()
        return Conditioning(self._null.expand(batch_size, -1, -1))


class SDFamily(UNetFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    default_w_min = 5.0  # diffusers' train_lcm_distill_sd_wds.py
    cached_fields = ("prompt_embeds",)
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    vae_bf16_safe = True

    def conditioner(self, teacher: Teacher, device, resolution: int | None = None,
                    fix_crop_and_size: bool = False) -> SDTextConditioner:
        return SDTextConditioner(teacher.tokenizer, teacher.text_encoder, device)

    def pipeline(self, teacher: Teacher, unet, scheduler):
        """A stock ``StableDiffusionPipeline`` around ``unet`` (no safety checker), progress bar off."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
