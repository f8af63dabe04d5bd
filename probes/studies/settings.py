"""Settings of the three seed probe studies, and the sizes used by ``tunelens demo`` and ``reproduce``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from probes.config import ProbeConfig
from tunelens.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class CaptureSettings:
    """What every seed study shares: its seed, how it captures (batch size, backend, site kind) and the
    probe settings."""

    seed: int = 0
    batch_size: int = 16
    backend: str = "bridge"
    site_kind: str = "resid_post"
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("bridge", "nnsight"):
            raise ConfigError(f"backend must be 'bridge' or 'nnsight', got {self.backend!r}")
        if not isinstance(self.probe, ProbeConfig):
            raise ConfigError(f"probe must be a ProbeConfig, got {type(self.probe).__name__}")


@dataclass(frozen=True, kw_only=True)
class EntityTrackingSettings(CaptureSettings):
    """Entity tracking: ``n_contexts`` worlds of ``n_boxes`` boxes, every box queried once.

    ``label``: ``object`` (which object is in the queried box; one class per object word) or ``segment``
    (which sentence of the context holds it; ``n_boxes`` classes).
    """

    n_contexts: int
    n_boxes: int = 3
    label: Literal["object", "segment"] = "object"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label not in ("object", "segment"):
            raise ConfigError(f"label must be 'object' or 'segment', got {self.label!r}")
        if self.n_contexts < 2:
            raise ConfigError(f"n_contexts must be >= 2, got {self.n_contexts}")


@dataclass(frozen=True, kw_only=True)
class FactSettings(CaptureSettings):
    """Fact probes: ``n_facts`` facts sampled (seeded) from the shipped table (``None``: all of them)."""

    n_facts: int | None = None
    relations: tuple[str, ...] | None = None
    n_shots: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_facts is not None and self.n_facts < 10:
            raise ConfigError(f"n_facts must be None (all) or >= 10, got {self.n_facts}")


_DEMO_PROBE = ProbeConfig(test_fraction=0.5, n_seeds=1)
_FULL_PROBE = ProbeConfig(test_fraction=0.3, n_seeds=3)

DEMO_SETTINGS = {
    "entity_tracking": EntityTrackingSettings(n_contexts=70, probe=_DEMO_PROBE),
    "pik": FactSettings(n_facts=200, probe=_DEMO_PROBE),
    "wack": FactSettings(n_facts=200, probe=_DEMO_PROBE),
}
"""``tunelens demo``: ≥100 test examples each (half the data held out), one seed."""

REPRODUCE_SETTINGS = {
    "entity_tracking": EntityTrackingSettings(n_contexts=400, probe=_FULL_PROBE),
    "pik": FactSettings(n_facts=None, probe=_FULL_PROBE),
    "wack": FactSettings(n_facts=None, probe=_FULL_PROBE),
}
"""``tunelens reproduce``: 1,200 entity-tracking prompts, all 748 facts, 70/30 splits, 3 seeds."""
