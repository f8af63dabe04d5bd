"""The entity-tracking circuit study on any pair, with presets for SmolLM2 and Gemma-3 (demo and full size).

The runner :func:`run_pair_study` runs two analyses on one pair:

1. :func:`circuits.studies.entity_tracking.run_study` — residual patching in the tuned model, CMAP
   layer × head sweeps at the last and the query-label positions, the top heads patched together on
   held-out prompts (both directions, random heads as the control), attribution against the exact sweeps;
2. :func:`circuits.studies.circuit.run_circuit_study` — the circuit from those CMAP sweeps, its
   faithfulness by mean ablation in each model (the paper's scope and the circuit-positions scope), path
   patching for the value fetchers and position transmitters in the tuned model.

Results go under ``out/circuits`` and ``out/circuit``; ``out/summary.json`` holds the headline numbers
(with the zoo's held-out accuracies of both models). The presets: :data:`SMOLLM2_DEMO` /
:data:`SMOLLM2_FULL` for ``smollm2-et`` and :data:`GEMMA_DEMO` / :data:`GEMMA_FULL` for ``gemma3-et``
(Gemma-3-270m's base tracks entities weakly, about 0.48 on three boxes, chance 0.33, so the paper's
question — does fine-tuning *enhance* a circuit the base already has? — is well posed there, unlike on
SmolLM2 whose base is at chance).

Example (a toy-size run; ``pair``: a base and its fine-tune, tiny 4-layer Llamas, where a user would
take the zoo's trained ``zoo.load_pair("tiny")``)::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from circuits.studies.runner import TOY, run_pair_study
    >>> with tempfile.TemporaryDirectory() as out:
    ...     summary = run_pair_study(pair, out, TOY)
    ...     written = sorted(p.name for p in Path(out).iterdir())
    >>> written
    ['circuit', 'circuits', 'summary.json']
    >>> sorted(summary)
    ['circuit', 'pair', 'seconds', 'settings', 'study', 'zoo_accuracy']
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from circuits.circuit.groups import GroupSearchConfig
from circuits.studies.circuit import DEMO_SEARCH, run_circuit_study
from circuits.studies.entity_tracking import DEMO, FULL, StudySettings, run_study
from tunelens.errors import ConfigError
from tunelens.io import atomic_write_json
from tunelens.models.pair import ModelPair

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
# Gemma-3-270m has 72 heads (18 layers × 4), the paper's Llama-7B 1024 and SmolLM2 270: the four path-patching
# steps keep 4 / 2 / 3 / 2 heads out of candidate pools of 12 / 8 / 9 / 6 checked exactly (about a sixth of
# the heads per step; the paper checks every head).
GEMMA_SEARCH = GroupSearchConfig(top_k=(4, 2, 3, 2), n_candidates=(12, 8, 9, 6))


@dataclass(frozen=True, kw_only=True)
class PairStudySettings:
    """Sizes of both analyses: ``study`` for :func:`run_study`, the rest for ``run_circuit_study``.
    The defaults of the circuit's sizes are the demo's; ``search`` defaults to Gemma's pools."""

    study: StudySettings = field(default_factory=StudySettings)
    circuit_contexts: int = 4  # prompts for the CMAP circuit's faithfulness = 3 × circuit_contexts
    circuit_reference: int = 8  # worlds whose mean z replaces ablated heads
    circuit_top_k: int = 6  # CMAP heads per position in the circuit
    circuit_random: int = 5
    path_contexts: int = 4  # worlds for the four path-patching steps
    path_eval_contexts: int = 4  # worlds for minimality pruning and the path circuit's faithfulness
    search: GroupSearchConfig = GEMMA_SEARCH

    def __post_init__(self) -> None:
        counts = ("circuit_contexts", "circuit_reference", "path_contexts", "path_eval_contexts")
        if any(getattr(self, c) < 1 for c in counts):
            raise ConfigError(f"{', '.join(counts)} must be >= 1, got {[getattr(self, c) for c in counts]}")
        if self.circuit_top_k < 1 or self.circuit_random < 0:
            raise ConfigError(
                f"circuit_top_k must be >= 1 and circuit_random >= 0, got {self.circuit_top_k} "
                f"and {self.circuit_random}"
            )


