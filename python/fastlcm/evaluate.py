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

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

PSNR_CAP = 100.0
DEFAULT_STEPS = (1, 2, 4, 8)
GRID_ROWS = ("teacher_ddim_50", "teacher_ddim_4", "student_4", "student_2", "student_1")


@dataclass
class EvalConfig:
    """What ``fastlcm eval`` measures."""

    num_prompts: int = 30
    """Prompts (cycled over every shape × colour pair, positions and backgrounds drawn from ``seed``)."""
    guidance: float = 7.0
    """CFG scale of the teacher; the student embeds w = guidance − 1 (6: inside the trainer's default SD w range 5–15)."""
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
    extra: dict = field(default_factory=dict)
    """Free-form metadata copied into the report (e.g. the training command)."""


def eval_prompts(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """``n`` captions covering every (shape, colour) pair in turn; position and background drawn from ``seed``."""
    import numpy as np

    from fastlcm.procedural import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, caption_for

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


class Teacher:
    """The teacher's parts in fp32 on ``device``: tokenizer, text encoder, UNet, VAE and scheduler config."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch
        from diffusers import StableDiffusionPipeline

        path = Path(path)
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"--teacher {path}: no model_index.json (expected a diffusers pipeline folder)")
        cls = json.loads(index.read_text()).get("_class_name")
        if cls != "StableDiffusionPipeline":
            raise ValueError(f"--teacher {path}: fastlcm eval supports StableDiffusionPipeline teachers, got {cls}")
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
        self.path, self.device = path, device
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder.to(device).eval()
        self.unet, self.vae = pipe.unet.to(device).eval(), pipe.vae.to(device).eval()
        self.scheduler_config = pipe.scheduler.config
        self.latent_size = self.unet.config.sample_size

    def encode(self, prompts: list[str]):
        import torch

        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def decode(self, latents):
        """Scaled latents → float images [N, H, W, 3] in [0, 1]."""
        import torch

        with torch.no_grad():
            x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def ddim_sample(unet, scheduler_config, noise, cond, uncond, steps: int, guidance: float):
    """Teacher DDIM (eta 0, trailing spacing) with CFG from ``noise``; returns the final scaled latents."""
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    sched.set_timesteps(steps, device=noise.device)
    z = noise * sched.init_noise_sigma
    ctx = torch.cat([cond, uncond])
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([z, z]), t, encoder_hidden_states=ctx).sample
            c, u = out.chunk(2)
            z = sched.step(u + guidance * (c - u), t, z).prev_sample
    return z


def lcm_sample(unet, scheduler_config, noise, cond, steps: int, guidance: float, seed: int = 0):
    """Student sampling with LCMScheduler; w = guidance − 1 goes in through ``timestep_cond``."""
    import torch
    from diffusers import LCMScheduler

    from fastlcm.lcd.math import guidance_embedding

    dim = unet.config.time_cond_proj_dim
    if dim is None:
        raise ValueError("the student UNet has no time_cond_proj_dim: it is not a full-distilled LCM UNet")
    sched = LCMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, device=noise.device)
    w = torch.full((noise.shape[0],), guidance - 1.0, device=noise.device)
    cond_emb = guidance_embedding(w, dim).to(noise.device)
    gen = torch.Generator(device=noise.device).manual_seed(seed)
    z, denoised = noise * sched.init_noise_sigma, None
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(z, t, encoder_hidden_states=cond, timestep_cond=cond_emb).sample
            z, denoised = sched.step(out, t, z, generator=gen, return_dict=False)
    return denoised


def load_student(path: str | Path, device: str = "cpu"):
    """A full-distilled UNet from a ``unet`` folder (config.json + weights) or a pipeline folder holding ``unet/``."""
    import torch
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        path = path / "unet"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--student {path}: no UNet config.json here or in {path / 'unet'}")
    unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float32)
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(f"--student {path}: UNet config has no time_cond_proj_dim (not a full-distilled LCM UNet)")
    return unet.to(device).eval()


def student_from_teacher(teacher_unet, out_dir: str | Path | None = None, time_cond_proj_dim: int = 256):
    """The teacher UNet rebuilt with ``time_cond_proj_dim`` (its weights, a zero guidance projection).

    A stand-in for a distilled student (tests, a "before training" row); saved to ``out_dir`` when given.
    """
    import torch

    from fastlcm.models import build_student

    student = build_student(teacher_unet, time_cond_proj_dim)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    dtype = next(teacher_unet.parameters()).dtype
    student = (student if dtype == torch.float32 else student.to(dtype=dtype)).eval()
    if out_dir is not None:
        student.save_pretrained(out_dir)
    return student


def psnr(a, b) -> float:
    """Mean per-image PSNR (dB) of float images in [0, 1]; identical images count as PSNR_CAP."""
    import numpy as np

    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(1)
    vals = [PSNR_CAP if m <= 10 ** (-PSNR_CAP / 10) else 10 * math.log10(1.0 / m) for m in mse]
    return float(np.mean(vals))


def _batched(fn, n: int, batch: int):
    import torch

    return torch.cat([fn(slice(i, min(n, i + batch))) for i in range(0, n, batch)])


def evaluate(
    teacher: str | Path | Teacher,
    student: str | Path | None = None,
    out_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    classifier=None,
    student_unet=None,
    log=None,
) -> dict:
    """Run the benchmark; returns the report (and writes report.json + grid.png when ``out_dir`` is given).

    ``classifier`` is a model from :func:`fastlcm.procedural.load_classifier` (default: the shipped one);
    ``student_unet`` may be passed instead of a ``student`` folder.
    """
    import numpy as np
    import torch

    from fastlcm.procedural import agreement, classify, load_classifier

    cfg = config or EvalConfig()
    if cfg.num_prompts < 1 or any(s < 1 for s in cfg.steps) or cfg.reference_steps < 1:
        raise ValueError(f"num_prompts, steps and reference_steps must be >= 1, got {cfg}")
    t0 = time.perf_counter()
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher, cfg.device)
    if student_unet is None and student is not None:
        student_unet = load_student(student, cfg.device)
    if classifier is None:
        classifier = load_classifier()
    prompts, labels = eval_prompts(cfg.num_prompts, cfg.seed)
    cond, uncond = teacher.encode(prompts), teacher.encode([""] * len(prompts))
    s = teacher.latent_size
    noise = torch.randn(len(prompts), 4, s, s, generator=torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
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
                return lcm_sample(student_unet, sched, noise[sl], cond[sl], k, cfg.guidance, cfg.seed)
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
    import numpy as np
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--teacher", type=Path, default=None, help="teacher pipeline folder (default: the shipped tiny teacher)")
    parser.add_argument("--student", type=Path, default=None, help="full-distilled student UNet folder (omit: teacher rows only)")
    parser.add_argument("--out", type=Path, default=Path("fastlcm-eval"), help="folder for report.json and grid.png")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts)
    parser.add_argument("--guidance", type=float, default=d.guidance, help="teacher CFG scale; student w = guidance - 1")
    parser.add_argument("--steps", type=str, default=",".join(map(str, d.steps)), help="comma-separated step counts")
    parser.add_argument("--reference-steps", type=int, default=d.reference_steps)
    parser.add_argument("--classifier", type=Path, default=None, help="caption classifier weights (default: shipped)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", type=str, default=None, help="torch device (default cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from fastlcm.procedural import TINY_TEACHER, load_classifier

    try:
        steps = tuple(int(s) for s in args.steps.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"fastlcm eval: --steps must be comma-separated integers, got {args.steps!r}") from None
    if not steps or min(steps) < 1:
        raise SystemExit(f"fastlcm eval: --steps must be positive integers, got {args.steps!r}")
    if args.num_prompts < 1:
        raise SystemExit(f"fastlcm eval: --num-prompts must be >= 1, got {args.num_prompts}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = EvalConfig(
        num_prompts=args.num_prompts,
        guidance=args.guidance,
        steps=steps,
        reference_steps=args.reference_steps,
        seed=args.seed,
        device=device,
    )
    try:
        report = evaluate(
            args.teacher or TINY_TEACHER,
            args.student,
            args.out,
            cfg,
            classifier=load_classifier(args.classifier),
            log=print,
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"fastlcm eval: {e}") from None
    print(format_table(report))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'grid.png'}")
    return 0
