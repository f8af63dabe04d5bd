"""The circuits package's studies on real pairs: the entity-tracking circuit (SmolLM2 and Gemma-3) and the
context knob. :data:`STUDIES` is what ``tunelens demo`` and ``tunelens reproduce`` run of this package."""

from __future__ import annotations

from circuits.knob.analysis import DEMO as KNOB_DEMO
from circuits.knob.analysis import KnobConfig
from circuits.studies.knob import run_knob_study
from circuits.studies.runner import GEMMA_DEMO, GEMMA_FULL, SMOLLM2_DEMO, SMOLLM2_FULL, run_pair_study
from tunelens.studies import Study

STUDIES: tuple[Study, ...] = (
    Study(
        key="circuits",
        title="Entity-tracking circuit on SmolLM2: patching, CMAP, attribution, faithfulness, path patching",
        pair="smollm2-et",
        run=run_pair_study,
        demo=SMOLLM2_DEMO,
        full=SMOLLM2_FULL,
    ),
    Study(
        key="knob",
        title="Context knob: its layer, rank-1 DAS, steering with controls, transfer across the pair",
        pair="smollm2-knob",
        run=run_knob_study,
        demo=KNOB_DEMO,
        full=KnobConfig(),  # every held-out fact, every layer
    ),
    Study(
        key="circuits-gemma",
        title="Entity-tracking circuit on Gemma-3-270m (a base that already tracks entities)",
        pair="gemma3-et",
        run=run_pair_study,
        demo=GEMMA_DEMO,
        full=GEMMA_FULL,
        extra="gemma",
    ),
)

__all__ = ["STUDIES"]