GEMMA_DEMO = PairStudySettings(
    study=StudySettings(n_contexts=6, resid_contexts=1, resid_layer_step=2, top_k=6, n_random=8),
    circuit_contexts=6,
    circuit_reference=8,
)
GEMMA_FULL = PairStudySettings(
    study=StudySettings(
        n_contexts=100, resid_contexts=10, resid_positions="all", top_k=6, n_random=10, max_rows=512
    ),
    circuit_contexts=30,
    circuit_reference=30,
    circuit_random=10,
    path_contexts=20,
    path_eval_contexts=20,
    search=GroupSearchConfig(top_k=(4, 2, 3, 2), n_candidates=(24, 16, 18, 12)),
)
# SmolLM2 (270 heads): the demo runs the patching study at DEMO size and the circuit at the demo sizes
# with larger candidate pools (DEMO_SEARCH); the full size is Gemma's circuit sizes with the FULL study.
SMOLLM2_DEMO = PairStudySettings(study=DEMO, search=DEMO_SEARCH)
SMOLLM2_FULL = replace(GEMMA_FULL, study=FULL)
# A toy size for the tiny zoo pair and the tests.
TOY = PairStudySettings(
    study=StudySettings(n_contexts=2, resid_contexts=1, top_k=2, n_random=2),
    circuit_contexts=2, circuit_reference=2, circuit_top_k=2, circuit_random=2, path_contexts=2,
    path_eval_contexts=2, search=GroupSearchConfig(top_k=(1, 1, 1, 1), n_candidates=(2, 2, 2, 2)),
)  # fmt: skip


def _zoo_accuracy(pair_name: str) -> dict[str, Any]:
    """The held-out accuracies the zoo recorded when it built the fine-tune (empty if unknown)."""
    from tunelens.models import zoo

    if pair_name not in zoo.PAIRS:
        return {}
    tuned = zoo.PAIRS[pair_name][1]
    if not zoo.is_built(tuned):
        return {}
    rec = zoo.report(tuned)
    return {
        "base": rec.get("base_accuracy", {}),
        "tuned": rec.get("tuned_accuracy", {}),
        "build_seconds": rec.get("seconds"),
        "verdict": rec.get("verdict"),
    }


def run_pair_study(
    pair: ModelPair, out: Path, settings: PairStudySettings, *, progress: Progress = log.info
) -> dict[str, Any]:
    """Both analyses on ``pair`` at ``settings`` (a preset of this module, or your own); saves every
    Result under ``out`` and ``out/summary.json``; returns the headline numbers."""
    out = Path(out)
    t0 = time.time()
    summary: dict[str, Any] = {
        "pair": getattr(pair, "name", ""),
        "settings": asdict(settings),
        "zoo_accuracy": _zoo_accuracy(getattr(pair, "name", "")),
    }
    progress(f"circuits: patching, CMAP sweeps and head groups on {summary['pair'] or 'the pair'}")
    summary["study"] = run_study(pair, settings.study, out / "circuits", progress)
    progress("circuits: the circuit, its faithfulness in each model, path patching")
    summary["circuit"] = run_circuit_study(
        pair,
        out,
        progress,
        n_contexts=settings.circuit_contexts,
        n_reference=settings.circuit_reference,
        top_k=settings.circuit_top_k,
        n_random=settings.circuit_random,
        seed=settings.study.seed,
        n_pp_contexts=settings.path_contexts,
        n_eval_contexts=settings.path_eval_contexts,
        search=settings.search,
    )
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    progress(f"circuits: done in {summary['seconds']} s")
    return summary
