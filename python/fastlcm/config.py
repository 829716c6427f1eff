"""`fastlcm train` configuration: one dataclass with diffusers' `train_lcm_distill_sd_wds.py` flag names.

Every field of :class:`TrainConfig` is a command-line flag with the same name, default and meaning as in the
diffusers script (plus a few fastlcm additions, marked as such); a field's choices are its ``Literal`` type.
Values come from, lowest to highest priority: the field defaults, a TOML file or packaged preset given by
``--config`` (same keys), then flags on the command line (:mod:`fastlcm.cli.flags` reads those).

:meth:`TrainConfig.validate` checks the values themselves and raises :class:`ConfigError` with a one-line message
naming the flag; it touches no file. What needs the outside world (the teacher folder and its model family, the
shard files, optional packages) is :func:`fastlcm.training.preflight.preflight`, which returns the teacher's family;
:meth:`TrainConfig.with_family_defaults` then fills the defaults that depend on it (``--w_min``: 5 SD, 3 SDXL; the
LoRA target modules; the validation guidance scale: 8 full, 1 LoRA).

This module must not import torch: the CLI builds its parser from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from fastlcm.data.options import LoaderOptions
from fastlcm.errors import ConfigError

LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant",
]  # fmt: skip
SCHEDULERS_NEEDING_LENGTH = ("linear", "cosine", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")
DEFAULT_LORA_RANK = 64
__all__ = ["ConfigError", "TrainConfig", "field_choices", "field_types"]


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
    interpolation_type: Literal["bilinear"] = "bilinear"
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
    lr_scheduler: LrScheduler = "constant"
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
    loss_type: Literal["l2", "huber"] = "l2"
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
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Mixed precision: no, fp16 or bf16 (default: the accelerate config's)."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere and newer GPUs."""
    cast_teacher_unet: bool = False
    """Cast the teacher UNet to the mixed-precision dtype under fp16 (always done under bf16)."""
    enable_xformers_memory_efficient_attention: bool = False
    """Use xformers attention (needs `pip install xformers`)."""
    gradient_checkpointing: bool = False
    """Gradient checkpointing in the student to save memory."""
    optimizer_impl: Literal["auto", "fused", "foreach"] = "auto"
    """(fastlcm) AdamW implementation: fused (one CUDA kernel for all parameters), foreach, or auto (fused on CUDA
    unless --use_8bit_adam, else PyTorch's default). Same update rule either way."""
    channels_last: bool = False
    """(fastlcm) Keep the UNets (student, target, teacher) in channels_last memory format (often faster convs)."""
    compile_unets: Literal["none", "student", "all"] = "none"
    """(fastlcm) torch.compile the UNet forwards of the LCD step: none, student, or all (student, teacher and target).
    Checkpoints, validation and export use the uncompiled modules. The first steps are slow while it compiles."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """(fastlcm) torch.compile mode with --compile_unets: default, reduce-overhead (CUDA graphs) or max-autotune."""
    loader_dtype: Literal["auto", "float32", "bfloat16", "uint8"] = "auto"
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
    export_pipeline_unet: Literal["online", "target"] = "online"
    """(fastlcm) Which UNet the exported pipeline uses: online (student) or target (EMA)."""
    shuffle_buffer: int = 1000
    """(fastlcm) Loader shuffle buffer in samples (0 = shard order)."""
    debug_log_keys: bool = False
    """(fastlcm) Write the sample keys of every batch to output_dir/keys-rank<R>.jsonl (for checks)."""

    # ------------------------------------------------------------------------------------------------------------

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` (one line, naming the flag) on the first bad value; return self. Reads no
        file (that is :func:`fastlcm.training.preflight.preflight`) and changes nothing."""
        for name, choices in field_choices().items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                extra = " (the fastlcm loader resizes with antialiased bilinear only)" if name == "interpolation_type" else ""
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}{extra}")
        if not self.pretrained_teacher_model:
            raise ConfigError("--pretrained_teacher_model is required (a diffusers folder or a Hub model id)")
        if not self.train_shards_path_or_url:
            raise ConfigError("--train_shards_path_or_url is required")
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
        for r in self.trackers or ["none"]:
            if r not in REPORT_TO:
                raise ConfigError(f"--report_to must be one of {', '.join(REPORT_TO)} (comma-separated), got {r!r}")
        if "wandb" in self.trackers and self.hub_token is not None:
            raise ConfigError("--hub_token cannot be used with --report_to wandb (it would expose the token); use `hf auth login`")
        if self.use_8bit_adam and self.optimizer_impl != "auto":
            raise ConfigError(f"--optimizer_impl {self.optimizer_impl} cannot be used with --use_8bit_adam "
                              "(bitsandbytes has its own kernel); leave it at auto")
        if self.precomputed_latents and self.loader_dtype not in ("auto", "float32"):
            raise ConfigError(f"--loader_dtype {self.loader_dtype} is for image shards; latent shards "
                              "(--precomputed_latents) are always read as float32")
        if self.lr_scheduler in SCHEDULERS_NEEDING_LENGTH and self.max_train_steps is None and self.max_train_samples is None:
            raise ConfigError(f"--lr_scheduler {self.lr_scheduler} needs the run length: give --max_train_steps or --max_train_samples")
        if not self.validation_prompts:
            raise ConfigError("--validation_prompts must name at least one prompt")
        return self

    def with_family_defaults(self, family) -> "TrainConfig":
        """A copy with the defaults that depend on the teacher's family (a :class:`fastlcm.families.Family`) and
        the mode filled where they were left unset: ``--w_min`` (5 SD, 3 SDXL), ``--lora_target_modules`` (the
        family's list, with LoRA), ``--validation_guidance_scale`` (8 full, 1 LoRA). Values given are kept."""
        changes: dict[str, Any] = {}
        if self.w_min is None:
            changes["w_min"] = family.default_w_min
            if family.default_w_min > self.w_max:
                raise ConfigError(f"--w_max ({self.w_max}) is below the {family.name.upper()} default --w_min "
                                  f"({family.default_w_min}); give --w_min too")
        if self.use_lora and self.lora_target_modules is None:
            changes["lora_target_modules"] = ",".join(family.lora_target_modules)
        if self.validation_guidance_scale is None:
            changes["validation_guidance_scale"] = 1.0 if self.use_lora else 8.0
        return dataclasses.replace(self, **changes)

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
        """--lora_target_modules as a list (the family's default list once :meth:`with_family_defaults` ran)."""
        if self.lora_target_modules is None:
            raise ConfigError("--lora_target_modules: no module list yet (the family default is filled in by "
                              "TrainConfig.with_family_defaults)")
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def trackers(self) -> list[str]:
        """--report_to as a list of tracker names ("none" dropped)."""
        return [r.strip() for r in (self.report_to or "").split(",") if r.strip() and r.strip() != "none"]

    @property
    def loader_threads(self) -> int | None:
        """--dataloader_num_workers mapped to the loader's decode threads (None = one per core)."""
        return self.dataloader_num_workers or None

    def pixel_dtype(self, cuda: bool) -> str:
        """--loader_dtype resolved for this machine (auto: uint8 with CUDA, float32 without)."""
        if self.loader_dtype == "auto":
            return "uint8" if cuda else "float32"
        return self.loader_dtype

    def loader_options(self, *, rank: int, world_size: int, epochs: int | None, seed: int,
                       cuda: bool) -> LoaderOptions:
        """The options of this process's loader (:class:`fastlcm.data.LoaderOptions`; every default not set here
        is the loader's own). Image shards: the resolution, crop, flip, json filters and pixel dtype of the flags;
        latent shards (--precomputed_latents): the stream options alone, in raw mode."""
        stream = dict(batch_size=self.train_batch_size, seed=seed, shuffle_buffer=self.shuffle_buffer,
                      threads=self.loader_threads, rank=rank, world_size=world_size, epochs=epochs)
        if self.precomputed_latents:
            return LoaderOptions(**stream, raw=True)
        return LoaderOptions(**stream, resolution=self.resolution, crop="center" if self.center_crop else "random",
                             random_flip=self.random_flip, min_original_width=self.min_original_width,
                             min_original_height=self.min_original_height, max_pwatermark=self.max_pwatermark,
                             dtype=self.pixel_dtype(cuda))

    def teacher_source(self):
        """Where the teacher comes from, as a :class:`fastlcm.families.ModelSource`."""
        from fastlcm.families import ModelSource  # the families import torch; this module must not at import

        return ModelSource(self.pretrained_teacher_model, revision=self.teacher_revision, cache_dir=self.cache_dir,
                           vae=self.pretrained_vae_model_name_or_path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types() -> dict[str, Any]:
    """The resolved type annotation of every :class:`TrainConfig` field."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def field_choices() -> dict[str, tuple]:
    """{field: its choices} for every field whose type is a ``Literal`` (optionally ``| None``)."""
    out = {}
    for name, hint in field_types().items():
        hint = _without_none(hint)
        if typing.get_origin(hint) is Literal:
            out[name] = typing.get_args(hint)
    return out


def scalar_type(name: str) -> type:
    """The Python type a field's value has (``str`` for a Literal of strings, ``list`` for ``list[str]``)."""
    hint = _without_none(field_types()[name])
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    if typing.get_origin(hint) is list:
        return list
    if hint in (str, int, float, bool):
        return hint
    raise TypeError(f"TrainConfig.{name}: unsupported field type {hint!r}")
