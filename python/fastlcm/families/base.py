"""What every model family provides (:class:`Family`), the loaded :class:`Teacher`, and where it comes from
(:class:`ModelSource`); :class:`UNetFamily` is the shared implementation of the latent-diffusion UNet families
(SD 1.x/2.x and SDXL: AutoencoderKL + CLIP text encoders + UNet2DConditionModel + a DDPM schedule).

A family answers every question that differs between teachers, so the trainer, ``precompute``, ``eval``,
``generate``, validation, export, the latent loader and ``bench step`` never test a family's name:

- which ``model_index.json`` pipeline classes it is (:attr:`Family.pipeline_classes`) and which stock diffusers
  pipeline samples its students (:meth:`Family.pipeline_class`, :meth:`Family.pipeline`);
- how its frozen parts load (:meth:`Family.load`) and where they go in which dtype (:meth:`Family.place`);
- how captions become UNet conditioning (:meth:`Family.conditioner`) and what of that ``fastlcm precompute`` caches
  (:attr:`Family.cached_fields`, with the latent channels :attr:`Family.latent_channels`);
- its defaults (:attr:`Family.default_w_min`, :attr:`Family.lora_target_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from fastlcm.lcd.conditioning import TextConditioner

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a teacher comes from: a local diffusers pipeline folder or a Hub model id."""

    path: str
    """Local folder or Hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    cache_dir: str | None = None
    """Where downloaded models are cached."""
    vae: str | None = None
    """A VAE folder / Hub id to use instead of the teacher's (an fp16-safe VAE, say)."""
    local_files_only: bool = False
    """Never contact the Hub."""

    def is_local(self) -> bool:
        return Path(self.path).expanduser().is_dir()

    def part(self, subfolder: str) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments for one subfolder of the pipeline."""
        kw: dict[str, Any] = dict(pretrained_model_name_or_path=self.path, subfolder=subfolder,
                                  revision=self.revision, cache_dir=self.cache_dir)
        if self.local_files_only:
            kw["local_files_only"] = True
        return kw


@dataclass
class Teacher:
    """The frozen parts loaded from a teacher folder (on CPU, fp32 unless loaded with a dtype, no grad, eval).

    ``unet`` is None when loaded without it (``fastlcm precompute`` needs only the VAE and text encoders)."""

    family: "Family"
    unet: Any
    vae: Any
    text_encoders: tuple
    tokenizers: tuple
    noise_scheduler: Any
    """The teacher's training schedule as a DDPMScheduler (its alphas_cumprod and prediction_type)."""
    scheduler_config: dict
    source: ModelSource | None = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def text_encoder(self):
        """The first (or only) text encoder."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def frozen_modules(self) -> list:
        """The parts the step does not train: VAE, text encoders and the teacher UNet (when loaded)."""
        return [m for m in (self.vae, *self.text_encoders, self.unet) if m is not None]

    def conditioner(self, device, resolution: int | None = None, fix_crop_and_size: bool = False) -> TextConditioner:
        """This family's :class:`~fastlcm.lcd.conditioning.TextConditioner` on ``device``."""
        return self.family.conditioner(self, device, resolution, fix_crop_and_size)


class Family(Protocol):
    """What fastlcm needs to know about a family of teachers (see the module docstring)."""

    name: str
    """Short name: "sd", "sdxl" (written into latent shards and exported metadata)."""
    pipeline_classes: tuple[str, ...]
    """``model_index.json`` ``_class_name`` values of this family; the first is the pipeline it builds."""
    latent_channels: int
    """Channels of the VAE latents (4 for SD / SDXL)."""
    default_w_min: float
    """Default lower end of the sampled guidance scale (diffusers' scripts: 5 SD, 3 SDXL)."""
    lora_target_modules: tuple[str, ...]
    """Module names LCM-LoRA adapts by default."""
    cached_fields: tuple[str, ...]
    """Text-conditioning tensors ``fastlcm precompute`` stores per sample (besides the latent mean and std)."""

    def load(self, source: ModelSource, *, unet: bool = True, dtype: torch.dtype | None = None) -> Teacher: ...

    def place(self, teacher: Teacher, device, dtype: torch.dtype, *, vae_replaced: bool = False,
              cast_unet: bool = False) -> dict[str, torch.dtype]: ...

    def conditioner(self, teacher: Teacher, device, resolution: int | None = None,
                    fix_crop_and_size: bool = False) -> TextConditioner: ...

    def native_resolution(self, source: ModelSource) -> int: ...

    def pipeline_class(self) -> type: ...

    def pipeline(self, teacher: Teacher, unet, scheduler) -> Any: ...


