"""Every error fastlcm raises on purpose derives from :class:`FastlcmError`, so a command catches one type.

Messages are one line and name what is wrong (the flag, the file, the shard and sample key). A command prints
``fastlcm <command>: error: <message>`` and exits non-zero; anything else escaping is a bug in fastlcm.

The data-loader errors are raised by the Rust core (``fastlcm._native`` binds these classes with pyo3's
``import_exception!``) and re-exported by :mod:`fastlcm.data`. Where an error also is a standard kind of error
(a bad value, a missing file) it derives from that built-in too, so ``except ValueError`` keeps working.

This module imports nothing: the CLI, the config and the extension all depend on it.
"""

from __future__ import annotations


class FastlcmError(Exception):
    """Root of every error fastlcm raises on purpose."""


# ---- configuration and models ----------------------------------------------------------------------------------


class ConfigError(FastlcmError, ValueError):
    """A bad flag or config value; the message is one line and names the flag."""


class UnsupportedFamilyError(ConfigError):
    """The teacher is a pipeline fastlcm cannot distill (an unknown ``_class_name`` in its model_index.json)."""


class CheckpointError(FastlcmError, RuntimeError):
    """A checkpoint cannot be found, read, or does not match this run."""


class NonFiniteLossError(FastlcmError, RuntimeError):
    """The loss became NaN/inf; raised before the update, so nothing corrupt is applied or saved."""


class MakeShardsError(FastlcmError):
    """A user-facing problem with the input or output of ``fastlcm make-shards`` (the message names the path or
    flag)."""


# ---- data loader (raised by the Rust core) ---------------------------------------------------------------------


class LoaderError(FastlcmError):
    """Base class of every data-loader failure."""


class LoaderOptionError(LoaderError, ValueError):
    """A loader option or shard spec is invalid (the message names the option or the spec)."""


class LoaderStateError(LoaderError, ValueError):
    """A loader ``state_dict`` cannot be loaded: malformed, of an unknown version, inconsistent, or saved by a
    loader with another configuration (the message names the differing option)."""


class ShardSourceError(LoaderError):
    """A shard could not be opened or streamed (file, HTTP, pipe)."""


class ShardNotFoundError(ShardSourceError, FileNotFoundError):
    """A local shard does not exist."""


class ShardPermissionError(ShardSourceError, PermissionError):
    """A local shard cannot be read (permissions)."""


class TarFormatError(LoaderError):
    """A shard is not a well-formed tar or ends early."""


class DecodeError(LoaderError):
    """An image member could not be decoded."""


class NoDataError(LoaderError):
    """Every source failed or nothing decodes."""


class TooManyRejectionsError(LoaderError):
    """Too many consecutive samples were skipped."""


class LatentFormatError(LoaderError):
    """A latent sample is corrupt, not in the fastlcm format, or not what the loader expects (family,
    resolution, tensor shapes). The message names the shard and the sample key."""


__all__ = [name for name, value in dict(globals()).items() if isinstance(value, type) and issubclass(value, Exception)]
