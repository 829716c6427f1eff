"""LCM-LoRA in one place: the adapters on the teacher UNet, the teacher as that UNet with its adapters off, and
how the adapters are saved in checkpoints and exported.

The LoRA student is the frozen teacher UNet with trainable peft adapters (:func:`add_lora`); the teacher is the
same module called with its adapters disabled (:class:`AdaptersDisabled`): one copy of the base weights. A
checkpoint holds only the adapters (:func:`register_lora_state_hooks`); the export is a diffusers LoRA file that
``pipe.load_lora_weights(output_dir)`` reads and a PEFT adapter folder (:func:`save_lora`).
"""

from __future__ import annotations

from pathlib import Path

from fastlcm.errors import CheckpointError, ConfigError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The diffusers LoRA file in the output folder (``pipe.load_lora_weights(output_dir)``)."""
PEFT_DIR = "peft_adapter"
"""The PEFT adapter folder (``peft.PeftModel.from_pretrained(teacher_unet, output_dir / PEFT_DIR)``)."""
PEFT_PREFIX = "base_model.model."
CHECKPOINT_DIR = "unet_lora"
"""Where a checkpoint keeps the adapters (instead of the full student weights)."""


def add_lora(unet, cfg):
    """LCM-LoRA student: add peft LoRA adapters (trainable, fp32; rank, alpha, dropout and target modules from
    ``cfg``) to the frozen teacher UNet in place; return it. The base weights stay shared with the teacher."""
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


def save_lora(unet, family, out_dir: str | Path) -> dict[str, Path]:
    """Write the adapters of a LoRA-adapted UNet: diffusers LoRA file + PEFT adapter folder (fp32 weights)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config["default"]
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    metadata = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "target_modules",
                                                                  "lora_dropout", "use_dora", "init_lora_weights")}
    # PEFT-named keys ("unet.<module>.lora_A.weight") plus the LoraConfig as metadata: what diffusers' own
    # save_lora_adapter writes and load_lora_weights reads natively (alpha/rank scaling included). The older
    # "lora.down/lora.up" naming (convert_state_dict_to_diffusers) loses the attention projections on reload.
    family.pipeline_class().save_lora_weights(out, unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    peft_dir = out / PEFT_DIR
    peft_dir.mkdir(exist_ok=True)
    config.save_pretrained(str(peft_dir))
    save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(peft_dir / "adapter_model.safetensors"))
    return {"lora": out / LORA_WEIGHTS, "peft_adapter": peft_dir}


def load_lora_state(unet, folder: str | Path) -> None:
    """Load adapter weights written by :func:`save_lora` back into a UNet that has the same adapters."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / PEFT_DIR / "adapter_model.safetensors"))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise CheckpointError(f"{folder}: LoRA adapter weights missing for {missing[:3]}")


def fused_lora_unet(teacher, lora_dir: str | Path):
    """A plain UNet (no peft layers): the teacher's base weights, freshly loaded, with the LoRA exported to
    ``lora_dir`` merged in."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(**teacher.source.part("unet"))
    unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_WEIGHTS, adapter_name="lcm")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet


def register_lora_state_hooks(accelerator, unet, family) -> None:
    """Make Accelerate's save_state/load_state handle a LoRA student by its adapters only.

    Save: the adapters go to ``<checkpoint>/unet_lora`` (main process) and the full UNet state dict is dropped
    from what Accelerate writes. Load: the adapters are read back into ``unet``; Accelerate loads no weights.
    Optimizer, scheduler and RNG states are saved and loaded as usual.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(unet), family, Path(output_dir) / CHECKPOINT_DIR)
        weights.clear()

    def load_hook(models, input_dir):
        load_lora_state(accelerator.unwrap_model(unet), Path(input_dir) / CHECKPOINT_DIR)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

