"""`fastlcm eval`: how close few-step samplers get to the teacher's 50-step DDIM output, and whether they follow
the caption.

For a fixed set of procedural prompts and fixed initial noises, every sampler starts from the same latents:

- the reference: teacher DDIM, 50 steps, classifier-free guidance ``--guidance``;
- teacher DDIM at 1/2/4/8 steps (same guidance);
- the student (a UNet with ``time_cond_proj_dim``, e.g. from ``fastlcm train``) with diffusers' LCMScheduler at
  1/2/4/8 steps, guidance embedded as w = guidance − 1 through ``timestep_cond`` (no CFG pass).

DDIM uses ``timestep_spacing="trailing"`` so the 50-step reference visits exactly the LCD solver grid
τ_i = 20(i+1) − 1 that the student was distilled on, and 1-step DDIM starts at t = 999 rather than t = 1.

Per sampler: ``latent_mse`` (mean over all latent elements, vs the reference), ``psnr`` (dB, decoded images in
[0, 1], averaged over images, capped at 100 for identical images) and ``caption_accuracy`` (fraction of images where
the caption classifier finds the prompt's shape and colour), written to ``report.json``; ``grid.png`` shows rows
teacher 50-step DDIM, teacher DDIM 4, student 4, 2, 1 steps for the same prompts and noise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fastlcm.demo.procedural import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, agreement, caption_for, classify
from fastlcm.demo.procedural import load_classifier
from fastlcm.errors import ConfigError
from fastlcm.families import ModelSource, Teacher, detect
from fastlcm.lcd.conditioning import Conditioning
from fastlcm.lcd.math import guidance_embedding
from fastlcm.sampling.options import EvalConfig
from fastlcm.sampling.scheduler import LCMSettings, lcm_scheduler
from fastlcm.sampling.student import load_student

PSNR_CAP = 100.0
GRID_ROWS = ("teacher_ddim_50", "teacher_ddim_4", "student_4", "student_2", "student_1")


def eval_prompts(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """``n`` captions covering every (shape, colour) pair in turn; position and background drawn from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    labels = []
    for i in range(n):
        labels.append(
            {
                "shape": SHAPES[i % len(SHAPES)],
                "colour": list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)],
                "position": POSITIONS[int(rng.integers(len(POSITIONS)))][0],
                "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
            }
        )
    return [caption_for(lab) for lab in labels], labels


class EvalTeacher:
    """The teacher's parts in fp32 on ``device`` (loaded through its family), its conditioning and decoding."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        source = ModelSource(str(path), local_files_only=True)
        try:
            family = detect(source)
        except ConfigError as e:
            raise type(e)(f"--teacher {e}") from None
        self.teacher: Teacher = family.load(source)
        self.path, self.device = Path(path), device
        for m in self.teacher.frozen_modules():
            m.to(device)
        self.unet, self.vae = self.teacher.unet, self.teacher.vae
        self.scheduler_config = self.teacher.scheduler_config
        self.latent_size = self.unet.config.sample_size
        self.latent_channels = family.latent_channels
        self.text = self.teacher.conditioner(device, fix_crop_and_size=True)

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.text.encode(prompts)

    def unconditional(self, n: int) -> Conditioning:
        return self.text.unconditional(n)

    def decode(self, latents):
        """Scaled latents → float images [N, H, W, 3] in [0, 1]."""
        with torch.no_grad():
            x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def ddim_sample(unet, scheduler_config, noise, cond: Conditioning, uncond: Conditioning, steps: int,
                guidance: float):
    """Teacher DDIM (eta 0, trailing spacing) with CFG from ``noise``; returns the final scaled latents."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    sched.set_timesteps(steps, device=noise.device)
    z = noise * sched.init_noise_sigma
    both = cond.cat(uncond).unet_kwargs()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([z, z]), t, **both).sample
            c, u = out.chunk(2)
            z = sched.step(u + guidance * (c - u), t, z).prev_sample
    return z


def lcm_sample(unet, scheduler_config, noise, cond: Conditioning, steps: int, guidance: float, seed: int = 0,
               settings: LCMSettings | None = None, **overrides):
    """Student sampling with LCMScheduler (:func:`~fastlcm.sampling.scheduler.lcm_scheduler`: the student's N and
    λ from ``settings`` / ``overrides``); w = guidance − 1 goes in through ``timestep_cond``."""
    dim = unet.config.time_cond_proj_dim
    if dim is None:
        raise ConfigError("the student UNet has no time_cond_proj_dim: it is not a full-distilled LCM UNet")
    sched = lcm_scheduler(scheduler_config, settings, **overrides)
    sched.set_timesteps(steps, device=noise.device)
    w = torch.full((noise.shape[0],), guidance - 1.0, device=noise.device)
    cond_emb = guidance_embedding(w, dim).to(noise.device)
    gen = torch.Generator(device=noise.device).manual_seed(seed)
    z, denoised = noise * sched.init_noise_sigma, None
    kwargs = cond.unet_kwargs()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(z, t, timestep_cond=cond_emb, **kwargs).sample
            z, denoised = sched.step(out, t, z, generator=gen, return_dict=False)
    return denoised


