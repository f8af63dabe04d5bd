"""The context knob on its own pair (``smollm2-knob``: SmolLM2 and a LoRA taught to follow or ignore the
context), as the demo and ``tunelens reproduce`` run it."""

from __future__ import annotations

import logging
from pathlib import Path

from circuits.knob.analysis import KnobConfig, run_knob
from tunelens.models.pair import ModelPair
from tunelens.studies import Progress

log = logging.getLogger(__name__)


def run_knob_study(
    pair: ModelPair, out: Path, settings: KnobConfig, *, progress: Progress = log.info
) -> dict:
    """:func:`circuits.knob.analysis.run_knob` at ``settings``, saved in ``out``; the headline numbers."""
    result = run_knob(pair, settings, progress=progress)
    result.save(Path(out))
    return {**result.summary(), "seconds": result.seconds}
