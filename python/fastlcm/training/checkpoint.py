"""Atomic, resumable training checkpoints.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding:
  * Accelerate's state (student weights, optimizer, LR scheduler, torch/numpy/python RNG per process);
  * ``unet_target/`` — the EMA target in diffusers format, with its sampler settings (``fastlcm.json``): usable
    on its own by ``fastlcm generate`` / ``eval`` (full distillation only);
  * LCM-LoRA: ``unet_lora/`` holds only the adapters (diffusers LoRA file + PEFT folder) instead of the student
    weights — the frozen base UNet is never written (see :func:`register_lora_state_hooks`);
  * ``rank<R>.pt`` — per process: the loader's ``state_dict()``, the step's generator state, the caption-drop RNG;
  * ``fastlcm_state.json`` — step, batches seen, world size; written last.
Everything is written into ``.checkpoint-<step>.tmp`` and renamed into place only when complete, so a crash
while saving never leaves a ``checkpoint-*`` that cannot load. Rotation (``checkpoints_total_limit``) runs after.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fastlcm.errors import CheckpointError
from fastlcm.training.lora import CHECKPOINT_DIR as LORA_DIR

STATE_FILE = "fastlcm_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` → newest complete checkpoint (None if there is none); a path → that checkpoint."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint: {spec} is not a complete fastlcm checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, target, per_rank: dict[str, Any],
                    meta: dict[str, Any], total_limit: int | None, lcm=None) -> Path:
    """Write checkpoint-<step> atomically (collective: every process calls it). Returns the final path.
    ``lcm``: the run's :class:`~fastlcm.sampling.scheduler.LCMSettings`, saved beside ``unet_target/``'s weights."""
    root = Path(output_dir)
    tmp, final = root / f".checkpoint-{step}.tmp", root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(per_rank, tmp / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target is not None:
            target.save_pretrained(tmp / "unet_target")
            if lcm is not None:
                lcm.save(tmp / "unet_target")
        info = {"step": step, "world_size": accelerator.num_processes, **meta}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=1))
        old = root / f".checkpoint-{step}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if total_limit:
            for stale in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, target) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate state and the target (None for LoRA); return (meta, this rank's per-rank state)."""
    meta = json.loads((path / STATE_FILE).read_text())
    if meta.get("world_size") != accelerator.num_processes:
        raise CheckpointError(f"{path}: written by {meta.get('world_size')} processes, resuming with "
                              f"{accelerator.num_processes}; the data position is per process, use the same count")
    if (target is None) != (path / LORA_DIR).is_dir():
        kind = "LoRA" if (path / LORA_DIR).is_dir() else "full-distillation"
        raise CheckpointError(f"{path} is a {kind} checkpoint; resume it with the same --lora setting")
    accelerator.load_state(str(path))
    if target is not None:
        from safetensors.torch import load_file

        weights = path / "unet_target" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(weights), device=str(next(target.parameters()).device))
        target.load_state_dict(state)
    per_rank = torch.load(path / f"rank{accelerator.process_index}.pt", weights_only=False)
    return meta, per_rank