def frozen(module):
    """``module`` with gradients off and in eval mode (None passes through)."""
    if module is not None:
        module.requires_grad_(False)
        module.eval()
    return module


class UNetFamily:
    """The latent-diffusion UNet families: AutoencoderKL, CLIP tokenizers/encoders in the subfolders named by
    :attr:`text_parts`, ``UNet2DConditionModel`` and the teacher's schedule as a ``DDPMScheduler``."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    latent_channels: ClassVar[int] = 4
    default_w_min: ClassVar[float]
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
    )  # fmt: skip
    cached_fields: ClassVar[tuple[str, ...]]
    text_parts: ClassVar[tuple[tuple[str, str, str], ...]]
    """(tokenizer subfolder, text encoder subfolder, transformers class name) per text encoder."""
    vae_bf16_safe: ClassVar[bool]
    """Whether the family's VAE may run in bf16 (the SDXL VAE overflows in half precision)."""

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.pipeline_classes[0]}>"

    def load(self, source: ModelSource, *, unet: bool = True, dtype: torch.dtype | None = None) -> Teacher:
        """Tokenizers, text encoders, VAE (``source.vae`` when given), UNet and schedule, frozen, on CPU."""
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        typed = {"torch_dtype": dtype or torch.float32}  # not the checkpoint's dtype (transformers' "auto")
        scheduler = DDPMScheduler.from_pretrained(**source.part("scheduler"))
        tokenizers, encoders = [], []
        for tok_dir, enc_dir, enc_class in self.text_parts:
            tokenizers.append(transformers.CLIPTokenizer.from_pretrained(**source.part(tok_dir)))
            encoders.append(frozen(getattr(transformers, enc_class).from_pretrained(**source.part(enc_dir), **typed)))
        if source.vae:  # a standalone VAE folder / id, at its own default revision
            vae_kw = dict(pretrained_model_name_or_path=source.vae, cache_dir=source.cache_dir)
            vae_kw.update({"local_files_only": True} if source.local_files_only else {})
        else:
            vae_kw = source.part("vae")
        vae = frozen(AutoencoderKL.from_pretrained(**vae_kw, **typed))
        net = frozen(UNet2DConditionModel.from_pretrained(**source.part("unet"), **typed)) if unet else None
        if net is not None:
            self.check_unet(net, source)
        return Teacher(self, net, vae, tuple(encoders), tuple(tokenizers), scheduler, dict(scheduler.config), source)

    def check_unet(self, unet, source: ModelSource) -> None:
        """Raise ConfigError when the loaded UNet does not fit the family (SDXL: its text_time conditioning)."""

    def place(self, teacher: Teacher, device, dtype: torch.dtype, *, vae_replaced: bool = False,
              cast_unet: bool = False) -> dict[str, torch.dtype]:
        """Move the frozen parts to ``device`` in the training dtype where that is safe; return the dtypes used.

        Text encoders: ``dtype``. VAE: ``dtype`` under bf16 when the family's VAE is bf16-safe, or when a
        replacement VAE (an fp16-safe one) was given; fp32 otherwise. Teacher UNet: bf16 under bf16; under fp16
        only with ``cast_unet`` (--cast_teacher_unet; otherwise fp32 weights run under autocast, as diffusers'
        script does). With LoRA this UNet is also the student's frozen base."""
        half_vae_ok = dtype == torch.bfloat16 and self.vae_bf16_safe
        vae_dtype = dtype if (half_vae_ok or vae_replaced) else torch.float32
        unet_dtype = dtype if (dtype == torch.bfloat16 or cast_unet) else torch.float32
        for encoder in teacher.text_encoders:
            encoder.to(device, dtype=dtype)
        teacher.vae.to(device, dtype=vae_dtype)
        if teacher.unet is not None:
            teacher.unet.to(device, dtype=unet_dtype)
        return {"text": dtype, "vae": vae_dtype, "unet": unet_dtype}

    def native_resolution(self, source: ModelSource) -> int:
        """8 × the UNet's ``sample_size``: the resolution the teacher was trained at."""
        from diffusers import UNet2DConditionModel

        return 8 * int(UNet2DConditionModel.load_config(**source.part("unet"))["sample_size"])

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])
