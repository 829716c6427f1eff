"""Tiny, offline builders used by tests, benchmarks and the demo.

Nothing here downloads. Teachers are random-weight diffusers pipelines saved in the exact folder layout of the
hub checkpoints (``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``; SDXL adds
``text_encoder_2/ tokenizer_2/``), so ``StableDiffusionPipeline.from_pretrained(dir)`` loads them like real ones.
The CLIP tokenizer gets a small byte-level BPE vocabulary learned here from a fixed word list.

Shards are WebDataset tar files: members ``<key>.<ext>`` grouped per sample (jpg/png/webp + txt + json).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer vocabulary
# ----------------------------------------------------------------------------------------------------------------

_CORPUS = (
    "a photo of red green blue yellow white black purple orange circle square triangle star cat dog on the "
    "at top bottom left right center background with and an image painting of small large tiny big in"
).split()

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes (GPT-2's byte↔unicode table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_clip_vocab(num_merges: int = 120) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a small BPE (vocab, merges) over a fixed corpus; every merge result is in the vocabulary."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in _CORPUS)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged: Counter = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(out_dir: str | os.PathLike, max_length: int = 77, pad_token: str = EOS_TOKEN):
    """Write a loadable ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) and return the tokenizer."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        model_max_length=max_length,
        pad_token=pad_token,
    )
    tok.save_pretrained(out)
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Tiny teachers
# ----------------------------------------------------------------------------------------------------------------

TEXT_HIDDEN = 32


@dataclass(frozen=True)
class TinyTeacherSpec:
    """What :func:`make_tiny_teacher` builds. ``family`` is ``"sd"`` (SD1.x/2.x layout) or ``"sdxl"``."""

    family: str = "sd"
    prediction_type: str = "epsilon"
    sample_size: int = 8
    """UNet latent size; the pixel resolution is 8× this (the VAE downsamples by 8)."""
    seed: int = 0


