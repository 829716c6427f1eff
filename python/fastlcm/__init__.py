"""fastlcm: distill a Stable Diffusion teacher into a few-step Latent Consistency Model.

A Rust core (``fastlcm._native``) streams WebDataset shards into pinned batches; the trainer runs latent
consistency distillation on Accelerate. See the README for the commands.
"""

from importlib.metadata import PackageNotFoundError, version as _dist_version

try:
    __version__ = _dist_version("fastlcm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = ["__version__", "native_core_version"]


def native_core_version() -> str:
    """Version of the compiled Rust core; raises ImportError with a fix if the extension is not built."""
    try:
        from fastlcm import _native
    except ImportError as exc:  # pragma: no cover - only in a broken install
        raise ImportError(
            "fastlcm's Rust extension (fastlcm._native) is not built; run `pip install .` or `maturin develop`"
        ) from exc
    return _native.core_version()
