"""`fastlcm make-shards`'s library: write WebDataset tar shards from an image folder or from synthetic images.

Folder mode: every image under ``--images`` (jpg, jpeg, png, webp; recursive, sorted by path) becomes one sample
``<key>.<ext>`` with its caption from the side-car ``<stem>.txt`` and, if present, ``<stem>.json``. Image bytes are
copied as they are unless ``--format`` asks for re-encoding. Synthetic mode (``--synthetic N``): textured images of
random size in [--min-size, --max-size] with a caption describing them and LAION-like json metadata.

Shards are written as ``<out>/<prefix>-00000.tar`` … atomically (temporary file, then rename); the command prints
the brace spec to pass to ``--shards`` / ``ShardLoader``.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

from fastlcm.errors import MakeShardsError

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def _validate(args) -> None:
    if args.samples_per_shard < 1:
        raise MakeShardsError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if not 1 <= args.quality <= 100:
        raise MakeShardsError(f"--quality must be in 1..100, got {args.quality}")
    if args.synthetic is not None:
        if args.synthetic < 1:
            raise MakeShardsError(f"--synthetic must be >= 1, got {args.synthetic}")
        if not 1 <= args.min_size <= args.max_size:
            raise MakeShardsError(f"need 1 <= --min-size <= --max-size, got {args.min_size} and {args.max_size}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.prefix):
        raise MakeShardsError(f"--prefix may only use letters, digits, '_' and '-', got {args.prefix!r}")


def _key_for(rel: Path, used: set[str]) -> str:
    """A tar key from a relative path: no dots or slashes (the loader splits at the first dot), unique."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", rel.with_suffix("").as_posix()) or "image"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _reencode(data: bytes, fmt: str, quality: int, path: Path) -> bytes:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise MakeShardsError(f"cannot decode image {path}: {exc}") from exc
    buf = io.BytesIO()
    pil = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    rgb.save(buf, format=pil, **({"quality": quality} if fmt != "png" else {}))
    return buf.getvalue()


def folder_samples(args):
    """Yield ``(key, [(ext, bytes), ...])`` for each image of the folder, in sorted path order."""
    root = Path(args.images)
    if not root.is_dir():
        raise MakeShardsError(f"--images {root}: not a directory")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise MakeShardsError(f"--images {root}: no .jpg/.jpeg/.png/.webp files found")
    used: set[str] = set()
    for path in images:  # check every caption before anything is written
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file() and args.missing_caption == "error":
            raise MakeShardsError(
                f"no caption for {path}: expected {caption_path} (use --missing-caption skip|empty to go on)"
            )
    for path in images:
        caption_path, json_path = path.with_suffix(".txt"), path.with_suffix(".json")
        if caption_path.is_file():
            caption = caption_path.read_bytes()
        elif args.missing_caption == "skip":
            print(f"make-shards: skipping {path} (no {caption_path.name})", file=sys.stderr)
            continue
        else:
            caption = b""
        data = path.read_bytes()
        ext = IMAGE_SUFFIXES[path.suffix.lower()]
        if args.format is not None and args.format != ext:
            data, ext = _reencode(data, args.format, args.quality, path), args.format
        members = [(ext, data), ("txt", caption)]
        if json_path.is_file():
            try:
                json.loads(json_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise MakeShardsError(f"invalid JSON in {json_path}: {exc}") from exc
            members.append(("json", json_path.read_bytes()))
        yield _key_for(path.relative_to(root), used), members


def synthetic_samples(args):
    """Yield ``(key, members)`` for ``--synthetic N`` textured images of random size."""
    import numpy as np

    from fastlcm.testing import encode_image, synthetic_image

    rng = np.random.default_rng(args.seed)
    fmt = args.format or "jpg"
    for i in range(args.synthetic):
        h, w = (int(v) for v in rng.integers(args.min_size, args.max_size + 1, size=2))
        array, caption = synthetic_image(rng, h, w)
        meta = {"original_height": h, "original_width": w, "pwatermark": round(float(rng.uniform(0, 1)), 4)}
        yield f"{i:08d}", [
            (fmt, encode_image(array, fmt, args.quality)),
            ("txt", caption.encode()),
            ("json", json.dumps(meta).encode()),
        ]


class ShardWriter:
    """Writes samples into numbered tar shards ``out/{prefix}{i:05d}.tar``. Each shard is written to a hidden
    temporary file (``.{name}.tmp``), flushed to disk and renamed when complete, so a crash never leaves a truncated
    shard under a final name (make-shards and precompute)."""

    def __init__(self, out: Path, prefix: str, samples_per_shard: int, overwrite: bool = False):
        self.out, self.prefix, self.per_shard, self.overwrite = Path(out), prefix, samples_per_shard, overwrite
        self.paths: list[Path] = []
        """Shards written so far, the one in progress last."""
        self.samples = 0
        self._tar = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        final = self.out / f"{self.prefix}{len(self.paths):05d}.tar"
        if final.exists() and not self.overwrite:
            raise MakeShardsError(f"{final} already exists (pass --overwrite to replace it)")
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self.paths.append(final)
        self._count = 0

    def add(self, key: str, members) -> None:
        """One sample: ``members`` is a list of (extension, bytes)."""
        if self._tar is None:
            self._open()
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.samples += 1
        if self._count == self.per_shard:
            self.close()

    def close(self) -> None:
        """Finish the shard in progress (it may hold fewer than samples_per_shard samples)."""
        if self._tar is not None:
            self._tar.close()
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp, self.paths[-1])
            self._tar = self._tmp = None

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self.paths.pop()
            self._tar = self._tmp = None


def brace_spec(paths: list[Path]) -> str:
    """The webdataset-style spec naming exactly ``paths`` (consecutive numbered shards)."""
    if len(paths) == 1:
        return str(paths[0])
    stem = paths[0].name.rsplit("-", 1)[0]
    return str(paths[0].parent / f"{stem}-{{00000..{len(paths) - 1:05d}}}.tar")


def write_shards(args) -> ShardWriter:
    """Write the shards ``args`` (``fastlcm make-shards``' flags) describe; return the closed writer (its
    ``paths`` and ``samples``). Raises MakeShardsError (a bad flag or input, naming it) or OSError; a failed run
    removes what it started writing."""
    writer = None
    try:
        _validate(args)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise MakeShardsError(f"--out {out}: exists and is not a directory")
        samples = synthetic_samples(args) if args.synthetic is not None else folder_samples(args)
        first = next(samples, None)  # surface input errors before creating the output folder
        if first is None:
            raise MakeShardsError(f"--images {args.images}: every image was skipped (no captions)")
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out, f"{args.prefix}-", args.samples_per_shard, args.overwrite)
        writer.add(*first)
        for key, members in samples:
            writer.add(key, members)
        writer.close()
    except (MakeShardsError, OSError):
        if writer is not None:
            writer.abort()
        raise
    return writer
