"""Linear probes on base and tuned activations, controls, and probe transfer across a pair.

The stable API (batch jobs, the app and the studies call it)::

    from probes import ProbeConfig, ProbeResult, fit_probes
    result = fit_probes({"base": acts_b, "tuned": acts_t}, labels, items, ProbeConfig(kind="logistic"))

Importing this package imports torch and the tunelens core only (no Streamlit, no Ray); the studies on
real models live in :mod:`probes.studies`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from probes.config import ProbeConfig
    from probes.fit import fit_probes
    from probes.result import ProbeResult

__all__ = ["ProbeConfig", "ProbeResult", "fit_probes"]

_WHERE = {"ProbeConfig": "probes.config", "ProbeResult": "probes.result", "fit_probes": "probes.fit"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
