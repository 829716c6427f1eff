"""`fastlcm generate`: sample images from a distilled LCM UNet or an LCM-LoRA in 1–8 steps.

    fastlcm generate [--teacher DIR] (--unet DIR | --lora DIR) --prompt TEXT [--prompt TEXT …]
                     [--steps 4] [--guidance G] [--seed S] [--height H --width W] --out x.png

The teacher folder (default: the shipped tiny teacher) supplies the VAE, text encoder(s), tokenizer(s) and the
scheduler config; its ``model_index.json`` picks StableDiffusionPipeline or StableDiffusionXLPipeline. The
scheduler is diffusers' LCMScheduler. A full-distilled UNet (``time_cond_proj_dim`` set) gets the guidance as
w = guidance − 1 through ``timestep_cond`` and runs one forward per step; an LCM-LoRA runs on the teacher's UNet
and uses ordinary classifier-free guidance when guidance > 1. Several prompts are saved side by side in one PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, default=None, help="teacher pipeline folder (default: shipped tiny teacher)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--unet", type=Path, help="full-distilled student UNet folder (or a pipeline folder with unet/)")
    which.add_argument("--lora", type=Path, help="LCM-LoRA weights folder (pipe.load_lora_weights)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several images")
    parser.add_argument("--negative-prompt", type=str, default=None, help="negative prompt (LoRA with guidance > 1 only)")
    parser.add_argument("--steps", type=int, default=4, help="LCM sampling steps (default 4)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 8.0 for --unet, 1.0 for --lora)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    parser.add_argument("--device", type=str, default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="weights dtype (default float16 on cuda, float32 on cpu)")
    parser.add_argument("--out", type=Path, required=True, help="output PNG path")


def _fail(msg: str) -> int:
    print(f"fastlcm generate: {msg}", file=sys.stderr)
    return 2


def pipeline_class_name(teacher: Path) -> str:
    """The ``_class_name`` of a teacher folder, or raise ``ValueError``/``FileNotFoundError`` naming the path."""
    index = teacher / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--teacher {teacher}: no model_index.json (expected a diffusers pipeline folder)")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"--teacher {index}: unreadable model_index.json ({e})") from None
    if name not in SUPPORTED:
        raise ValueError(f"--teacher {teacher}: pipeline class {name} is not supported (expected one of {SUPPORTED})")
    return name


def unet_folder(path: Path) -> Path:
    """A UNet folder from ``--unet`` (the folder itself or its ``unet/`` subfolder)."""
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"--unet {path}: no config.json here or in {path / 'unet'} (expected a diffusers UNet folder)")


def build_pipeline(teacher: Path, unet: Path | None = None, lora: Path | None = None, device: str = "cpu", dtype=None):
    """Load the teacher pipeline with the student UNet or LoRA applied and an LCMScheduler."""
    import diffusers
    import torch
    from diffusers import LCMScheduler, UNet2DConditionModel

    dtype = dtype or torch.float32
    cls = getattr(diffusers, pipeline_class_name(teacher))
    kwargs = {"torch_dtype": dtype, "local_files_only": True}
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if unet is not None:
        student = UNet2DConditionModel.from_pretrained(unet_folder(unet), torch_dtype=dtype)
        if student.config.time_cond_proj_dim is None:
            raise ValueError(f"--unet {unet}: config has no time_cond_proj_dim (not a full-distilled LCM UNet; "
                             "an LCM-LoRA goes in --lora)")
        kwargs["unet"] = student
    pipe = cls.from_pretrained(teacher, **kwargs)
    if lora is not None:
        if not lora.exists():
            raise FileNotFoundError(f"--lora {lora}: no such file or folder")
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts: list[str], steps: int = 4, guidance: float = 8.0, seed: int = 0,
             height: int | None = None, width: int | None = None, negative_prompt: str | None = None):
    """Float images [N, H, W, 3] in [0, 1]."""
    import torch

    extra = {}
    if negative_prompt is not None:
        extra["negative_prompt"] = [negative_prompt] * len(prompts)
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="np",
        **extra,
    )
    return out.images


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from fastlcm.procedural import TINY_TEACHER

    teacher = args.teacher or TINY_TEACHER
    if args.steps < 1:
        return _fail(f"--steps must be >= 1, got {args.steps}")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 8 or v % 8):
            return _fail(f"--{flag} must be a positive multiple of 8, got {v}")
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        return _fail(f"--out {args.out}: use a .png, .jpg or .webp file name")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    guidance = args.guidance if args.guidance is not None else (8.0 if args.unet is not None else 1.0)
    try:
        pipe = build_pipeline(teacher, unet=args.unet, lora=args.lora, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        return _fail(str(e))
    images = generate(pipe, args.prompt, args.steps, guidance, args.seed, args.height, args.width, args.negative_prompt)
    row = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(args.out)
    print(f"wrote {args.out} ({len(images)} image(s), {images.shape[1]}x{images.shape[2]}, {args.steps} steps, "
          f"guidance {guidance})")
    return 0
