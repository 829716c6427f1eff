"""Load the teacher's parts from a diffusers folder / Hub id, and build the student and target UNets.

Family-specific pieces are small: :func:`detect_family` reads ``model_index.json``, :func:`text_conditioner_for`
picks how captions become UNet conditioning (SD: one CLIP encoder; SDXL: two, plus pooled embeddings and
``add_time_ids``), :func:`build_student` makes a full student, :func:`add_lora` a LoRA one (the teacher UNet with
peft adapters; :class:`AdaptersDisabled` is then the teacher — one copy of the base weights).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fastlcm.config import ConfigError, TrainConfig
from fastlcm.lcd.step import Conditioning


@dataclass
class Teacher:
    """The frozen parts loaded from the teacher folder."""

    family: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler with the teacher's schedule and prediction_type
    scheduler_config: dict
    text_encoder_2: Any = None  # SDXL only
    tokenizer_2: Any = None  # SDXL only

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def detect_family(cfg: TrainConfig) -> str:
    """"sd" for SD 1.x / 2.x pipelines, "sdxl" for SDXL (from model_index.json; Hub ids are fetched)."""
    root = Path(cfg.pretrained_teacher_model)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        from huggingface_hub import hf_hub_download

        index_file = Path(hf_hub_download(cfg.pretrained_teacher_model, "model_index.json",
                                          revision=cfg.teacher_revision, cache_dir=cfg.cache_dir))
    from fastlcm.config import family_from_index

    return family_from_index(json.loads(index_file.read_text()))


def _dtype(name: str | None) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name or "no", torch.float32)


def load_teacher(cfg: TrainConfig) -> Teacher:
    """Load tokenizer, text encoder, VAE, UNet and noise scheduler (on CPU, fp32, frozen)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = detect_family(cfg)
    src = dict(pretrained_model_name_or_path=cfg.pretrained_teacher_model, revision=cfg.teacher_revision,
               cache_dir=cfg.cache_dir)
    scheduler = DDPMScheduler.from_pretrained(subfolder="scheduler", **src)
    tokenizer = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **src)
    text_encoder = CLIPTextModel.from_pretrained(subfolder="text_encoder", **src)
    if cfg.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path, cache_dir=cfg.cache_dir)
    else:
        vae = AutoencoderKL.from_pretrained(subfolder="vae", **src)
    unet = UNet2DConditionModel.from_pretrained(subfolder="unet", **src)
    extra = {}
    if family == "sdxl":
        extra = dict(tokenizer_2=CLIPTokenizer.from_pretrained(subfolder="tokenizer_2", **src),
                     text_encoder_2=CLIPTextModelWithProjection.from_pretrained(subfolder="text_encoder_2", **src))
        if unet.config.addition_embed_type != "text_time":
            raise ConfigError(f"--pretrained_teacher_model: {cfg.pretrained_teacher_model} has text_encoder_2 but its "
                              "UNet has no SDXL text_time conditioning (addition_embed_type)")
    for m in (text_encoder, vae, unet, extra.get("text_encoder_2")):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return Teacher(family, unet, vae, text_encoder, tokenizer, scheduler, dict(scheduler.config), **extra)


def place_frozen(teacher: Teacher, cfg: TrainConfig, device, mixed_precision: str | None) -> dict[str, torch.dtype]:
    """Move the frozen parts to the device in the training dtype where that is safe; return the dtypes used.

    Text encoders: the mixed-precision dtype. VAE: bf16 under bf16 (SD only); fp32 otherwise unless a
    replacement VAE (an fp16-safe one) was given — the SDXL VAE overflows in half precision. Teacher UNet: bf16
    under bf16; under fp16 only with --cast_teacher_unet (otherwise fp32 weights run under autocast, as the
    diffusers script does). With LoRA this UNet is also the student's frozen base.
    """
    wd = _dtype(mixed_precision)
    half_vae_ok = wd == torch.bfloat16 and teacher.family == "sd"
    vae_dtype = wd if (half_vae_ok or cfg.pretrained_vae_model_name_or_path) else torch.float32
    unet_dtype = wd if (wd == torch.bfloat16 or cfg.cast_teacher_unet) else torch.float32
    teacher.text_encoder.to(device, dtype=wd)
    if teacher.text_encoder_2 is not None:
        teacher.text_encoder_2.to(device, dtype=wd)
    teacher.vae.to(device, dtype=vae_dtype)
    teacher.unet.to(device, dtype=unet_dtype)
    return {"text": wd, "vae": vae_dtype, "unet": unet_dtype}


def guidance_dim(teacher_unet, cfg: TrainConfig) -> int:
    """d: the teacher's time_cond_proj_dim if it has one, else --unet_time_cond_proj_dim."""
    return teacher_unet.config.time_cond_proj_dim or cfg.unet_time_cond_proj_dim


