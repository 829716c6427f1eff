"""The procedural captioned image set the shipped tiny teacher is trained on, and its caption classifier.

Each sample is one flat-coloured shape on a flat background, 64×64 by default, fully determined by
``(seed, index)``: shape × colour × position (3×3 grid) × background, with a little jitter in size and placement.
Captions read like ``"a red circle at the top left on a black background"`` (``"in the center"`` for the
middle cell), so a model that follows its caption has to get the shape, the colour, the place and the background.

:class:`CaptionClassifier` is a small CNN with one head per factor; ``fastlcm eval`` uses it to score whether a
sampled image shows what its caption says (caption agreement = shape and colour both right).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 80, 235),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (18, 18, 18), "gray": (115, 115, 115), "brown": (105, 62, 30)}
# (name, row, column) on a 3×3 grid; the phrase is what the caption says after the colour and shape.
POSITIONS = (
    ("top left", 0, 0),
    ("top", 0, 1),
    ("top right", 0, 2),
    ("left", 1, 0),
    ("center", 1, 1),
    ("right", 1, 2),
    ("bottom left", 2, 0),
    ("bottom", 2, 1),
    ("bottom right", 2, 2),
)
FACTORS = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "position": [p[0] for p in POSITIONS],
    "background": list(BACKGROUNDS),
}
CAPTION_WORDS = sorted(
    {"a", "at", "the", "on", "in", "background"}
    | set(SHAPES)
    | set(COLOURS)
    | set(BACKGROUNDS)
    | {w for name, _, _ in POSITIONS for w in name.split()}
)


def caption_for(labels: dict) -> str:
    """The caption of a label dict with keys ``shape``, ``colour``, ``position``, ``background``."""
    where = "in the center" if labels["position"] == "center" else f"at the {labels['position']}"
    return f"a {labels['colour']} {labels['shape']} {where} on a {labels['background']} background"


def parse_caption(caption: str) -> dict:
    """Inverse of :func:`caption_for`; raises ``ValueError`` naming the caption if it is not of that form."""
    words = caption.strip().lower().split()
    try:
        if words[0] != "a" or words[-1] != "background" or words[-3:-1][0] != "a":
            raise ValueError
        colour, shape, background = words[1], words[2], words[-2]
        middle = words[3:-3]
        if middle[-1] != "on":
            raise ValueError
        middle = middle[:-1]
        if middle == ["in", "the", "center"]:
            position = "center"
        elif middle[:2] == ["at", "the"]:
            position = " ".join(middle[2:])
        else:
            raise ValueError
        labels = {"shape": shape, "colour": colour, "position": position, "background": background}
        for key, values in FACTORS.items():
            if labels[key] not in values:
                raise ValueError
    except (ValueError, IndexError):
        raise ValueError(
            f"caption {caption!r} is not a procedural caption like 'a red circle at the top left on a black background'"
        ) from None
    return labels


def render(labels: dict, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the shape of ``labels`` (uint8 HxWx3); ``rng`` jitters size and placement (none: canonical)."""
    name_to_cell = {name: (r, c) for name, r, c in POSITIONS}
    row, col = name_to_cell[labels["position"]]
    jitter = rng.uniform(-1, 1, size=3) if rng is not None else np.zeros(3)
    ss = 2  # supersample for anti-aliased edges
    n = size * ss
    cell = n / 3
    cy = (row + 0.5) * cell + jitter[0] * 0.08 * cell
    cx = (col + 0.5) * cell + jitter[1] * 0.08 * cell
    r = cell * (0.40 + 0.05 * jitter[2])
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    shape = labels["shape"]
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        half = r * 0.88
        mask = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    elif shape == "triangle":
        top, bottom = cy - r, cy + r * 0.8
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= (yy - top) / (bottom - top) * r * 1.05)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    bg = np.array(BACKGROUNDS[labels["background"]], np.float32)
    fg = np.array(COLOURS[labels["colour"]], np.float32)
    img = np.where(mask[..., None], fg, bg)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def sample_labels(rng: np.random.Generator) -> dict:
    """Draw one label dict uniformly over the factors."""
    return {key: values[int(rng.integers(len(values)))] for key, values in FACTORS.items()}


