"""The one error hierarchy of tunelens.

Every error a user can cause derives from :class:`TunelensError`. Messages say what was expected, what
arrived and, where it helps, what to do. Subclasses that describe a bad value also derive from
``ValueError`` so generic callers can still catch them.
"""

from __future__ import annotations


class TunelensError(Exception):
    """Base class of every error tunelens raises on purpose."""


class ConfigError(TunelensError, ValueError):
    """A configuration value (a dataclass field, a job-file key, a CLI flag) is invalid."""


class SiteError(TunelensError, ValueError):
    """A hook site names an unknown kind, or a layer / head outside the model's range."""


class ShapeError(TunelensError, ValueError):
    """A tensor has the wrong shape, dtype or contains non-finite values."""


class PromptError(TunelensError, ValueError):
    """Prompts are empty, too long for the model, or misaligned where alignment is required."""


class ModelLoadError(TunelensError):
    """A model, tokenizer, GGUF file or adapter could not be found or read."""


class PairIncompatibleError(TunelensError):
    """The two models of a pair cannot be compared (sizes, tokenizer, parameter names)."""


class DeviceError(TunelensError):
    """A device was requested that this machine does not have."""


class BackendError(TunelensError):
    """A backend could not perform a read or write (unsupported site, failed forward)."""


class StoreError(TunelensError):
    """An activation store cannot be used as asked."""


class StoreCorruptError(StoreError):
    """A shard or manifest of an activation store is truncated, altered or missing."""


class StoreMismatchError(StoreError):
    """An activation store was made from other models, sites or data than asked for."""


class TaskError(TunelensError):
    """A task cannot generate what was asked (too few items, unknown relation, ...)."""


class ZooError(TunelensError):
    """A zoo name is unknown or a zoo model cannot be built."""


class JobError(TunelensError):
    """A batch job file is invalid or a job cannot run."""
