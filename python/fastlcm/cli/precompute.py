"""`fastlcm precompute`: image shards → latent shards for ``fastlcm train --precomputed_latents``
(:mod:`fastlcm.data.precompute`)."""

from __future__ import annotations

import argparse

from fastlcm.cli import fail
from fastlcm.errors import FastlcmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="DIR", help="teacher diffusers folder or Hub id")
    parser.add_argument("--shards", required=True, metavar="SPEC", help="source image shards (brace spec, URL, ...)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the latent shards")
    parser.add_argument("--resolution", type=int, default=None, help="crop size (default: teacher sample_size*8)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder forward (default 32)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per output shard (1000)")
    parser.add_argument("--latent-dtype", default="float16", help="stored dtype: float16 (default), float32, bfloat16")
    parser.add_argument("--center-crop", action="store_true", help="center crop instead of random crop")
    parser.add_argument("--random-flip", action="store_true", help="random horizontal flip before encoding")
    parser.add_argument("--threads", type=int, default=None, help="image decode threads (default: all CPUs)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                        help="encoder dtype (default no = fp32)")
    parser.add_argument("--max-samples", type=int, default=None, help="stop after N samples per process")
    parser.add_argument("--seed", type=int, default=0, help="seed of crops and flips (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's output in --out")
    parser.add_argument("--vae", default=None, metavar="DIR", help="VAE to use instead of the teacher's")


def run(args: argparse.Namespace) -> int:
    from fastlcm.data.precompute import PrecomputeOptions, precompute

    opts = PrecomputeOptions(
        teacher=args.teacher, shards=args.shards, out=args.out, resolution=args.resolution,
        batch_size=args.batch_size, samples_per_shard=args.samples_per_shard, latent_dtype=args.latent_dtype,
        center_crop=args.center_crop, random_flip=args.random_flip, threads=args.threads, device=args.device,
        mixed_precision=args.mixed_precision, max_samples=args.max_samples, seed=args.seed,
        overwrite=args.overwrite, vae=args.vae)
    try:
        manifest = precompute(opts)
    except (FastlcmError, FileExistsError) as e:
        return fail("precompute", e, 1)
    if manifest is not None:
        print(f"wrote {manifest['count']} samples in {len(manifest['shards'])} shard(s) to {opts.out}")
        print(f"train with: fastlcm train ... --train_shards_path_or_url '{manifest['spec']}' --precomputed_latents "
              f"--resolution {manifest['resolution']}")
    return 0
