"""Every study tunelens runs on real pairs, from the analysis packages' own ``STUDIES`` tuples.

``tunelens demo`` runs each study with demo settings (in :data:`ORDER`), ``tunelens reproduce`` each with
full settings, one job unit per study. A study is looked up by its key; nothing is resolved from a string
naming a module.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from circuits.studies import STUDIES as CIRCUITS
from probes.studies import STUDIES as PROBES
from spectral.study import STUDIES as SPECTRAL
from tunelens.errors import ConfigError
from tunelens.io import atomic_write_json
from tunelens.studies import Progress, Study

VERSIONED = ("tunelens", "torch", "transformers", "transformer-lens", "nnsight", "peft", "ray")


def environment(out: Path, settings: Any, *, progress: Progress = lambda _: None) -> dict[str, Any]:
    """A study of the software itself: the versions that produced this results folder."""
    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    info = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}
    atomic_write_json(Path(out) / "environment.json", info)
    progress(f"environment: {versions}")
    return info


ENVIRONMENT = Study(
    key="environment",
    title="The software that produced the results (Python, platform, package versions)",
    pair=None,
    run=environment,
    demo=None,
    full={},
)

# The order the demo and reproduce run them in (a study may read what an earlier one saved).
ORDER = ("environment", "probes", "circuits", "spectral", "knob", "circuits-gemma")
_ALL = (ENVIRONMENT, *PROBES, *CIRCUITS, *SPECTRAL)
if sorted(s.key for s in _ALL) != sorted(ORDER):  # a missing, extra or repeated key
    raise ConfigError(f"study registry: keys {sorted(s.key for s in _ALL)} do not match the order {ORDER}")
STUDIES: dict[str, Study] = {s.key: s for s in sorted(_ALL, key=lambda s: ORDER.index(s.key))}


def study(key: str) -> Study:
    """The study named ``key``, or a clear error listing the known ones."""
    if key not in STUDIES:
        raise ConfigError(f"unknown study {key!r}; known: {', '.join(STUDIES)}")
    return STUDIES[key]


def sized(size: str) -> list[Study]:
    """The studies that have settings at ``size`` ("demo" or "full"), in :data:`ORDER`."""
    return [s for s in STUDIES.values() if getattr(s, size) is not None]
