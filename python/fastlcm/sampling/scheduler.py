"""How a distilled student is sampled, recorded where the student is saved and read back by every sampler.

A student is distilled on a solver grid of N points (``--num_ddim_timesteps``) with the boundary scalings'
timestep scaling λ (``--timestep_scaling_factor``); diffusers' LCMScheduler must sample it on the same grid
(``original_inference_steps = N``) with the same λ (``timestep_scaling``), or it walks timesteps the student never
saw. Export writes these :class:`LCMSettings` as ``fastlcm.json`` into every folder a sampler is pointed at
(``unet/``, ``unet_target/``, ``pipeline/unet/``, a checkpoint's ``unet_target/``; for LCM-LoRA the output folder
beside the LoRA file), and ``fastlcm generate``, ``fastlcm eval`` and validation build their scheduler through
:func:`lcm_scheduler`, the one place that turns a teacher's schedule and these settings into an LCMScheduler.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from fastlcm.errors import ConfigError

SETTINGS_FILE = "fastlcm.json"
FORMAT = "fastlcm-lcm-1"
LCM_DEFAULTS = {"original_inference_steps": 50, "timestep_scaling": 10.0}
"""diffusers' LCMScheduler defaults (also the trainer's defaults for N and λ)."""


@dataclass(frozen=True)
class LCMSettings:
    """What sampling a distilled student needs beyond its weights."""

    original_inference_steps: int
    """N: points of the solver grid the student was distilled on (``--num_ddim_timesteps``)."""
    timestep_scaling: float
    """λ of the boundary scalings c_skip, c_out (``--timestep_scaling_factor``)."""
    guidance_embedding_dim: int
    """d of the guidance embedding e(w) the student takes (0: no w input, as LCM-LoRA)."""
    prediction_type: str
    """The teacher's prediction type (epsilon, v_prediction, sample)."""
    family: str
    """The teacher's model family ("sd", "sdxl")."""
    mode: Literal["full", "lora"]
    """Full distillation (a UNet with a guidance input) or LCM-LoRA."""

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/fastlcm.json``."""
        path = Path(folder) / SETTINGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "LCMSettings | None":
        """The settings saved in ``folder`` (or in its ``unet/``), None when there are none; ConfigError naming the
        file when it is unreadable or of another format."""
        folder = Path(folder)
        for path in (folder / SETTINGS_FILE, folder / "unet" / SETTINGS_FILE):
            if path.is_file():
                break
        else:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: unreadable sampler settings ({e})") from None


def lcm_scheduler(scheduler_config: dict, settings: LCMSettings | None = None, **overrides):
    """diffusers' LCMScheduler on the teacher's schedule (``scheduler_config``: the teacher's scheduler config, or
    an exported pipeline's) with the student's N and λ from ``settings``. Without settings, N and λ come from the
    config when it already is an LCMScheduler's, else LCMScheduler's defaults (50, 10). ``overrides``
    (``original_inference_steps``, ``timestep_scaling``; None = not given) win over both."""
    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    keep = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
    chosen = {k: keep.get(k, v) for k, v in LCM_DEFAULTS.items()}
    if settings is not None:
        chosen = {"original_inference_steps": settings.original_inference_steps,
                  "timestep_scaling": settings.timestep_scaling}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(chosen) - set(LCM_DEFAULTS)
    if unknown:
        raise TypeError(f"lcm_scheduler: unknown override(s) {sorted(unknown)}")
    return LCMScheduler.from_config({**keep, **chosen})


def sampling_note(settings: LCMSettings | None, where: str) -> str | None:
    """A one-line warning when a student comes without recorded settings (N and λ are then assumed), else None."""
    if settings is not None:
        return None
    return (f"no {SETTINGS_FILE} in {where}: sampling with original_inference_steps and timestep_scaling from the "
            "scheduler config or LCMScheduler's defaults (50, 10); pass --original-inference-steps / "
            "--timestep-scaling if the student was distilled with others")
