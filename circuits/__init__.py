"""circuits package (see the README).

Heavy modules load on first use: ``circuits.live_sweep`` imports :mod:`circuits.patching.live` when it is
read.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"live_sweep": "circuits.patching.live"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")
