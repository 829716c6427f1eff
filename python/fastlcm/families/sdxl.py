"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states, pooled from the second), size and crop
micro-conditioning (``add_time_ids``), a VAE that overflows in half precision, ``StableDiffusionXLPipeline``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fastlcm.errors import ConfigError
from fastlcm.families.base import ModelSource, Teacher, UNetFamily
from fastlcm.lcd.conditioning import Conditioning


class SDXLTextConditioner:
    """SDXL: penultimate hidden states of both CLIP encoders, concatenated; pooled embeddings from the second;
    ``add_time_ids`` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample — height first — from
    the loader's ``original_sizes`` (h, w) and ``crop_coords`` (top, left). c∅ = zero embeddings and zero pooled
    embeddings with the same time ids (the diffusers SDXL LCM scripts' unconditional input).

    ``fix_crop_and_size`` (--use_fix_crop_and_size): original size (R, R) and crop (0, 0) for every sample.
    """

    def __init__(self, tokenizers, text_encoders, device, resolution: int, fix_crop_and_size: bool = False):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.device, self.resolution, self.fix = torch.device(device), resolution, fix_crop_and_size
        self._zeros: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def embed(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's is kept)
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_embeds": pooled}

    def time_ids(self, batch: Any, batch_size: int) -> torch.Tensor:
        """[B, 6] float32: original (h, w), crop (top, left), target (h, w)."""
        r = self.resolution
        if self.fix:
            row = torch.tensor([r, r, 0, 0, r, r], dtype=torch.float32)
            return row.expand(batch_size, 6).clone().to(self.device)
        sizes, crops = getattr(batch, "original_sizes", None), getattr(batch, "crop_coords", None)
        if sizes is None or crops is None:
            raise ValueError("SDXL conditioning needs the batch's original_sizes and crop_coords "
                             "(fastlcm.data.ShardLoader provides them), or --use_fix_crop_and_size")
        sizes, crops = torch.as_tensor(sizes).reshape(-1, 2), torch.as_tensor(crops).reshape(-1, 2)
        if sizes.shape[0] != batch_size or crops.shape[0] != batch_size:
            raise ValueError(f"batch has {batch_size} captions but {sizes.shape[0]} original_sizes / "
                             f"{crops.shape[0]} crop_coords")
        target = torch.tensor([[r, r]], dtype=torch.int64).expand(batch_size, 2)
        return torch.cat([sizes, crops, target], dim=1).to(self.device, torch.float32)

    def restore(self, fields: dict[str, torch.Tensor], batch: Any = None) -> Conditioning:
        embeds, pooled = fields["prompt_embeds"], fields["pooled_embeds"]
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": self.time_ids(batch, embeds.shape[0])})

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning:
        return self.restore(self.embed(captions), batch)

    def prepare_unconditional(self) -> None:
        dtype = next(self.text_encoders[-1].parameters()).dtype
        if self._zeros is None or self._zeros[0].dtype != dtype:  # allocated once; broadcast to the batch
            dims = sum(e.config.hidden_size for e in self.text_encoders)
            seq = self.tokenizers[0].model_max_length
            pooled_dim = self.text_encoders[-1].config.projection_dim
            self._zeros = (torch.zeros(1, seq, dims, device=self.device, dtype=dtype),
                           torch.zeros(1, pooled_dim, device=self.device, dtype=dtype))

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning:
        self.prepare_unconditional()
        zeros, pooled = self._zeros
        added = {"text_embeds": pooled.expand(batch_size, -1), "time_ids": self.time_ids(batch, batch_size)}
        return Conditioning(zeros.expand(batch_size, -1, -1), added)


class SDXLFamily(UNetFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_w_min = 3.0  # diffusers' train_lcm_distill_sdxl_wds.py
    cached_fields = ("prompt_embeds", "pooled_embeds")
    text_parts = (("tokenizer", "text_encoder", "CLIPTextModel"),
                  ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    vae_bf16_safe = False

    def check_unet(self, unet, source: ModelSource) -> None:
        if unet.config.addition_embed_type != "text_time":
            raise ConfigError(f"{source.path}: an SDXL pipeline whose UNet has no text_time conditioning "
                              f"(addition_embed_type={unet.config.addition_embed_type!r})")

    def conditioner(self, teacher: Teacher, device, resolution: int | None = None,
                    fix_crop_and_size: bool = False) -> SDXLTextConditioner:
        if resolution is None:
            resolution = teacher.unet.config.sample_size * 8
        return SDXLTextConditioner(teacher.tokenizers, teacher.text_encoders, device, resolution, fix_crop_and_size)

    def pipeline(self, teacher: Teacher, unet, scheduler):
        """A stock ``StableDiffusionXLPipeline`` around ``unet``; the empty negative prompt is zero embeddings, as
        in training. Progress bar off."""
        from diffusers import StableDiffusionXLPipeline

        enc, enc2 = teacher.text_encoders
        tok, tok2 = teacher.tokenizers
        pipe = StableDiffusionXLPipeline(vae=teacher.vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe
