"""`fastlcm precompute`'s library: encode image shards once into latent shards (VAE posterior + text embeddings).

Reads the images with :class:`fastlcm.data.ShardLoader` (one pass, no shuffle: deterministic; the crop and flip
of each image come from ``--seed`` and its stream position, as in training), encodes each crop's VAE posterior
(mean, std — unscaled) and the caption's text embeddings (the family's ``cached_fields``) with the teacher's own
encoders, placed as training places them (:meth:`fastlcm.families.Family.place`), and writes WebDataset
shards that :class:`fastlcm.data.LatentShardLoader` reads and ``fastlcm train --precomputed_latents`` trains on
without running the VAE or the text encoders. Format: :mod:`fastlcm.data.latents`.

Every shard is written under a temporary name and renamed when complete, so an interrupted run never leaves a
truncated ``.tar`` under a final name. Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) each process
reads its share of the source shards and writes ``r{rank:03d}-{i:05d}.tar``; rank 0 writes ``precompute.json``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastlcm.data.make_shards import ShardWriter
from fastlcm.errors import ConfigError
from fastlcm.families import ModelSource, check_location, detect

LATENT_DTYPES = ("float16", "float32", "bfloat16")
MANIFEST = "precompute.json"


@dataclass
class PrecomputeOptions:
    """What `fastlcm precompute` does (one field per flag)."""

    teacher: str
    """Teacher diffusers folder or Hub id (its VAE and text encoders are used)."""
    shards: str
    """Source image shards (any ShardLoader spec)."""
    out: str
    """Output folder for the latent shards and precompute.json."""
    resolution: int | None = None
    """Crop side in pixels (default: the teacher UNet's sample_size × 8)."""
    batch_size: int = 32
    """Images per VAE / text-encoder forward."""
    samples_per_shard: int = 1000
    """Samples per output shard."""
    latent_dtype: str = "float16"
    """Stored tensor dtype: float16, float32 or bfloat16 (the loader returns float32)."""
    center_crop: bool = False
    """Center crop instead of a random crop."""
    random_flip: bool = False
    """Flip each crop horizontally with probability 1/2 before encoding."""
    threads: int | None = None
    """Image decode threads (default: all CPUs)."""
    device: str | None = None
    """cuda or cpu (default: cuda when available; under a launcher, this process's GPU)."""
    mixed_precision: str = "no"
    """no | fp16 | bf16: text encoders in this dtype; the VAE too under bf16 (SD only) or with --vae."""
    max_samples: int | None = None
    """Stop after this many samples per process (default: all)."""
    seed: int = 0
    """Seed of the crops and flips."""
    overwrite: bool = False
    """Replace the latent shards and manifest of an earlier run in --out."""
    vae: str | None = None
    """A VAE folder / Hub id to use instead of the teacher's (e.g. an fp16-safe SDXL VAE)."""

    def validate(self) -> "PrecomputeOptions":
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ConfigError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for flag, v in (("--batch-size", self.batch_size), ("--samples-per-shard", self.samples_per_shard)):
            if v < 1:
                raise ConfigError(f"{flag} must be >= 1, got {v}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ConfigError(f"--latent-dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device must be cuda or cpu, got {self.device!r}")
        check_location("--teacher", self.teacher)
        if self.vae:
            check_location("--vae", self.vae)
        return self


# ------------------------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------------------------


class Encoder:
    """The teacher's VAE and text conditioner (no UNet is loaded), placed as training places them."""

    def __init__(self, opts: PrecomputeOptions, device):
        self.device = torch.device(device)
        source = ModelSource(opts.teacher, vae=opts.vae)
        try:
            self.family = detect(source)
        except ConfigError as e:
            raise type(e)(f"--teacher {e}") from None
        if opts.resolution is None:
            opts.resolution = self.family.native_resolution(source)
        self.resolution = opts.resolution
        teacher = self.family.load(source, unet=False)
        wd = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision, torch.float32)
        self.vae_dtype = self.family.place(teacher, self.device, wd, vae_replaced=opts.vae is not None)["vae"]
        self.vae, self.scaling_factor = teacher.vae, float(teacher.vae.config.scaling_factor)
        self.text = teacher.conditioner(self.device, self.resolution)

    def encode(self, pixels, captions: list[str]) -> dict[str, Any]:
        """{"mean", "std", *family.cached_fields}: float32 CPU tensors, one row per image."""
        with torch.inference_mode():
            dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
            out = {"mean": dist.mean, "std": dist.std, **self.text.embed(captions)}
            return {k: v.float().cpu() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------------


def _ours(p: Path) -> bool:
    n = p.name
    return p.is_file() and (n.endswith(".tar") or n.endswith(".tar.tmp") or n == MANIFEST
                            or (n.startswith(".precompute.rank") and n.endswith(".json")))


def prepare_out(out: str | os.PathLike, overwrite: bool, clean: bool = True) -> Path:
    """Create --out; refuse a non-empty one unless ``overwrite`` (which removes an earlier run's files only).

    Every rank checks (so all of them fail together instead of waiting for rank 0); only ``clean`` removes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    if entries and not overwrite:
        raise FileExistsError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0].name}); "
                              "pass --overwrite to replace an earlier precompute run, or choose another folder")
    for p in entries if clean else ():
        if _ours(p):
            p.unlink()
    return out


def sample_members(tensors: dict[str, Any], i: int, meta: dict[str, str], info: dict) -> list[tuple[str, bytes]]:
    """The members of one latent sample: safetensors of row ``i`` of each tensor, json, txt."""
    from safetensors.torch import save

    row = {k: v[i].contiguous().clone() for k, v in tensors.items()}
    return [("latent.safetensors", save(row, metadata=meta)),
            ("json", json.dumps(info).encode()),
            ("txt", info["caption"].encode())]


def write_rank(opts: PrecomputeOptions, encoder: Encoder, rank: int = 0, world_size: int = 1,
               progress: bool = True) -> dict:
    """Encode this rank's share of --shards into latent shards in --out; returns (and saves) its manifest."""
    from tqdm import tqdm

    from fastlcm.data import ShardLoader

    out, r = Path(opts.out), encoder.resolution
    dtype = getattr(torch, opts.latent_dtype)
    meta = {"format": "fastlcm-latents-1", "family": encoder.family.name, "resolution": str(r),
            "teacher": opts.teacher, "scaling_factor": repr(encoder.scaling_factor)}
    prefix = f"r{rank:03d}-" if world_size > 1 else ""
    loader = ShardLoader(opts.shards, 1, r, seed=opts.seed, shuffle_buffer=0, threads=opts.threads, rank=rank,
                         world_size=world_size, epochs=1, crop="center" if opts.center_crop else "random",
                         random_flip=opts.random_flip, pin_memory=False, prefetch_batches=max(2, 2 * opts.batch_size))
    writer = ShardWriter(out, prefix, opts.samples_per_shard, overwrite=True)  # prepare_out cleared --out
    bar = tqdm(total=opts.max_samples, unit="img", desc=f"precompute (rank {rank})" if world_size > 1 else
               "precompute", disable=not progress, file=sys.stderr)
    count, pending = 0, []
    try:
        it = iter(loader)
        while True:
            item = next(it, None) if (opts.max_samples is None or count + len(pending) < opts.max_samples) else None
            if item is not None:
                pending.append(item)
            if pending and (item is None or len(pending) == opts.batch_size):
                count += _encode_and_write(pending, encoder, writer, meta, dtype, prefix, count, r)
                bar.update(len(pending))
                pending = []
            if item is None:
                break
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if count == 0:
        raise ConfigError(f"--shards {opts.shards}: rank {rank} read no image (stats: {loader.stats()})")
    manifest = {"rank": rank, "count": count, "shards": [p.name for p in writer.paths], "prefix": prefix,
                "stats": loader.stats()}
    (out / f".precompute.rank{rank:03d}.json").write_text(json.dumps(manifest))
    return manifest


def _encode_and_write(items: list, encoder: Encoder, writer: ShardWriter, meta: dict, dtype, prefix: str,
                      start: int, r: int) -> int:
    pixels = torch.cat([b.pixels for b in items])
    captions = [b.captions[0] for b in items]
    tensors = {k: v.to(dtype) for k, v in encoder.encode(pixels, captions).items()}
    for i, b in enumerate(items):
        info = {"caption": captions[i], "original_size": b.original_sizes[0].tolist(),
                "crop": b.crop_coords[0].tolist(), "flipped": bool(b.flipped[0]), "resolution": r,
                "source_shard": b.shards[0], "source_key": b.keys[0]}
        writer.add(f"{prefix}{start + i:09d}", sample_members(tensors, i, meta, info))
    return len(items)


def shard_spec(out: Path, prefix: str, n: int) -> str:
    """Brace spec of ``out/{prefix}00000.tar`` … ``{prefix}{n-1:05d}.tar``."""
    return str(out / f"{prefix}00000.tar") if n == 1 else str(out / f"{prefix}{{00000..{n - 1:05d}}}.tar")


def finalize(opts: PrecomputeOptions, encoder_family: str, resolution: int, world_size: int) -> dict:
    """Merge the ranks' manifests into ``out/precompute.json`` (after every rank finished)."""
    out = Path(opts.out)
    ranks = []
    for rank in range(world_size):
        p = out / f".precompute.rank{rank:03d}.json"
        if not p.is_file():
            raise ConfigError(f"rank {rank} did not finish (no {p}); run precompute again with --overwrite")
        ranks.append(json.loads(p.read_text()))
    shards = [n for m in ranks for n in m["shards"]]
    absolute = out.resolve()
    manifest = {
        "format": "fastlcm-latents-1", "teacher": opts.teacher, "family": encoder_family, "resolution": resolution,
        "count": sum(m["count"] for m in ranks), "dtype": opts.latent_dtype, "shards": shards,
        "spec": "::".join(shard_spec(absolute, m["prefix"], len(m["shards"])) for m in ranks),
        "counts_per_rank": [m["count"] for m in ranks], "options": asdict(opts),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    for rank in range(world_size):
        (out / f".precompute.rank{rank:03d}.json").unlink()
    return manifest


def precompute(opts: PrecomputeOptions) -> dict | None:
    """The whole command; returns the manifest on rank 0 (None on other ranks)."""
    opts.validate()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank, local = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = opts.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{local}"
    barrier = None
    if world > 1:  # accelerate launch / torchrun: a CPU (gloo) group only to wait for each other
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        barrier = dist.barrier
    try:
        return _precompute(opts, rank, world, device, barrier)
    finally:
        if world > 1 and owned:
            dist.destroy_process_group()


def _precompute(opts: PrecomputeOptions, rank: int, world: int, device: str, barrier) -> dict | None:
    prepare_out(opts.out, opts.overwrite, clean=rank == 0)
    if barrier is not None:
        barrier()
    encoder = Encoder(opts, device)
    write_rank(opts, encoder, rank, world, progress=rank == 0)
    if barrier is not None:
        barrier()
    return finalize(opts, encoder.family.name, encoder.resolution, world) if rank == 0 else None
