"""Model families: what a teacher is, in one place.

:func:`detect` reads a teacher's ``model_index.json`` once and matches its pipeline class (``_class_name``) to a
registered :class:`Family`; a pipeline of another family (SD3, Flux, anything unknown) is refused with
:class:`~fastlcm.errors.UnsupportedFamilyError` naming its class. :func:`get_family` looks a family up by the name
written into latent shards and exported metadata. Every module that needs family knowledge asks the family object
(see :mod:`fastlcm.families.base` for what it answers); none tests a family's name.

Adding a family: a module here with a class implementing :class:`Family` (subclass :class:`UNetFamily` for a
UNet latent-diffusion teacher), registered in :data:`FAMILIES` below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastlcm.errors import ConfigError, UnsupportedFamilyError
from fastlcm.families.base import MODEL_INDEX, Family, ModelSource, Teacher, UNetFamily, frozen
from fastlcm.families.sd import SDFamily, SDTextConditioner
from fastlcm.families.sdxl import SDXLFamily, SDXLTextConditioner

FAMILIES: dict[str, Family] = {f.name: f for f in (SDFamily(), SDXLFamily())}
"""Registered families by name."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = [
    "FAMILIES", "Family", "ModelSource", "SDTextConditioner", "SDXLTextConditioner", "Teacher", "UNetFamily",
    "check_location", "detect", "family_for_index", "frozen", "get_family", "load_teacher", "read_model_index",
    "supported_classes",
]  # fmt: skip


def get_family(name: str) -> Family:
    """The registered family called ``name`` ("sd", "sdxl"); ConfigError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def supported_classes() -> str:
    """"StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl)": for error messages."""
    return ", ".join(f"{c} ({f.name})" for f in FAMILIES.values() for c in f.pipeline_classes)


def check_location(flag: str, value: str) -> None:
    """A model flag names a diffusers folder (model_index.json, config.json or unet/ inside) or looks like a Hub
    id; ConfigError naming the flag otherwise. Touches no network."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not ((path / MODEL_INDEX).is_file() or (path / "config.json").is_file() or (path / "unet").is_dir()):
            raise ConfigError(f"{flag}: {value} is a folder but not a diffusers model (no {MODEL_INDEX}, "
                              "config.json or unet/)")
        return
    if path.exists():
        raise ConfigError(f"{flag}: {value} is a file; expected a diffusers model folder or a Hub model id")
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise ConfigError(f"{flag}: no such folder: {value}")


def read_model_index(source: ModelSource | str) -> dict:
    """The teacher's ``model_index.json`` as a dict: read from a local folder, or fetched from the Hub for a model
    id. ConfigError (one line, naming the path) when it is missing or unreadable."""
    source = source if isinstance(source, ModelSource) else ModelSource(str(source))
    root = Path(source.path).expanduser()
    if root.is_dir():
        index = root / MODEL_INDEX
        if not index.is_file():
            raise ConfigError(f"{source.path}: no {MODEL_INDEX} (expected a diffusers pipeline folder)")
    elif not source.local_files_only and _HUB_ID.match(source.path):
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(source.path, MODEL_INDEX, revision=source.revision,
                                         cache_dir=source.cache_dir))
        except Exception as e:  # noqa: BLE001 - huggingface_hub raises many error types (offline, 404, auth)
            raise ConfigError(f"{source.path}: cannot fetch {MODEL_INDEX} from the Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        raise ConfigError(f"{source.path}: no such folder")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{index}: unreadable {MODEL_INDEX} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{index}: {MODEL_INDEX} is not a JSON object")
    return data


def family_for_index(index: dict, where: str = "teacher") -> Family:
    """The family whose pipeline class is ``index["_class_name"]``; UnsupportedFamilyError otherwise."""
    cls = index.get("_class_name")
    if not isinstance(cls, str) or not cls:
        raise ConfigError(f"{where}: {MODEL_INDEX} has no _class_name (expected a diffusers pipeline)")
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    raise UnsupportedFamilyError(f"{where}: unsupported model family {cls} (fastlcm distills "
                                 f"{supported_classes()})")


def detect(source: ModelSource | str) -> Family:
    """The family of a teacher (local folder or Hub id), from its ``model_index.json``."""
    source = source if isinstance(source, ModelSource) else ModelSource(str(source))
    return family_for_index(read_model_index(source), source.path)


def load_teacher(source: ModelSource | str, *, unet: bool = True, dtype=None) -> Teacher:
    """:func:`detect` then that family's :meth:`~Family.load`: the teacher's frozen parts on CPU."""
    source = source if isinstance(source, ModelSource) else ModelSource(str(source))
    return detect(source).load(source, unet=unet, dtype=dtype)
