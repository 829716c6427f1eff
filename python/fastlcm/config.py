"""`fastlcm train` configuration: one dataclass with diffusers' `train_lcm_distill_sd_wds.py` flag names.

Every field of :class:`TrainConfig` is a command-line flag with the same name, default and meaning as in the
diffusers script (plus a few fastlcm additions, marked as such). Values come from, lowest to highest priority:
the field defaults, a TOML file or packaged preset given by ``--config`` (same keys), then flags on the command
line (:mod:`fastlcm.config_flags` reads those). :meth:`TrainConfig.validate` checks everything that can be checked
without loading a model and raises :class:`ConfigError` with a one-line message naming the flag.

The model family (SD 1.x/2.x or SDXL) is read from the teacher folder; LoRA distillation is ``--lora`` (or
``--lora_rank N``). Defaults that depend on them (``--w_min``, the validation guidance scale) are ``None`` here and
resolved by :meth:`TrainConfig.apply_defaults` once the family is known.

This module must not import torch: the CLI builds its parser from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant",
)
SCHEDULERS_NEEDING_LENGTH = ("linear", "cosine", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")
CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "loss_type": ("l2", "huber"),
    "lr_scheduler": LR_SCHEDULERS,
    "interpolation_type": ("bilinear",),
    "export_pipeline_unet": ("online", "target"),
    "optimizer_impl": ("auto", "fused", "foreach"),
    "compile_unets": ("none", "student", "all"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "loader_dtype": ("auto", "float32", "bfloat16", "uint8"),
}
FAMILIES = ("sd", "sdxl")
W_MIN_DEFAULT = {"sd": 5.0, "sdxl": 3.0}  # as in diffusers' sd / sdxl LCM scripts
DEFAULT_LORA_RANK = 64
DEFAULT_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


class ConfigError(ValueError):
    """A bad flag or config value; the message is one line and names the flag."""


@dataclass
class TrainConfig:
    # ---- model checkpoint loading ----
    pretrained_teacher_model: str | None = None
    """Path to the teacher's diffusers folder, or its model id on huggingface.co (required)."""
    pretrained_vae_model_name_or_path: str | None = None
    """Path or model id of a VAE to use instead of the teacher's (e.g. an fp16-safe VAE)."""
    teacher_revision: str | None = None
    """Revision (branch, tag or commit) of the teacher model on the Hub."""
    revision: str | None = None
    """Revision of the UNet weights the student starts from (default: the teacher's)."""
    # ---- general ----
    output_dir: str = "lcm-xl-distilled"
    """Where checkpoints, logs, metrics, validation grids and the exported UNets are written."""
    cache_dir: str | None = None
    """Where downloaded models are cached."""
    seed: int | None = None
    """Seed for reproducible training (data order, noise, timesteps, guidance scales, caption dropping)."""
    # ---- logging ----
    logging_dir: str = "logs"
    """Tracker (TensorBoard) log directory, relative to output_dir."""
    report_to: str = "tensorboard"
    """Trackers to log to: tensorboard, wandb, comet_ml, all or none."""
    # ---- checkpointing ----
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every this many optimizer steps."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed after a new one is complete)."""
    resume_from_checkpoint: str | None = None
    """Resume from a checkpoint folder, or "latest" for the newest in output_dir (starts fresh if none)."""
    # ---- image processing ----
    train_shards_path_or_url: str | None = None
    """WebDataset shards: paths, brace ranges ("/d/{00000..00099}.tar"), http(s):// URLs or "pipe:CMD" (required)."""
    resolution: int = 512
    """Training image resolution in pixels (square; must be divisible by 8)."""
    interpolation_type: str = "bilinear"
    """Resize filter. The fastlcm loader resizes with PIL-equivalent antialiased bilinear only."""
    center_crop: bool = False
    """Center-crop images to the resolution instead of cropping at a random position."""
    random_flip: bool = False
    """Randomly flip images horizontally (after the crop)."""
    use_fix_crop_and_size: bool = False
    """SDXL: condition on original size (resolution, resolution) and crop (0, 0) instead of the real ones."""
    min_original_width: int = 0
    """(fastlcm) Skip samples whose json "original_width" is below this (the SDXL scripts filter at 960)."""
    min_original_height: int = 0
    """(fastlcm) Skip samples whose json "original_height" is below this."""
    max_pwatermark: float | None = None
    """(fastlcm) Skip samples whose json "pwatermark" exceeds this (the SDXL scripts use 0.5)."""
    # ---- data loading ----
    dataloader_num_workers: int = 0
    """Image decode threads per process in the Rust loader (0 = one per available CPU core)."""
    # ---- batch size and length ----
    train_batch_size: int = 16
    """Batch size per device."""
    num_train_epochs: int = 100
    """Number of passes over the data (an epoch is max_train_samples samples when that is set)."""
    max_train_steps: int | None = None
    """Total optimizer steps; overrides num_train_epochs when set."""
    max_train_samples: int | None = None
    """Samples per epoch over all processes (the shards are streamed and reshuffled each pass)."""
    # ---- learning rate ----
    learning_rate: float = 1e-4
    """Initial learning rate (after warmup)."""
    scale_lr: bool = False
    """Multiply the learning rate by processes × gradient accumulation steps × batch size."""
    lr_scheduler: str = "constant"
    """LR schedule: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup."""
    lr_warmup_steps: int = 500
    """Warmup steps of the LR schedule."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    # ---- optimizer ----
    use_8bit_adam: bool = False
    """Use bitsandbytes' 8-bit AdamW (needs `pip install bitsandbytes`)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-2
    """AdamW weight decay."""
    adam_epsilon: float = 1e-08
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value."""
    # ---- diffusion training ----
    proportion_empty_prompts: float = 0.0
    """Probability of replacing a caption by the empty prompt (seeded, per sample)."""
    # ---- latent consistency distillation ----
    w_min: float | None = None
    """Minimum guidance scale w sampled for the teacher's classifier-free guidance (default: 5 SD, 3 SDXL)."""
    w_max: float = 15.0
    """Maximum guidance scale w."""
    num_ddim_timesteps: int = 50
    """Number of points N of the DDIM solver grid."""
    loss_type: str = "l2"
    """Consistency loss: l2 or huber (pseudo-Huber)."""
    huber_c: float = 0.001
    """Pseudo-Huber parameter c (only used with --loss_type huber)."""
    unet_time_cond_proj_dim: int = 256
    """Dimension d of the guidance-scale embedding fed to the student (unless the teacher already has one)."""
    vae_encode_batch_size: int = 32
    """Images per VAE encode call."""
    timestep_scaling_factor: float = 10.0
    """Timestep scaling λ in the consistency boundary scalings c_skip, c_out."""
    # ---- LoRA (LCM-LoRA) ----
    lora: bool = False
    """(fastlcm) LoRA distillation (LCM-LoRA): train LoRA adapters on the teacher UNet instead of a full student."""
    lora_rank: int | None = None
    """Rank of the LoRA matrices; giving it (> 0) turns on LoRA distillation (default 64 with --lora)."""
    lora_alpha: int = 64
    """LoRA alpha: the update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout probability before each LoRA layer."""
    lora_target_modules: str | None = None
    """Comma-separated UNet module names to adapt (default: attention q/k/v/out, proj_in/out, feed-forward,
    resnet convs and shortcut, down/up-sampler convs, time_emb_proj)."""
    # ---- EMA ----
    ema_decay: float = 0.95
    """EMA decay μ of the target network: target ← μ·target + (1 − μ)·student."""
    # ---- precision and speed ----
    mixed_precision: str | None = None
    """Mixed precision: no, fp16 or bf16 (default: the accelerate config's)."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere and newer GPUs."""
    cast_teacher_unet: bool = False
    """Cast the teacher UNet to the mixed-precision dtype under fp16 (always done under bf16)."""
    enable_xformers_memory_efficient_attention: bool = False
    """Use xformers attention (needs `pip install xformers`)."""
    gradient_checkpointing: bool = False
    """Gradient checkpointing in the student to save memory."""
    optimizer_impl: str = "auto"
    """(fastlcm) AdamW implementation: fused (one CUDA kernel for all parameters), foreach, or auto (fused on CUDA
    unless --use_8bit_adam, else PyTorch's default). Same update rule either way."""
    channels_last: bool = False
    """(fastlcm) Keep the UNets (student, target, teacher) in channels_last memory format (often faster convs)."""
    compile_unets: str = "none"
    """(fastlcm) torch.compile the UNet forwards of the LCD step: none, student, or all (student, teacher and target).
    Checkpoints, validation and export use the uncompiled modules. The first steps are slow while it compiles."""
    compile_mode: str = "default"
    """(fastlcm) torch.compile mode with --compile_unets: default, reduce-overhead (CUDA graphs) or max-autotune."""
    loader_dtype: str = "auto"
    """(fastlcm) Pixel dtype the loader hands over: float32 or bfloat16 ([-1, 1]), or uint8 (0..255, normalized as
    x/127.5 − 1 on the device after the copy: 4× less to copy). auto = uint8 on CUDA, float32 on CPU."""
    device_prefetch: bool = True
    """(fastlcm) On CUDA, copy each batch to the GPU (and normalize it) on a side stream, overlapping the previous
    step's backward and optimizer. No effect on CPU."""
    precomputed_latents: bool = False
    """(fastlcm) --train_shards_path_or_url holds latent shards from `fastlcm precompute` (VAE posterior + text
    embeddings) instead of images: no VAE encode or text encode in the step, and the VAE stays off the GPU."""
    # ---- distributed ----
    local_rank: int = -1
    """Accepted for compatibility; the rank comes from the launcher's environment."""
    # ---- validation ----
    validation_steps: int = 200
    """Render validation grids every this many optimizer steps."""
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a red circle", "a blue square on a white background", "a photo of a cat",
                                 "a painting of a yellow star"]
    )
    """(fastlcm) Prompts rendered at each validation (4-step LCMScheduler), one image each."""
    validation_num_inference_steps: int = 4
    """(fastlcm) LCMScheduler steps for validation images."""
    validation_guidance_scale: float | None = None
    """(fastlcm) Guidance scale for validation; a full student embeds w = guidance_scale − 1 (default 8). A LoRA
    student has no w input: the pipeline applies this as classifier-free guidance (default 1 = none)."""
    # ---- hub ----
    push_to_hub: bool = False
    """Upload output_dir (without checkpoints) to the Hub at the end."""
    hub_token: str | None = None
    """Token for the Hub (prefer `hf auth login`)."""
    hub_model_id: str | None = None
    """Hub repository to upload to (default: the output_dir's name)."""
    # ---- accelerate ----
    tracker_project_name: str = "text2image-fine-tune"
    """Project name passed to Accelerator.init_trackers."""
    # ---- fastlcm additions ----
    export_pipeline: bool = False
    """(fastlcm) Also write output_dir/pipeline: a complete diffusers pipeline with the student and LCMScheduler."""
    export_pipeline_unet: str = "online"
    """(fastlcm) Which UNet the exported pipeline uses: online (student) or target (EMA)."""
    shuffle_buffer: int = 1000
    """(fastlcm) Loader shuffle buffer in samples (0 = shard order)."""
    debug_log_keys: bool = False
    """(fastlcm) Write the sample keys of every batch to output_dir/keys-rank<R>.jsonl (for checks)."""

    # ------------------------------------------------------------------------------------------------------------

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` (one line, naming the flag) on the first bad value; return self."""
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                extra = " (the fastlcm loader resizes with antialiased bilinear only)" if name == "interpolation_type" else ""
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}{extra}")
        if not self.pretrained_teacher_model:
            raise ConfigError("--pretrained_teacher_model is required (a diffusers folder or a Hub model id)")
        _check_model_location("--pretrained_teacher_model", self.pretrained_teacher_model)
        if self.pretrained_vae_model_name_or_path:
            _check_model_location("--pretrained_vae_model_name_or_path", self.pretrained_vae_model_name_or_path)
        if not self.train_shards_path_or_url:
            raise ConfigError("--train_shards_path_or_url is required")
        _check_shards(self.train_shards_path_or_url)
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if self.w_min is not None and self.w_min > self.w_max:
            raise ConfigError(f"--w_min ({self.w_min}) must not exceed --w_max ({self.w_max})")
        if self.lora_rank is not None and self.lora_rank < 0:
            raise ConfigError(f"--lora_rank must be > 0, got {self.lora_rank}")
        if self.lora and self.lora_rank == 0:
            raise ConfigError("--lora needs a positive --lora_rank (got 0)")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and not self.lora_modules:
            raise ConfigError("--lora_target_modules must name at least one module (comma-separated)")
        if self.use_lora and self.revision is not None and self.revision != self.teacher_revision:
            raise ConfigError("--revision (a separate student initialization) cannot be used with LoRA distillation: "
                              "the LoRA student is the teacher UNet plus adapters")
        if self.min_original_width < 0 or self.min_original_height < 0:
            raise ConfigError("--min_original_width / --min_original_height must be >= 0")
        if self.max_pwatermark is not None and not 0.0 <= self.max_pwatermark <= 1.0:
            raise ConfigError(f"--max_pwatermark must be in [0, 1], got {self.max_pwatermark}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ConfigError(f"--proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1], got {self.ema_decay}")
        positive = ("train_batch_size", "gradient_accumulation_steps", "num_ddim_timesteps", "vae_encode_batch_size",
                    "checkpointing_steps", "validation_steps", "num_train_epochs", "validation_num_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 when given, got {getattr(self, name)}")
        for name in ("dataloader_num_workers", "lr_warmup_steps", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.loss_type == "huber" and self.huber_c <= 0:
            raise ConfigError(f"--huber_c must be > 0, got {self.huber_c}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"--max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.unet_time_cond_proj_dim < 4 or self.unet_time_cond_proj_dim % 2:
            raise ConfigError(f"--unet_time_cond_proj_dim must be even and >= 4, got {self.unet_time_cond_proj_dim}")
        if self.timestep_scaling_factor <= 0:
            raise ConfigError(f"--timestep_scaling_factor must be > 0, got {self.timestep_scaling_factor}")
        reports = [r.strip() for r in self.report_to.split(",")] if self.report_to else ["none"]
        for r in reports:
            if r not in REPORT_TO:
                raise ConfigError(f"--report_to must be one of {', '.join(REPORT_TO)} (comma-separated), got {r!r}")
        if "wandb" in reports and self.hub_token is not None:
            raise ConfigError("--hub_token cannot be used with --report_to wandb (it would expose the token); use `hf auth login`")
        for r in ("wandb", "comet_ml"):
            if r in reports and importlib.util.find_spec(r) is None:
                raise ConfigError(f"--report_to {r} needs the {r} package: pip install {r}")
        if self.use_8bit_adam and self.optimizer_impl != "auto":
            raise ConfigError(f"--optimizer_impl {self.optimizer_impl} cannot be used with --use_8bit_adam "
                              "(bitsandbytes has its own kernel); leave it at auto")
        if self.precomputed_latents and self.loader_dtype not in ("auto", "float32"):
            raise ConfigError(f"--loader_dtype {self.loader_dtype} is for image shards; latent shards "
                              "(--precomputed_latents) are always read as float32")
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or pip install 'fastlcm[bnb]')")
        if self.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
            raise ConfigError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers")
        if self.lr_scheduler in SCHEDULERS_NEEDING_LENGTH and self.max_train_steps is None and self.max_train_samples is None:
            raise ConfigError(f"--lr_scheduler {self.lr_scheduler} needs the run length: give --max_train_steps or --max_train_samples")
        if not self.validation_prompts:
            raise ConfigError("--validation_prompts must name at least one prompt")
        family = local_teacher_family(self.pretrained_teacher_model)
        if family is not None:
            self.apply_defaults(family)
        return self

    def apply_defaults(self, family: str) -> "TrainConfig":
        """Fill the family/LoRA-dependent defaults left as None (``--w_min``: 5 SD, 3 SDXL; validation guidance:
        8 full, 1 LoRA) and check what depends on them. Idempotent; values given by the user are kept."""
        if family not in FAMILIES:
            raise ConfigError(f"--pretrained_teacher_model: unknown model family {family!r}")
        if self.w_min is None:
            self.w_min = W_MIN_DEFAULT[family]
            if self.w_min > self.w_max:
                raise ConfigError(f"--w_max ({self.w_max}) is below the {family.upper()} default --w_min "
                                  f"({self.w_min}); give --w_min too")
        if self.validation_guidance_scale is None:
            self.validation_guidance_scale = 1.0 if self.use_lora else 8.0
        return self

    @property
    def use_lora(self) -> bool:
        """LoRA distillation: --lora, or --lora_rank > 0."""
        return self.lora or (self.lora_rank or 0) > 0

    @property
    def lora_r(self) -> int:
        """The LoRA rank in effect (--lora_rank, default 64)."""
        return self.lora_rank or DEFAULT_LORA_RANK

    @property
    def lora_modules(self) -> list[str]:
        """--lora_target_modules as a list (the default list when not given)."""
        if self.lora_target_modules is None:
            return list(DEFAULT_LORA_TARGET_MODULES)
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def loader_threads(self) -> int | None:
        """--dataloader_num_workers mapped to the loader's decode threads (None = one per core)."""
        return self.dataloader_num_workers or None

    def pixel_dtype(self, cuda: bool) -> str:
        """--loader_dtype resolved for this machine (auto: uint8 with CUDA, float32 without)."""
        if self.loader_dtype == "auto":
            return "uint8" if cuda else "float32"
        return self.loader_dtype

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Pre-load checks
# ----------------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def local_teacher_family(value: str | None) -> str | None:
    """"sdxl" / "sd" for a local diffusers folder (from model_index.json), None when it cannot be told locally."""
    if not value:
        return None
    root = Path(value).expanduser()
    index = root / "model_index.json"
    if index.is_file():
        import json

        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--pretrained_teacher_model: cannot read {index}: {e}") from None
        return family_from_index(data)
    if root.is_dir() and (root / "text_encoder_2").is_dir():
        return "sdxl"
    if root.is_dir() and (root / "text_encoder").is_dir():
        return "sd"
    return None


def family_from_index(index: dict) -> str:
    """The family named by a pipeline's model_index.json: SDXL when it has a second text encoder."""
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    return "sd"


def _check_model_location(flag: str, value: str) -> None:
    path = Path(value).expanduser()
    if path.is_dir():
        if not ((path / "model_index.json").is_file() or (path / "config.json").is_file() or (path / "unet").is_dir()):
            raise ConfigError(f"{flag}: {value} is a folder but not a diffusers model (no model_index.json, config.json or unet/)")
        return
    if path.exists():
        raise ConfigError(f"{flag}: {value} is a file; expected a diffusers model folder or a Hub model id")
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise ConfigError(f"{flag}: no such folder: {value}")


def expand_braces(spec: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and zero-padded ``{000..099}`` ranges (webdataset / braceexpand style)."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    head, body, tail = spec[: m.start()], m.group(1), spec[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _check_shards(spec: str) -> None:
    """Local specs must name at least one existing file; URLs and pipe: commands are checked by the loader."""
    parts = [p for p in spec.split("::") if p.strip()]
    if not parts:
        raise ConfigError("--train_shards_path_or_url is empty")
    local = []
    for part in parts:
        part = part.strip()
        if part.startswith(("pipe:", "http://", "https://")):
            return
        local.extend(expand_braces(part.removeprefix("file://")))
    if not any(Path(p).expanduser().is_file() for p in local):
        raise ConfigError(f"--train_shards_path_or_url: {spec!r} matches no file")
