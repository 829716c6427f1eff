"""A slow, plainly written pure-Python reference reader: the test oracle for the Rust ShardLoader.

It restates DESIGN.md "Data semantics the loader keeps" one small function at a time, with the standard library
``tarfile`` module and PIL, and is used only by tests and the loader benchmark — never for training.

- Members are split into (key, ext) at the first dot of the basename (``a.b.jpg`` → ``a``, ``b.jpg``; a directory
  part stays in the key, as in webdataset); extensions are lower-cased. Members without a dot in the basename and
  ``__…__`` members (``__index__``, ``__key__``, ``__x__/y.txt``: webdataset's ``skip_meta`` pattern) are ignored
  and do not end a sample. ``__meta__.json`` is an ordinary member (key ``__meta__``), as in webdataset.
- A sample ends when the key changes or an extension repeats; empty samples are dropped.
- Image = first present of jpg, png, jpeg, webp; caption = first of text, txt, caption (UTF-8, invalid bytes become
  U+FFFD); json parsed when present (``None`` when absent or unparsable).
- Decode with PIL ``convert("RGB")``, no EXIF rotation — PIL's quirks included, as the webdataset pipeline has
  them: 16-bit RGB(A) PNGs keep the high byte, but 16-bit gray PNGs (mode ``I;16``) are clipped at 255.
- Resize the short side to R with PIL's antialiased bilinear filter (long side ``int(R*long/short)``), crop R×R at a
  GIVEN (top, left), optionally flip horizontally, then ``(v/255 - 0.5)/0.5`` → float32 CHW.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from braceexpand import braceexpand  # the brace grammar webdataset uses: the reference for the Rust one

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
CAPTION_EXTS = ("text", "txt", "caption")
SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "filtered", "truncated_tar", "source_error")
_META = re.compile(r"^__[^/]*__($|/)")  # webdataset's skip_meta pattern, matched at the start of the name

# ----------------------------------------------------------------------------------------------------------------
# Shard specs
# ----------------------------------------------------------------------------------------------------------------


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """A shard spec as webdataset expands it (split on ``::``, then ``braceexpand`` each part) → list of URLs.

    Each spec of a list is expanded the same way, and empty ``::`` parts are skipped (they name no shard; webdataset
    would yield an empty URL), as the Rust loader does.
    """
    if isinstance(shards, (str, Path)):
        shards = [str(shards)]
    out: list[str] = []
    for spec in shards:
        for part in str(spec).split("::"):
            if part:
                out.extend(braceexpand(part))
    return out


def local_path(url: str) -> Path:
    """Path of a local shard URL (plain path or ``file://``); other schemes raise ValueError naming the URL."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url or url.startswith("pipe:"):
        raise ValueError(f"reference reader only reads local shards, got {url!r}")
    return Path(url)


# ----------------------------------------------------------------------------------------------------------------
# Tar members → samples
# ----------------------------------------------------------------------------------------------------------------


class TruncatedTar(Exception):
    """The tar ended inside a header or a member's data (``member``: the name whose data was cut, if known)."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/a.b.JPG`` → (``dir/a``, ``b.jpg``); ``None`` for names to ignore (no dot, ``__…__``, ``__…__/…``)."""
    slash = name.rfind("/")
    base = name[slash + 1 :]
    dot = base.find(".")
    if _META.match(name) or dot <= 0:
        return None
    return name[: slash + 1] + base[:dot], base[dot + 1 :].lower()


def iter_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Regular-file members ``(name, bytes)`` of a tar held in memory, in order; raises TruncatedTar at a cut."""
    fileobj = io.BytesIO(data)
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as exc:
        if not data.strip(b"\0"):
            return
        raise TruncatedTar(str(exc)) from exc
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as exc:
            raise TruncatedTar(str(exc)) from exc
        if info is None:
            break
        if not info.isreg():
            continue
        if info.offset_data + info.size > len(data):
            raise TruncatedTar(f"member {info.name!r} needs {info.size} bytes at offset {info.offset_data}", info.name)
        yield info.name, data[info.offset_data : info.offset_data + info.size]
    # tarfile treats a cut inside a later header as a clean end; a real end is zero blocks or nothing at all.
    rest = data[tar.offset :]
    if rest.strip(b"\0") and len(rest) < 512:
        raise TruncatedTar(f"partial header of {len(rest)} bytes at offset {tar.offset}")


def group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group ``(name, bytes)`` into ``(key, {ext: bytes})``: new sample on key change or repeated ext."""
    key, current = None, {}
    for name, payload in members:
        split = split_key(name)
        if split is None:
            continue
        k, ext = split
        if current and (k != key or ext in current):
            yield key, current
            current = {}
        key = k
        current[ext] = payload
    if current:
        yield key, current


@dataclass
class RefSample:
    """One sample as the loader should see it before decoding."""

    key: str
    shard: str
    image_ext: str
    image: bytes
    caption: str
    json: dict | None


@dataclass
class RefShard:
    """Everything the reader found in one shard: kept samples in order, skips by reason, truncation."""

    url: str
    samples: list[RefSample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    truncated: bool = False


def decode_caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def parse_json(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        value = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_shard(url: str, decode_check: bool = True) -> RefShard:
    """Read one local shard into a :class:`RefShard` (corrupt images are found by decoding when ``decode_check``)."""
    out = RefShard(url)
    try:
        data = local_path(url).read_bytes()
    except OSError:
        out.skipped["source_error"] += 1
        return out
    members: list[tuple[str, bytes]] = []
    try:
        for member in iter_members(data):
            members.append(member)
    except TruncatedTar as exc:
        out.truncated = True
        if exc.member is not None:
            members.append((exc.member, b""))  # its header was read: it belongs to the sample in progress
    groups = list(group_members(members))
    if out.truncated and groups:
        # the sample in progress when the tar ended (not yet closed by a key change) may be incomplete: dropped
        groups.pop()
    if out.truncated:
        out.skipped["truncated_tar"] += 1
    for key, exts in groups:
        image_ext = next((e for e in IMAGE_EXTS if e in exts), None)
        caption_ext = next((e for e in CAPTION_EXTS if e in exts), None)
        if image_ext is None:
            out.skipped["missing_image"] += 1
            continue
        if caption_ext is None:
            out.skipped["missing_caption"] += 1
            continue
        if decode_check:
            try:
                decode_rgb(exts[image_ext])
            except Exception:  # noqa: BLE001 - any PIL failure is a corrupt image
                out.skipped["corrupt_image"] += 1
                continue
        out.samples.append(
            RefSample(key, url, image_ext, exts[image_ext], decode_caption(exts[caption_ext]),
                      parse_json(exts.get("json")))
        )
    return out


def read_samples(shards: str | Sequence[str], decode_check: bool = True) -> tuple[list[RefSample], Counter]:
    """All kept samples of a spec in shard order then member order, plus skip counts by reason."""
    samples, skipped = [], Counter()
    for url in expand_shards(shards):
        shard = read_shard(url, decode_check)
        samples.extend(shard.samples)
        skipped.update(shard.skipped)
    return samples, skipped


def passes_filters(
    meta: dict | None, min_original_width: int = 0, min_original_height: int = 0, max_pwatermark: float | None = None
) -> bool:
    """The SDXL script's metadata filters (a missing field fails an active filter)."""
    meta = meta or {}
    if min_original_width and not meta.get("original_width", -1) >= min_original_width:
        return False
    if min_original_height and not meta.get("original_height", -1) >= min_original_height:
        return False
    if max_pwatermark is not None and not meta.get("pwatermark", float("inf")) <= max_pwatermark:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------


def decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes → HxWx3 uint8 exactly as PIL ``Image.open(...).convert("RGB")`` gives them."""
    from PIL import Image

    with warnings.catch_warnings():  # PIL warns about palette transparency it is asked to drop anyway
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``resolution``; the long side is ``int(R*long/short)``."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def resize_short_side(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """PIL antialiased bilinear resize of an HxWx3 uint8 array so that its short side is ``resolution``."""
    from PIL import Image

    h, w = rgb.shape[:2]
    nh, nw = resized_size(h, w, resolution)
    if (nh, nw) == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR), dtype=np.uint8)


def center_crop_coords(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(top, left) of the center crop in an image already resized to (height, width)."""
    return (height - resolution) // 2, (width - resolution) // 2


def crop_uint8(resized: np.ndarray, resolution: int, top: int, left: int, flip: bool) -> np.ndarray:
    """R×R crop at (top, left) of a resized HxWx3 array, flipped horizontally after the crop if asked; CHW uint8."""
    h, w = resized.shape[:2]
    if not (0 <= top <= h - resolution and 0 <= left <= w - resolution):
        raise ValueError(f"crop ({top}, {left}) of size {resolution} is outside the {h}x{w} resized image")
    out = resized[top : top + resolution, left : left + resolution]
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def normalize(chw_uint8: np.ndarray) -> np.ndarray:
    """(v/255 - 0.5)/0.5 as float32."""
    return ((chw_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)


def reference_pixels(
    image: bytes, resolution: int, top: int, left: int, flip: bool = False, dtype: str = "float32"
) -> np.ndarray:
    """The whole per-sample transform: decode → resize → crop at the given (top, left) → flip → normalize (CHW)."""
    resized = resize_short_side(decode_rgb(image), resolution)
    chw = crop_uint8(resized, resolution, top, left, flip)
    return chw if dtype == "uint8" else normalize(chw)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline the loader replaces (benchmark baseline)
# ----------------------------------------------------------------------------------------------------------------


class PilTransform:
    """Resize short side → random (or center) crop → optional flip → normalize, on a PIL image; picklable."""

    def __init__(self, resolution: int, crop: str = "random", random_flip: bool = False, seed: int = 0):
        self.resolution, self.crop, self.random_flip = resolution, crop, random_flip
        self.rng = np.random.default_rng(seed)

    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        r = self.resolution
        nh, nw = resized_size(image.height, image.width, r)
        if (nh, nw) != (image.height, image.width):
            image = image.resize((nw, nh), Image.BILINEAR)
        if self.crop == "center":
            top, left = center_crop_coords(nh, nw, r)
        else:
            top, left = int(self.rng.integers(0, nh - r + 1)), int(self.rng.integers(0, nw - r + 1))
        flip = bool(self.random_flip and self.rng.random() < 0.5)
        return normalize(crop_uint8(np.asarray(image), r, top, left, flip))


def _to_batch(samples):
    import torch

    pixels, captions = zip(*samples)
    return torch.from_numpy(np.stack(pixels)), list(captions)


def webdataset_pipeline(
    shards: str | Sequence[str],
    batch_size: int,
    resolution: int,
    *,
    shuffle_buffer: int = 1000,
    crop: str = "random",
    random_flip: bool = False,
    seed: int = 0,
    resampled: bool = True,
):
    """The webdataset + PIL pipeline of diffusers' ``train_lcm_distill_*_wds.py`` with the same transform.

    Returns a ``webdataset.DataPipeline`` yielding ``(pixels [B,3,R,R] float32, captions)``; wrap it in
    ``torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=N)`` to use N worker processes.
    """
    import webdataset as wds

    urls = expand_shards(shards)
    transform = PilTransform(resolution, crop, random_flip, seed)
    stages = [
        wds.ResampledShards(urls) if resampled else wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
    ]
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer))
    stages += [
        wds.decode("pil", handler=wds.warn_and_continue),
        wds.to_tuple("jpg;png;jpeg;webp", "text;txt;caption", handler=wds.warn_and_continue),
        wds.map_tuple(transform, lambda c: c),
        wds.batched(batch_size, collation_fn=_to_batch, partial=False),
    ]
    if not resampled:
        stages.insert(1, wds.split_by_worker)
    return wds.DataPipeline(*stages)