def build_student(teacher_unet, time_cond_proj_dim: int, init_unet=None):
    """The teacher UNet rebuilt with ``time_cond_proj_dim`` = d and the teacher's weights (fp32, trainable).

    The guidance projection (``time_embedding.cond_proj``) is new and keeps its fresh initialization.
    ``init_unet`` (from --revision) replaces the teacher as the source of the initial weights.
    """
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    source = init_unet if init_unet is not None else teacher_unet
    state = {k: v.float() for k, v in source.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    fresh = [k for k in missing if not k.startswith("time_embedding.cond_proj")]
    if fresh or unexpected:
        raise RuntimeError(f"student/teacher weight mismatch: missing {fresh[:5]}, unexpected {list(unexpected)[:5]}")
    student.train()
    student.requires_grad_(True)
    return student


def build_target(student):
    """The target network: an fp32 copy of the student without gradients, updated by EMA."""
    target = copy.deepcopy(student)
    if any(p.dtype != torch.float32 for p in target.parameters()):
        target.to(torch.float32)
    target.requires_grad_(False)
    target.train()  # same mode as the diffusers script (the UNet has no dropout by default)
    return target


def add_lora(unet, cfg: TrainConfig):
    """LCM-LoRA student: add peft LoRA adapters (trainable, fp32) to the frozen teacher UNet in place; return it.

    The base weights stay shared with the teacher (see :class:`AdaptersDisabled`) and frozen.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_modules)
    try:
        unet.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"--lora_target_modules: {e}") from None
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    return unet


class AdaptersDisabled:
    """The teacher of LoRA distillation: calls a LoRA-adapted UNet with its adapters switched off."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def trainable_parameters(module) -> list:
    """The parameters the optimizer updates (all of a full student; the adapters of a LoRA one)."""
    return [p for p in module.parameters() if p.requires_grad]


def load_student_init(cfg: TrainConfig):
    """The UNet at --revision when it differs from the teacher's revision, else None (use the teacher)."""
    if cfg.revision is None or cfg.revision == cfg.teacher_revision:
        return None
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(cfg.pretrained_teacher_model, subfolder="unet",
                                                revision=cfg.revision, cache_dir=cfg.cache_dir)


class SDTextConditioner:
    """SD 1.x / 2.x: CLIP last hidden states; c∅ = the embedding of "" (computed once, broadcast)."""

    def __init__(self, tokenizer, text_encoder, device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, torch.device(device)
        self._null: torch.Tensor | None = None

    @torch.no_grad()
    def _embed(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning:
        return Conditioning(self._embed(captions))

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning:
        if self._null is None:
            self._null = self._embed([""])
        return Conditioning(self._null.expand(batch_size, -1, -1))


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
    def _embed(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's is kept)
        return torch.cat(hidden, dim=-1), pooled

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

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning:
        embeds, pooled = self._embed(captions)
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": self.time_ids(batch, len(captions))})

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning:
        dtype = next(self.text_encoders[-1].parameters()).dtype
        if self._zeros is None or self._zeros[0].dtype != dtype:  # allocated once; broadcast to the batch
            dims = sum(e.config.hidden_size for e in self.text_encoders)
            seq = self.tokenizers[0].model_max_length
            pooled_dim = self.text_encoders[-1].config.projection_dim
            self._zeros = (torch.zeros(1, seq, dims, device=self.device, dtype=dtype),
                           torch.zeros(1, pooled_dim, device=self.device, dtype=dtype))
        zeros, pooled = self._zeros
        return Conditioning(zeros.expand(batch_size, -1, -1),
                            {"text_embeds": pooled.expand(batch_size, -1), "time_ids": self.time_ids(batch, batch_size)})


def text_conditioner_for(teacher: Teacher, device, cfg: TrainConfig | None = None):
    """The :class:`fastlcm.lcd.step.TextConditioner` for the teacher's family."""
    if teacher.family == "sd":
        return SDTextConditioner(teacher.tokenizer, teacher.text_encoder, device)
    if teacher.family == "sdxl":
        resolution = cfg.resolution if cfg is not None else teacher.unet.config.sample_size * 8
        fix = bool(cfg.use_fix_crop_and_size) if cfg is not None else False
        return SDXLTextConditioner([teacher.tokenizer, teacher.tokenizer_2],
                                   [teacher.text_encoder, teacher.text_encoder_2], device, resolution, fix)
    raise ConfigError(f"unknown model family {teacher.family!r}")


class PrecomputedConditioner:
    """--precomputed_latents: conditioning from the batch's cached embeddings (``fastlcm precompute``).

    ``batch.prompt_embeds`` [B, 77, D] (and SDXL ``batch.pooled_embeds`` [B, 1280]) on the device; SDXL time ids
    from the batch's original_sizes / crop_coords as in the image path. A caption dropped by
    --proportion_empty_prompts (now "") gets the embedding of "" — what the image path encodes for it — computed
    once here, as is c∅ (SD: the embedding of ""; SDXL: zeros). After construction the text encoders are not used.
    """

    def __init__(self, base):
        self.base = base
        if isinstance(base, SDXLTextConditioner):  # c∅ = zeros (no encoder needed)
            hidden, pooled = base._embed([""])
            self._empty = (hidden.float(), pooled.float())
        else:
            self._empty = (base._embed([""]).float(), None)
            base.unconditional(1)  # computes and caches c∅ (the "" embedding) while the encoder is on the device

    def encode(self, captions: Sequence[str], batch: Any = None) -> Conditioning:
        embeds, pooled = batch.prompt_embeds, getattr(batch, "pooled_embeds", None)
        if embeds.shape[0] != len(captions):
            raise ValueError(f"latent batch has {embeds.shape[0]} prompt_embeds for {len(captions)} captions")
        dropped = [c == "" for c in captions]
        if any(dropped):
            mask = torch.tensor(dropped, device=embeds.device)
            embeds = torch.where(mask[:, None, None], self._empty[0].to(embeds.dtype), embeds)
            if pooled is not None:
                pooled = torch.where(mask[:, None], self._empty[1].to(pooled.dtype), pooled)
        if not isinstance(self.base, SDXLTextConditioner):
            return Conditioning(embeds)
        if pooled is None:
            raise ValueError("SDXL latent batch has no pooled_embeds (were the latent shards made for an SD teacher?)")
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": self.base.time_ids(batch, len(captions))})

    def unconditional(self, batch_size: int, batch: Any = None) -> Conditioning:
        return self.base.unconditional(batch_size, batch)


def set_memory_format(modules, channels_last: bool) -> None:
    """--channels_last: put the UNets' 4-D weights in channels_last (or back to contiguous) format, in place."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in modules:
        if m is None:
            continue
        if not channels_last and all(p.is_contiguous() for p in m.parameters()):
            continue  # already contiguous (the default): nothing to convert
        m.to(memory_format=fmt)


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _torch_default_cache_dir() -> str:
    """Inductor's own default cache folder (``$TMPDIR/torchinductor_<user>``)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: the same rule
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())
    return default_cache_dir()


def compile_cache_dir() -> str:
    """Where torch.compile keeps its compiled graphs and kernels between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when
    the user set it, else ``$XDG_CACHE_HOME/fastlcm/torchinductor`` (``~/.cache/…``), set for this process.
    Inductor's own default is under /tmp, which job schedulers and containers often wipe; a resumed or repeated run
    then pays the minutes of compilation again. Importing torch._dynamo (diffusers, accelerate and peft all do)
    writes that /tmp default into ``$TORCHINDUCTOR_CACHE_DIR``, so a value equal to it counts as unset. Where the
    home cache cannot be created (a read-only home), inductor's default stays."""
    current = os.environ.get(COMPILE_CACHE_ENV)
    default = _torch_default_cache_dir()
    if not current or os.path.abspath(current) == os.path.abspath(default):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        ours = os.path.join(base, "fastlcm", "torchinductor")
        try:
            os.makedirs(ours, exist_ok=True)
        except OSError:
            ours = default
        os.environ[COMPILE_CACHE_ENV] = ours
    return os.environ[COMPILE_CACHE_ENV]


def compile_cache_state() -> str:
    """What the next torch.compile starts from: ``"cold"`` (nothing in :func:`compile_cache_dir`) or ``"warm (N
    files)"``."""
    n = sum(len(files) for _, _, files in os.walk(compile_cache_dir()))
    return f"warm ({n} file{'s' if n != 1 else ''})" if n else "cold"


def compile_notice(cfg: TrainConfig) -> str:
    """One line for the log when --compile_unets is on: what compiles, that the first steps pay for it, and the
    cache it starts from."""
    which = "the student" if cfg.compile_unets == "student" else "the student, teacher and target"
    return (f"torch.compile ({cfg.compile_mode}) of {which}: the first steps compile (minutes when the cache is "
            f"cold); compile cache {compile_cache_dir()}: {compile_cache_state()}")


def compiled(module, mode: str):
    """A torch.compile wrapper of ``module`` for the LCD step's forwards; ``module`` itself stays uncompiled (its
    state_dict, checkpoints, validation and export are unchanged). Compiled artifacts persist in
    :func:`compile_cache_dir`."""
    compile_cache_dir()
    return torch.compile(module, mode=None if mode == "default" else mode)
