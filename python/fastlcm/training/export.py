"""Final export in diffusers layout and Hub upload.

Full distillation: ``unet/`` (online student), ``unet_target/`` (EMA), optional ``pipeline/``.
LCM-LoRA: ``pytorch_lora_weights.safetensors`` in output_dir (diffusers LoRA format: ``pipe.load_lora_weights(
output_dir)`` loads it into a stock pipeline of the teacher's family) and ``peft_adapter/`` (a PEFT adapter folder:
``peft.PeftModel.from_pretrained(teacher_unet, output_dir/"peft_adapter")``); optional ``pipeline/`` with the LoRA
fused into the UNet. Every folder a sampler is pointed at gets the run's sampler settings (``fastlcm.json``:
:mod:`fastlcm.sampling.scheduler`); ``pipeline/``'s LCMScheduler is configured with them too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastlcm.families import Teacher
from fastlcm.sampling.scheduler import LCMSettings, lcm_scheduler
from fastlcm.training.lora import fused_lora_unet, save_lora


def export_models(student, target, teacher: Teacher, cfg, lcm: LCMSettings) -> dict[str, Path]:
    """Write the trained weights to output_dir (see the module docstring); with --export_pipeline also
    output_dir/pipeline: a model_index.json-complete pipeline of the teacher's family with LCMScheduler (fp32)."""
    out = Path(cfg.output_dir)
    if cfg.use_lora:
        paths = save_lora(student, teacher.family, out)
        lcm.save(out)
        unet = fused_lora_unet(teacher, out) if cfg.export_pipeline else None
    else:
        paths = {"unet": out / "unet", "unet_target": out / "unet_target"}
        for name, module in (("unet", student), ("unet_target", target)):
            module.save_pretrained(paths[name])
            lcm.save(paths[name])
        unet = student if cfg.export_pipeline_unet == "online" else target
    if cfg.export_pipeline:
        for part in (teacher.vae, *teacher.text_encoders):
            part.to(torch.float32)
        pipe = teacher.family.pipeline(teacher, unet, lcm_scheduler(teacher.scheduler_config, lcm))
        paths["pipeline"] = out / "pipeline"
        pipe.save_pretrained(paths["pipeline"], safe_serialization=True)
        lcm.save(paths["pipeline"] / "unet")
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
