"""Study (a): where do base and tuned models hold *which object is in the queried box*?

Prompts ``The apple is in Box F. The cup is in Box Q. … Box Q contains the`` (:mod:`tunelens.tasks.
entity_tracking`); the probe reads the residual stream at the last token, every layer, and predicts the
queried object (one class per object word; or, with ``label="segment"``, which sentence holds it). The
split keeps a world's queries together. The control task gives each *query box letter* a random object:
the letter is two tokens back, so a probe that merely memorises letters scores on the control.

Example (``pair``: a base and its fine-tune, tiny 4-layer Llamas; toy sizes: a reported score needs 100
held-out examples, so ``tunelens demo`` runs ``DEMO_SETTINGS["entity_tracking"]`` of
:mod:`probes.studies.settings`, 70 worlds with half of them held out):
    >>> from probes.config import ProbeConfig
    >>> toy = EntityTrackingSettings(n_contexts=20, probe=ProbeConfig(min_test_items=10))
    >>> res = entity_tracking_study(pair, toy)
    >>> res.summary()["n_test"], res.summary()["n_test_items"]  # 6 held-out worlds of 3 queries each
    (18, 6)
    >>> fig = res.figure()  # score by layer, both models, with the control task
"""

from __future__ import annotations

import logging

import torch

from probes.fit import fit_probes
from probes.result import ProbeResult
from probes.studies.capture import Progress, capture_for
from probes.studies.settings import EntityTrackingSettings
from tunelens.models.pair import ModelPair
from tunelens.results import pair_provenance
from tunelens.tasks import entity_tracking as et
from tunelens.tasks.base import answer_token_id

log = logging.getLogger(__name__)


def entity_tracking_study(
    pair: ModelPair, settings: EntityTrackingSettings, *, progress: Progress | None = None
) -> ProbeResult:
    """Probe every layer of both models for the queried object, at the last token."""
    data = et.generate(
        et.EntityTrackingConfig(n_boxes=settings.n_boxes, n_contexts=settings.n_contexts), seed=settings.seed
    )
    acts, top = capture_for(pair, data, settings, progress=progress)
    if settings.label == "object":
        names = sorted({e.answer.strip() for e in data})
        labels = torch.tensor([names.index(e.answer.strip()) for e in data])
    else:
        names = [f"sentence {i + 1}" for i in range(settings.n_boxes)]
        labels = torch.tensor([e.meta["query_index"] for e in data])
    answers = torch.tensor([answer_token_id(pair.tokenizer, e.answer) for e in data])
    model_acc = {role: round(float((top[role] == answers).float().mean()), 4) for role in top}
    letters = [e.meta["labels"][e.meta["query_index"]] for e in data]
    notes = {
        "data": f"{settings.n_contexts} worlds x {settings.n_boxes} boxes, seed {settings.seed}, "
        f"dataset {data.content_hash()}",
        "label": settings.label,
        "position": "last token (' the' after 'Box X contains')",
        "control_type": "the query's box letter",
        "model_accuracy_greedy": model_acc,
        "chance": 1 / settings.n_boxes,
    }
    if progress is not None:
        progress(f"  models' own greedy accuracy: {model_acc}; fitting probes")
    return fit_probes(
        acts,
        labels,
        [e.item_id for e in data],
        settings.probe,
        pair=pair_provenance(pair),
        types=letters,
        site_kind=settings.site_kind,
        task=f"entity_tracking ({settings.label})",
        class_names=names,
        notes=notes,
    )