def procedural_sample(index: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, str, dict]:
    """Sample ``index`` of the set for ``seed``: ``(uint8 image HxWx3, caption, labels)``; pure in its inputs."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    labels = sample_labels(rng)
    return render(labels, size, rng), caption_for(labels), labels


def procedural_batch(start: int, count: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, list[str], list[dict]]:
    """Samples ``start … start+count−1`` stacked: ``(uint8 [N,H,W,3], captions, labels)``."""
    items = [procedural_sample(i, seed, size) for i in range(start, start + count)]
    return np.stack([x[0] for x in items]), [x[1] for x in items], [x[2] for x in items]


def iter_procedural(count: int, seed: int = 0, size: int = 64, start: int = 0) -> Iterator[tuple[np.ndarray, str, dict]]:
    for i in range(start, start + count):
        yield procedural_sample(i, seed, size)


def write_procedural_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int = 256,
    seed: int = 0,
    size: int = 64,
    image_format: str = "png",
    prefix: str = "procedural",
) -> list[Path]:
    """Write the first ``num_samples`` samples as WebDataset shards ``<prefix>-00000.tar`` …; return the paths.

    Each sample has ``<key>.<image_format>``, ``<key>.txt`` (the caption) and ``<key>.json`` (the labels plus
    ``original_height``/``original_width``).
    """
    from fastlcm.testing import encode_image, write_tar

    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"num_samples and samples_per_shard must be >= 1, got {num_samples}, {samples_per_shard}")
    out = Path(out_dir)
    paths: list[Path] = []
    members: list[tuple[str, bytes]] = []
    for i, (image, caption, labels) in enumerate(iter_procedural(num_samples, seed, size)):
        key = f"{i:08d}"
        members.append((f"{key}.{image_format}", encode_image(image, image_format, quality=95)))
        members.append((f"{key}.txt", caption.encode()))
        meta = {**labels, "key": key, "original_height": size, "original_width": size}
        members.append((f"{key}.json", json.dumps(meta).encode()))
        if (i + 1) % samples_per_shard == 0 or i + 1 == num_samples:
            paths.append(write_tar(out / f"{prefix}-{len(paths):05d}.tar", members))
            members = []
    return paths


def write_caption_tokenizer(out_dir: str | os.PathLike, max_length: int = 77):
    """A ``CLIPTokenizer`` whose BPE vocabulary covers every caption word (written to ``out_dir``)."""
    from fastlcm import testing

    # Extend the fixed word list of fastlcm.testing with the caption words, then reuse its writer.
    original = testing._CORPUS
    testing._CORPUS = tuple(original) + tuple(CAPTION_WORDS) * 4
    try:
        return testing.write_clip_tokenizer(out_dir, max_length=max_length)
    finally:
        testing._CORPUS = original


# ----------------------------------------------------------------------------------------------------------------
# Caption classifier
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of :class:`CaptionClassifier`."""

    width: int = 16
    """Channels of the first conv layer (doubled at each of the 3 downsamplings)."""
    size: int = 64
    """Input resolution (images are resized to it)."""


def build_classifier(config: ClassifierConfig | None = None):
    """A small CNN on RGB in [-1, 1] with one linear head per factor (outputs concatenated in FACTORS order)."""
    import torch.nn as nn

    cfg = config or ClassifierConfig()
    w = cfg.width
    layers, ch = [], 3
    for out_ch in (w, 2 * w, 4 * w, 4 * w):
        layers += [nn.Conv2d(ch, out_ch, 3, padding=1), nn.GroupNorm(4, out_ch), nn.SiLU(), nn.MaxPool2d(2)]
        ch = out_ch
    # Keep a 4×4 spatial map so the position head sees where things are.
    layers += [nn.Flatten(), nn.Linear(ch * (cfg.size // 16) ** 2, 128), nn.SiLU()]
    layers += [nn.Linear(128, sum(len(v) for v in FACTORS.values()))]
    return nn.Sequential(*layers)


def split_logits(logits) -> dict:
    """Split the classifier output into ``{factor: logits}``."""
    out, i = {}, 0
    for key, values in FACTORS.items():
        out[key] = logits[:, i : i + len(values)]
        i += len(values)
    return out


def labels_to_targets(labels: list[dict]):
    import torch

    return {key: torch.tensor([values.index(lab[key]) for lab in labels]) for key, values in FACTORS.items()}


def to_model_input(images: np.ndarray):
    """uint8 [N,H,W,3] (or float [0,1]) → float [N,3,H,W] in [-1, 1]."""
    import torch

    x = torch.as_tensor(np.asarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2) * 2 - 1


def train_classifier(steps: int = 600, batch_size: int = 64, seed: int = 0, lr: float = 2e-3, log=print):
    """Train :func:`build_classifier` on fresh procedural samples (seed ``seed + 1000``); return the model.

    Light augmentation (pixel noise, brightness jitter, blur) keeps it usable on imperfect generated images.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = build_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        images, _, labels = procedural_batch(step * batch_size, batch_size, seed=seed + 1000)
        x = to_model_input(images)
        x = x * (1 + 0.15 * torch.randn(x.shape[0], 1, 1, 1, generator=gen)) + 0.1 * torch.randn(x.shape, generator=gen)
        soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
        blur = torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5  # generated images are softer than renders
        x = torch.where(blur, soft, x)
        logits = split_logits(model(x))
        targets = labels_to_targets(labels)
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in FACTORS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"classifier step {step} loss {loss.item():.4f}")
    return model.eval()


def classify(model, images: np.ndarray) -> list[dict]:
    """Predicted label dicts for uint8 [N,H,W,3] (or float [0,1]) images."""
    import torch

    with torch.no_grad():
        logits = split_logits(model(to_model_input(images)))
    preds = {k: v.argmax(1).tolist() for k, v in logits.items()}
    return [{k: FACTORS[k][preds[k][i]] for k in FACTORS} for i in range(len(images))]


def agreement(predicted: list[dict], labels: list[dict]) -> dict:
    """Per-factor accuracy plus ``caption_accuracy`` (shape and colour both right), as fractions."""
    n = max(len(labels), 1)
    out = {f"{k}_accuracy": sum(p[k] == lab[k] for p, lab in zip(predicted, labels)) / n for k in FACTORS}
    out["caption_accuracy"] = (
        sum(p["shape"] == lab["shape"] and p["colour"] == lab["colour"] for p, lab in zip(predicted, labels)) / n
    )
    return out


def save_classifier(model, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: str | os.PathLike | None = None):
    """Load the classifier weights (default: the one shipped in ``fastlcm/assets``)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSETS / "caption_classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"caption classifier weights not found: {path} (train with python -m fastlcm.demo.teacher)")
    model = build_classifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_TEACHER = ASSETS / "tiny_teacher"
