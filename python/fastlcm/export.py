"""Final export in diffusers layout and Hub upload.

Full distillation: ``unet/`` (online student), ``unet_target/`` (EMA), optional ``pipeline/``.
LCM-LoRA: ``pytorch_lora_weights.safetensors`` in output_dir (diffusers LoRA format: ``pipe.load_lora_weights(
output_dir)`` loads it into a stock StableDiffusion(XL)Pipeline) and ``peft_adapter/`` (a PEFT adapter folder:
``peft.PeftModel.from_pretrained(teacher_unet, output_dir/"peft_adapter")``); optional ``pipeline/`` with the LoRA
fused into the UNet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastlcm.validation import build_pipeline, lcm_scheduler

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_DIR = "peft_adapter"
PEFT_PREFIX = "base_model.model."


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def save_lora(unet, family: str, out_dir: str | Path) -> dict[str, Path]:
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
    pipeline_class(family).save_lora_weights(out, unet_lora_layers=state,
                                             safe_serialization=True, unet_lora_adapter_metadata=metadata)
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
        raise RuntimeError(f"{folder}: LoRA adapter weights missing for {missing[:3]}")


def _fused_lora_unet(teacher, cfg):
    """A plain UNet (no peft layers): the teacher's base weights with the exported LoRA merged in."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(cfg.pretrained_teacher_model, subfolder="unet",
                                                revision=cfg.teacher_revision, cache_dir=cfg.cache_dir)
    unet.load_lora_adapter(str(Path(cfg.output_dir)), prefix="unet", weight_name=LORA_WEIGHTS, adapter_name="lcm")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet


def export_models(student, target, teacher, cfg) -> dict[str, Path]:
    """Write the trained weights to output_dir (see the module docstring); with --export_pipeline also
    output_dir/pipeline: a model_index.json-complete pipeline of the teacher's family with LCMScheduler (fp32)."""
    out = Path(cfg.output_dir)
    if cfg.use_lora:
        paths = save_lora(student, teacher.family, out)
        unet = _fused_lora_unet(teacher, cfg) if cfg.export_pipeline else None
    else:
        paths = {"unet": out / "unet", "unet_target": out / "unet_target"}
        student.save_pretrained(paths["unet"])
        target.save_pretrained(paths["unet_target"])
        unet = student if cfg.export_pipeline_unet == "online" else target
    if cfg.export_pipeline:
        for part in (teacher.vae, teacher.text_encoder, teacher.text_encoder_2):
            if part is not None:
                part.to(torch.float32)
        scheduler = lcm_scheduler(teacher.scheduler_config, cfg.num_ddim_timesteps, cfg.timestep_scaling_factor)
        pipe = build_pipeline(teacher, unet, scheduler)
        paths["pipeline"] = out / "pipeline"
        pipe.save_pretrained(paths["pipeline"], safe_serialization=True)
    return paths


def push_to_hub(cfg) -> str:
    """Upload output_dir (checkpoints and temp folders excluded) to --hub_model_id; return the repo id."""
    import huggingface_hub

    repo_id = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, token=cfg.hub_token).repo_id
    huggingface_hub.upload_folder(
        repo_id=repo_id, folder_path=cfg.output_dir, commit_message="fastlcm: latent consistency distillation",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "step_*", "epoch_*"], token=cfg.hub_token,
    )
    return repo_id
