"""``fastlcm eval``'s options (torch-free: the CLI builds its flags from the defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_STEPS = (1, 2, 4, 8)


@dataclass
class EvalConfig:
    """What ``fastlcm eval`` measures."""

    num_prompts: int = 30
    """Prompts (cycled over every shape × colour pair, positions and backgrounds drawn from ``seed``)."""
    guidance: float = 7.0
    """CFG scale of the teacher; the student embeds w = guidance − 1 (6: inside the trainer's default SD w range
    5–15)."""
    steps: tuple[int, ...] = DEFAULT_STEPS
    """Few-step budgets evaluated for both teacher DDIM and the student."""
    reference_steps: int = 50
    """DDIM steps of the reference."""
    seed: int = 0
    """Seed of prompts, initial noise and LCM's re-noising."""
    grid_columns: int = 8
    """Prompts shown in grid.png."""
    batch_size: int = 64
    """Prompts per UNet call."""
    device: str = "cpu"
    """torch device."""
    original_inference_steps: int | None = None
    """The student's solver grid N, overriding what its folder records (``fastlcm.json``)."""
    timestep_scaling: float | None = None
    """The student's timestep scaling λ, overriding what its folder records."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata copied into the report (e.g. the training command)."""