def psnr(a, b) -> float:
    """Mean per-image PSNR (dB) of float images in [0, 1]; identical images count as PSNR_CAP."""
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(1)
    vals = [PSNR_CAP if m <= 10 ** (-PSNR_CAP / 10) else 10 * math.log10(1.0 / m) for m in mse]
    return float(np.mean(vals))


def _batched(fn, n: int, batch: int):
    return torch.cat([fn(slice(i, min(n, i + batch))) for i in range(0, n, batch)])


def evaluate(
    teacher: str | Path | EvalTeacher,
    student: str | Path | None = None,
    out_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    classifier=None,
    student_unet=None,
    log=None,
) -> dict:
    """Run the benchmark; returns the report (and writes report.json + grid.png when ``out_dir`` is given).

    ``classifier`` is a model from :func:`fastlcm.demo.procedural.load_classifier` (default: the shipped one);
    ``student_unet`` may be passed instead of a ``student`` folder (its sampler settings are then N = 50, λ = 10
    unless the config overrides them)."""
    cfg = config or EvalConfig()
    if cfg.num_prompts < 1 or any(s < 1 for s in cfg.steps) or cfg.reference_steps < 1:
        raise ConfigError(f"num_prompts, steps and reference_steps must be >= 1, got {cfg}")
    t0 = time.perf_counter()
    teacher = teacher if isinstance(teacher, EvalTeacher) else EvalTeacher(teacher, cfg.device)
    settings = None
    if student_unet is None and student is not None:
        student_unet, settings = load_student(student, "--student", device=cfg.device)
    overrides = {"original_inference_steps": cfg.original_inference_steps, "timestep_scaling": cfg.timestep_scaling}
    if classifier is None:
        classifier = load_classifier()
    prompts, labels = eval_prompts(cfg.num_prompts, cfg.seed)
    cond, uncond = teacher.encode(prompts), teacher.unconditional(len(prompts))
    s, c = teacher.latent_size, teacher.latent_channels
    noise = torch.randn(len(prompts), c, s, s, generator=torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
    n, b = len(prompts), cfg.batch_size

    samplers = {f"teacher_ddim_{cfg.reference_steps}": ("ddim", cfg.reference_steps)}
    samplers.update({f"teacher_ddim_{k}": ("ddim", k) for k in cfg.steps})
    if student_unet is not None:
        samplers.update({f"student_{k}": ("lcm", k) for k in cfg.steps})
    latents, images, report = {}, {}, {}
    for name, (kind, k) in samplers.items():
        if name in latents:
            continue
        sched = teacher.scheduler_config
        if kind == "ddim":
            def one(sl, k=k):
                return ddim_sample(teacher.unet, sched, noise[sl], cond[sl], uncond[sl], k, cfg.guidance)
        else:
            def one(sl, k=k):
                return lcm_sample(student_unet, sched, noise[sl], cond[sl], k, cfg.guidance, cfg.seed, settings,
                                  **overrides)
        z = _batched(one, n, b)
        latents[name], images[name] = z, teacher.decode(z)
        if log:
            log(f"  {name}: sampled {n} prompts ({time.perf_counter() - t0:.0f} s)")
    ref = f"teacher_ddim_{cfg.reference_steps}"
    for name in samplers:
        entry = {
            "latent_mse": float(((latents[name] - latents[ref]) ** 2).mean()),
            "psnr": psnr(images[name], images[ref]),
        }
        uint8 = (images[name] * 255).round().astype(np.uint8)
        entry.update(agreement(classify(classifier, uint8), labels))
        report[name] = entry
    report["meta"] = {
        "teacher": str(teacher.path),
        "student": str(student) if student is not None else None,
        "num_prompts": n,
        "guidance": cfg.guidance,
        "student_w": cfg.guidance - 1.0,
        "reference": f"DDIM {cfg.reference_steps} steps, trailing spacing, CFG {cfg.guidance}",
        "seed": cfg.seed,
        "psnr_cap_db": PSNR_CAP,
        "wall_s": round(time.perf_counter() - t0, 2),
        **cfg.extra,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        rows = [r for r in GRID_ROWS if r in images]
        save_grid([images[r][: cfg.grid_columns] for r in rows], out / "grid.png")
        report["meta"]["grid_rows"] = rows
    return report


def save_grid(rows, path: str | Path, pad: int = 2) -> Path:
    """Save rows of float [N,H,W,3] images in [0, 1] (or uint8) as one PNG with ``pad`` white pixels between."""
    from PIL import Image

    rows = [np.asarray(r) for r in rows]
    rows = [(r * 255).round().astype(np.uint8) if r.dtype != np.uint8 else r for r in rows]
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    path = Path(path)
    Image.fromarray(canvas).save(path)
    return path


def format_table(report: dict) -> str:
    """The report as a fixed-width table (one row per sampler)."""
    lines = [f"{'sampler':<18}{'latent MSE':>12}{'PSNR dB':>10}{'caption acc':>13}"]
    for name, e in report.items():
        if name == "meta":
            continue
        lines.append(f"{name:<18}{e['latent_mse']:>12.4f}{e['psnr']:>10.2f}{100 * e['caption_accuracy']:>12.1f}%")
    return "\n".join(lines)

