"""Studies (b) and (c): does the model *know* a fact, and does it know it but answer wrongly anyway?

(b) **P(IK)-style** (Kadavath et al. 2022, as a frozen probe): for each fact of the shipped table the
completion prompt (``The capital of France is``) is read at its last token, every layer; the label is
whether *that model's* greedy next token is the answer's first token (the criterion of
:func:`tunelens.tasks.knowledge.known_by`). Base and tuned are labelled separately — each probe learns
its own model's knowledge — so the transfer scores ask whether the base model's "I know this" direction
still separates what the *tuned* model knows (and the reverse). How many labels changed is in ``notes``.

(c) **WACK-style** (Simhi et al.): the same facts after three wrong demonstrations of the same relation
(:func:`tunelens.tasks.knowledge.misleading_context`), read at the last prompt token (WACK's pre-answer
setting). Three classes per model: the model does not know the fact (HK−: wrong on the plain prompt),
knows it and stays correct, or knows it but answers wrongly under the misleading context (HK+).
Differences from the paper: knowledge is one greedy answer (not greedy + 5 samples), and the probe is
the shared logistic probe on standardised activations (the paper: LinearSVC on L2-normalised vectors).

The control task gives each fact *subject* a random label; a subject recurs across relations
(France: capital, continent, language, currency), so memorising subjects would show on the control.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence

import torch

from probes.fit import fit_probes
from probes.result import ProbeResult
from probes.studies.capture import Progress, capture_for
from probes.studies.settings import FactSettings
from tunelens.errors import ConfigError
from tunelens.models.pair import ModelPair
from tunelens.results import pair_provenance
from tunelens.tasks.base import Dataset, Example, answer_token_id
from tunelens.tasks.facts import Fact, fact_prompt, load_facts
from tunelens.tasks.knowledge import misleading_context

log = logging.getLogger(__name__)
WACK_CLASSES = ("does not know (HK-)", "knows, stays correct", "knows, wrong under misleading context (HK+)")


def sample_facts(settings: FactSettings) -> tuple[Fact, ...]:
    """The facts a study uses: all (or some relations), or ``n_facts`` of them sampled with the seed."""
    facts = load_facts(settings.relations)
    if settings.n_facts is None or settings.n_facts >= len(facts):
        return facts
    keep = set(random.Random(f"facts:{settings.seed}").sample(range(len(facts)), settings.n_facts))
    return tuple(f for i, f in enumerate(facts) if i in keep)


def _prompts(facts: Sequence[Fact]) -> Dataset:
    examples = tuple(
        Example(
            prompt=fact_prompt(f),
            answer=" " + f.answer,
            item_id=f.item_id,
            meta={"relation": f.relation, "subject": f.subject},
        )
        for f in facts
    )
    return Dataset(task="fact_prompts", config={"n": len(facts)}, examples=examples)


def _answer_ids(pair: ModelPair, data: Dataset) -> torch.Tensor:
    return torch.tensor([answer_token_id(pair.tokenizer, e.answer) for e in data])


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, int]:
    return {"same": int((a == b).sum()), "changed": int((a != b).sum())}


def pik_study(pair: ModelPair, settings: FactSettings, *, progress: Progress | None = None) -> ProbeResult:
    """(b) Probe each model's last question token for "this model answers this fact correctly"."""
    facts = sample_facts(settings)
    data = _prompts(facts)
    acts, top = capture_for(pair, data, settings, progress=progress)
    answers = _answer_ids(pair, data)
    known = {role: (top[role] == answers).long() for role in top}
    counts = {role: int(k.sum()) for role, k in known.items()}
    if progress is not None:
        progress(f"  facts known (greedy): {counts} of {len(facts)}; fitting probes")
    notes = {
        "label": "1 if this model's greedy next token is the answer's first token (per model)",
        "position": "last token of the completion prompt",
        "control_type": "the fact's subject",
        "n_known": counts,
        "labels_base_vs_tuned": _agreement(known["base"], known["tuned"]),
        "items": [f.item_id for f in facts],
        "known": {role: [bool(v) for v in k.tolist()] for role, k in known.items()},
    }
    return fit_probes(
        acts,
        known,
        [f.item_id for f in facts],
        settings.probe,
        pair=pair_provenance(pair),
        types=[f.subject for f in facts],
        site_kind=settings.site_kind,
        task="P(IK): model knows the fact",
        class_names=["unknown", "known"],
        notes=notes,
    )


def known_facts(pair: ModelPair, facts: Sequence[Fact], settings: FactSettings) -> dict[str, torch.Tensor]:
    """Per role, 1 where the model's greedy answer to the plain completion prompt is right."""
    data = _prompts(facts)
    from tunelens.cache import CacheConfig, capture_pair
    from tunelens.sites import Site

    final = Site("resid_post", pair.dims.n_layers - 1)
    cfg = CacheConfig(
        sites=(final,), positions="last", batch_size=settings.batch_size, backend=settings.backend
    )
    got = capture_pair(pair, data, cfg)
    from tunelens.backends.stepwise import Stepper

    answers = _answer_ids(pair, data)
    out = {}
    for role, model in pair:
        with torch.no_grad(), model.active() as module:
            h = got[role][final].to(model.device, next(module.parameters()).dtype)
            out[role] = (Stepper(module).unembed(h).argmax(-1).cpu() == answers).long()
    return out


def wack_study(
    pair: ModelPair,
    settings: FactSettings,
    *,
    known: Mapping[str, Sequence[bool]] | None = None,
    known_items: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> ProbeResult:
    """(c) Probe the misleading-context prompt for unknown / known-and-correct / known-but-wrong (HK+).

    ``known`` (with ``known_items``, the facts it is about): per-role flags already measured on the plain
    prompts, e.g. ``pik_result.notes["known"]`` and ``pik_result.notes["items"]``; otherwise measured here.
    """
    facts = sample_facts(settings)
    items = [f.item_id for f in facts]
    if known is None:
        if progress is not None:
            progress(f"  testing which of {len(facts)} facts each model knows (plain prompts)")
        flags = known_facts(pair, facts, settings)
    else:
        if known_items is None or list(known_items) != items:
            raise ConfigError("known flags must come with known_items equal to this study's facts, in order")
        flags = {role: torch.tensor([bool(v) for v in known[role]]).long() for role in ("base", "tuned")}
    data = misleading_context(facts, seed=settings.seed, n_shots=settings.n_shots)
    acts, top = capture_for(pair, data, settings, progress=progress)
    answers = _answer_ids(pair, data)
    labels = {}
    for role in flags:
        right_misled = (top[role] == answers).long()
        labels[role] = torch.where(flags[role] == 0, 0, torch.where(right_misled == 1, 1, 2))
    counts = {role: {WACK_CLASSES[c]: int((y == c).sum()) for c in range(3)} for role, y in labels.items()}
    if progress is not None:
        progress(f"  WACK classes: {counts}; fitting probes")
    notes = {
        "label": "0 unknown (HK-), 1 known and correct under misleading context, 2 known but wrong (HK+); "
        "per model",
        "position": f"last token of the {settings.n_shots}-bad-shot prompt (pre-answer)",
        "control_type": "the fact's subject",
        "class_counts": counts,
        "labels_base_vs_tuned": _agreement(labels["base"], labels["tuned"]),
    }
    return fit_probes(
        acts,
        labels,
        items,
        settings.probe,
        pair=pair_provenance(pair),
        types=[f.subject for f in facts],
        site_kind=settings.site_kind,
        task="WACK: knowledge vs error",
        class_names=list(WACK_CLASSES),
        notes=notes,
    )
