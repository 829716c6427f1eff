"""`fastlcm generate`: sample images from a distilled LCM UNet or an LCM-LoRA in 1–8 steps.

    fastlcm generate [--teacher DIR] (--unet DIR | --lora DIR) --prompt TEXT [--prompt TEXT …]
                     [--steps 4] [--guidance G] [--seed S] [--height H --width W] --out x.png

Several prompts are saved side by side in one PNG. The library is :mod:`fastlcm.sampling.generate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastlcm.cli import fail
from fastlcm.errors import FastlcmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher pipeline folder (default: shipped tiny teacher)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--unet", type=Path, help="full-distilled student UNet folder (or a pipeline folder with unet/)")
    which.add_argument("--lora", type=Path, help="LCM-LoRA weights folder (pipe.load_lora_weights)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several images")
    parser.add_argument("--negative-prompt", type=str, default=None,
                        help="negative prompt (LoRA with guidance > 1 only)")
    parser.add_argument("--steps", type=int, default=4, help="LCM sampling steps (default 4)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default 8.0 for --unet, 1.0 for --lora)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    parser.add_argument("--device", type=str, default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="weights dtype (default float16 on cuda, float32 on cpu)")
    parser.add_argument("--original-inference-steps", type=int, default=None, metavar="N",
                        help="the student's solver grid N (default: what its folder's fastlcm.json records, else 50)")
    parser.add_argument("--timestep-scaling", type=float, default=None, metavar="LAMBDA",
                        help="the student's timestep scaling (default: from its fastlcm.json, else 10)")
    parser.add_argument("--out", type=Path, required=True, help="output PNG path")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        return fail("generate", f"--steps must be >= 1, got {args.steps}", 2)
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 8 or v % 8):
            return fail("generate", f"--{flag} must be a positive multiple of 8, got {v}", 2)
    if args.original_inference_steps is not None and args.original_inference_steps < 1:
        return fail("generate", f"--original-inference-steps must be >= 1, got {args.original_inference_steps}", 2)
    if args.timestep_scaling is not None and not args.timestep_scaling > 0:
        return fail("generate", f"--timestep-scaling must be > 0, got {args.timestep_scaling}", 2)
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        return fail("generate", f"--out {args.out}: use a .png, .jpg or .webp file name", 2)
    import numpy as np
    import torch
    from PIL import Image

    from fastlcm.demo.procedural import TINY_TEACHER
    from fastlcm.sampling.generate import generate, load_pipeline

    teacher = args.teacher or TINY_TEACHER
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    guidance = args.guidance if args.guidance is not None else (8.0 if args.unet is not None else 1.0)
    try:
        pipe, note = load_pipeline(teacher, unet=args.unet, lora=args.lora, device=device, dtype=dtype,
                                   original_inference_steps=args.original_inference_steps,
                                   timestep_scaling=args.timestep_scaling)
    except (FastlcmError, OSError) as e:
        return fail("generate", e, 2)
    if note:
        print(f"fastlcm generate: note: {note}")
    images = generate(pipe, args.prompt, args.steps, guidance, args.seed, args.height, args.width, args.negative_prompt)
    row = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(args.out)
    print(f"wrote {args.out} ({len(images)} image(s), {images.shape[1]}x{images.shape[2]}, {args.steps} steps, "
          f"guidance {guidance})")
    return 0