def _text_config(vocab_size: int, bos: int, eos: int, pad: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        hidden_act="quick_gelu" if not projection else "gelu",
    )


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _tiny_unet(spec: TinyTeacherSpec, cross_attention_dim: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=spec.sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )
    if sdxl:
        kwargs.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + TEXT_HIDDEN,
            use_linear_projection=True,
        )
    else:
        kwargs.update(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    return UNet2DConditionModel(**kwargs)


def ddim_scheduler(prediction_type: str = "epsilon"):
    """SD1.5's DDIM scheduler settings (scaled_linear 0.00085→0.012, 1000 train steps) for a prediction type."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def make_tiny_teacher(out_dir: str | os.PathLike, spec: TinyTeacherSpec | None = None, **overrides) -> Path:
    """Save a random-weight tiny teacher pipeline to ``out_dir`` in diffusers layout and return the path.

    ``overrides`` are fields of :class:`TinyTeacherSpec` (``family``, ``prediction_type``, ``sample_size``,
    ``seed``). The result loads offline with ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = spec or TinyTeacherSpec()
    if overrides:
        spec = TinyTeacherSpec(**{**spec.__dict__, **overrides})
    if spec.family not in ("sd", "sdxl"):
        raise ValueError(f"family must be 'sd' or 'sdxl', got {spec.family!r}")
    if spec.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {spec.prediction_type!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    tok = write_clip_tokenizer(out / "tokenizer")
    ids = dict(
        vocab_size=len(tok),
        bos=tok.convert_tokens_to_ids(BOS_TOKEN),
        eos=tok.convert_tokens_to_ids(EOS_TOKEN),
        pad=tok.pad_token_id,
    )
    scheduler = ddim_scheduler(spec.prediction_type)

    if spec.family == "sd":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(0.18215),
            text_encoder=CLIPTextModel(_text_config(projection=False, **ids)),
            tokenizer=tok,
            unet=_tiny_unet(spec, TEXT_HIDDEN, sdxl=False),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import StableDiffusionXLPipeline

        tok2 = write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
        pipe = StableDiffusionXLPipeline(
            vae=_tiny_vae(0.13025),
            text_encoder=CLIPTextModel(_text_config(projection=False, **ids)),
            text_encoder_2=CLIPTextModelWithProjection(
                _text_config(projection=True, **{**ids, "pad": tok2.pad_token_id})
            ),
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=_tiny_unet(spec, 2 * TEXT_HIDDEN, sdxl=True),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def load_tiny_pipeline(path: str | os.PathLike):
    """Load a teacher folder with the stock diffusers pipeline class its ``model_index.json`` names."""
    import diffusers

    index = json.loads((Path(path) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    return cls.from_pretrained(path, local_files_only=True)


# ----------------------------------------------------------------------------------------------------------------
# Tiny shards
# ----------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """A textured RGB image (gradient + noise + one coloured shape) and a caption describing it."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    tilt = rng.uniform(-1, 1, size=(3, 2)).astype(np.float32)
    img = np.stack([base[c] + 80 * (tilt[c, 0] * yy / height + tilt[c, 1] * xx / width) for c in range(3)], -1)
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
    r = rng.uniform(0.12, 0.25) * min(height, width)
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    else:
        mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = COLOURS[colour]
    return np.clip(img, 0, 255).astype(np.uint8), f"a {colour} {shape}"


def encode_image(array: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """Encode an HxWx3 (or HxW) uint8 array as jpg / png / webp bytes with PIL."""
    from PIL import Image

    pil_fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt.lower()]
    buf = io.BytesIO()
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(array).save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()


def write_tar(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write ``(name, data)`` members to a tar file in order (the building block for hostile shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def make_tiny_shards(
    out_dir: str | os.PathLike,
    num_samples: int = 16,
    samples_per_shard: int = 8,
    sizes: Sequence[tuple[int, int]] = ((64, 80), (96, 64), (72, 72), (128, 100)),
    image_format: str = "jpg",
    with_json: bool = True,
    seed: int = 0,
    prefix: str = "shard",
) -> list[Path]:
    """Write ``num_samples`` captioned images into shards ``<prefix>-00000.tar`` … and return their paths.

    ``image_format`` is ``jpg``, ``png``, ``webp`` or ``mixed`` (cycles through the three). Sizes cycle through
    ``sizes`` as (height, width). Each sample has ``<key>.<img>``, ``<key>.txt`` and optionally ``<key>.json``
    with ``original_height``/``original_width``/``pwatermark`` like LAION metadata.
    """
    rng = np.random.default_rng(seed)
    formats = ("jpg", "png", "webp") if image_format == "mixed" else (image_format,)
    paths, members = [], []
    out = Path(out_dir)
    for i in range(num_samples):
        h, w = sizes[i % len(sizes)]
        array, caption = synthetic_image(rng, h, w)
        fmt = formats[i % len(formats)]
        key = f"{i:08d}"
        members.append((f"{key}.{fmt}", encode_image(array, fmt)))
        members.append((f"{key}.txt", caption.encode()))
        if with_json:
            meta = {"key": key, "original_height": h, "original_width": w, "pwatermark": float(rng.uniform(0, 1))}
            members.append((f"{key}.json", json.dumps(meta).encode()))
        if (i + 1) % samples_per_shard == 0 or i + 1 == num_samples:
            paths.append(write_tar(out / f"{prefix}-{len(paths):05d}.tar", members))
            members = []
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Hostile and unusual shard builders (loader parity / robustness tests)
# ----------------------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(
    array: np.ndarray,
    color_type: int,
    bit_depth: int = 8,
    palette: np.ndarray | None = None,
    trns: bytes | None = None,
) -> bytes:
    """Encode a PNG by hand (filter 0 rows), for the variants PIL cannot write (16-bit RGB/RGBA/LA).

    ``color_type``: 0 gray, 2 RGB, 3 palette (``array`` holds indices, ``palette`` is Nx3 uint8), 4 gray+alpha,
    6 RGBA. ``bit_depth`` 8 or 16 (16: ``array`` is uint16). ``trns`` is a raw tRNS chunk payload.
    """
    import struct
    import zlib

    a = np.asarray(array)
    h, w = a.shape[:2]
    raw = a.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1).tobytes()
    stride = len(raw) // h
    rows = b"".join(b"\0" + raw[i * stride : (i + 1) * stride] for i in range(h))
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += _png_chunk(b"PLTE", np.asarray(palette, dtype=np.uint8).tobytes())
    if trns is not None:
        out += _png_chunk(b"tRNS", trns)
    return out + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")


PNG_VARIANTS = ("rgb8", "rgb16", "gray8", "gray16", "palette", "palette_trns", "rgba8", "rgba16", "gray_alpha8")


def png_variant(rng: np.random.Generator, height: int, width: int, variant: str) -> bytes:
    """A synthetic image as a PNG of one of :data:`PNG_VARIANTS` (bit depth, gray, palette, alpha)."""
    rgb, _ = synthetic_image(rng, height, width)
    wide = (rgb.astype(np.uint32) * 256 + rng.integers(0, 256, size=rgb.shape)).astype(np.uint16)  # high byte = rgb
    gray = rgb.mean(axis=2).astype(np.uint8)
    alpha = rng.integers(0, 256, size=(height, width, 1)).astype(np.uint8)
    if variant == "rgb8":
        return png_bytes(rgb, 2)
    if variant == "rgb16":
        return png_bytes(wide, 2, 16)
    if variant == "gray8":
        return png_bytes(gray, 0)
    if variant == "gray16":
        return png_bytes(wide[:, :, 0], 0, 16)
    if variant in ("palette", "palette_trns"):
        palette = rng.integers(0, 256, size=(16, 3)).astype(np.uint8)
        index = (gray // 16).astype(np.uint8)
        trns = bytes(range(0, 256, 16)) if variant == "palette_trns" else None
        return png_bytes(index, 3, palette=palette, trns=trns)
    if variant == "rgba8":
        return png_bytes(np.concatenate([rgb, alpha], axis=2), 6)
    if variant == "rgba16":
        return png_bytes(np.concatenate([wide, alpha.astype(np.uint16) * 257], axis=2), 6, 16)
    if variant == "gray_alpha8":
        return png_bytes(np.stack([gray, alpha[:, :, 0]], axis=2), 4)
    raise ValueError(f"unknown PNG variant {variant!r}; expected one of {PNG_VARIANTS}")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels but whose data is a few bytes (a bomb/lie)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_declared_size(width: int, height: int, seed: int = 0) -> bytes:
    """A small real JPEG with its SOF0 frame header patched to declare ``width`` x ``height`` (max 65535)."""
    rng = np.random.default_rng(seed)
    data = bytearray(encode_image(synthetic_image(rng, 32, 32)[0], "jpg"))
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise RuntimeError("PIL wrote a JPEG without a baseline SOF0 marker")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def tar_member_offsets(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of a tar file (to cut a shard inside a chosen member)."""
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def truncated_copy(path: str | os.PathLike, out: str | os.PathLike, length: int) -> Path:
    """Write the first ``length`` bytes of the tar at ``path`` to ``out`` (a shard cut short mid-transfer)."""
    out = Path(out)
    out.write_bytes(Path(path).read_bytes()[:length])
    return out
