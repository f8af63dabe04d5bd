"""Minimality pruning of a circuit (algorithms.md §1.4): drop the heads the circuit does not need.

``F(C)`` is the accuracy (or another metric) of the model with everything outside the circuit ``C``
mean-ablated (:func:`circuits.circuit.faithfulness.ablated_last`, the paper's scope: every head at every
position
outside ``C``). For each head ``v`` of a group:

1. pairwise knock-outs ``F(C \\ {v, u})`` for every other head ``u`` of the same group;
2. ``K`` = the ``ceil(0.3 · |group|)`` partners ``u`` whose knock-out with ``v`` lowers ``F`` most;
3. keep ``v`` iff ``(F(C \\ K) − F(C \\ (K ∪ {v}))) / F(C \\ (K ∪ {v})) ≥ 0.01``.

Removing the partners first exposes heads that back each other up (either one alone is redundant). All
decisions are taken against the same candidate circuit; the minimal circuit keeps the heads that pass.
A zero denominator counts as a drop of ``inf`` when the numerator is positive, else 0.

Example (``model``: an untrained tiny Llama of 4 layers × 4 heads; ``dataset``: 12 entity-tracking
prompts of 3 boxes):
    >>> from tunelens.tasks.entity_tracking import EntityTrackingConfig, generate
    >>> data = dataset.encode(model.tokenizer)
    >>> ref = generate(EntityTrackingConfig(n_boxes=3, n_contexts=4), seed=1).encode(model.tokenizer)
    >>> groups = {"a": [(2, 0, "last"), (2, 1, "last"), (3, 0, "last")], "b": [(1, 2, "query_label")]}
    >>> res = prune(model, data, groups, reference=ref)
    >>> len(res.heads), res.summary()["n_heads_before"]  # one decision per head
    (4, {'a': 3, 'b': 1})
    >>> res.summary()["n_heads_after"]  # this model is at chance with or without them: none is needed
    {'a': 0, 'b': 0}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from circuits.circuit.faithfulness import HeadAt, MeanZ, Scope, ablated_last, check_scope, keep_masks, mean_z
from circuits.circuit.groups import GROUP_COLOURS, head_map_axes
from circuits.patching.metrics import Answers, LastLogits, accuracy, answer_prob
from tunelens.backends.stepwise import Stepper
from tunelens.errors import ConfigError
from tunelens.models.loaded import LoadedModel
from tunelens.results import Result, model_provenance
from tunelens.tasks.base import Encoded

PruneMetric = Literal["accuracy", "prob"]


class _Ablated:
    """Runs of ``model`` with everything outside a circuit mean-ablated (as
    :func:`circuits.circuit.faithfulness.ablated_last`), for many sub-circuits of one circuit: the run of
    the whole
    circuit is traced once, and a sub-circuit's run starts at the first layer where it lacks a head."""

    def __init__(
        self,
        model: LoadedModel,
        data: Encoded,
        heads: list[HeadAt],
        means: MeanZ,
        answers: Answers,
        scope: str,
    ):
        self.model, self.data, self.heads, self.answers, self.scope = model, data, heads, answers, scope
        dims = model.dims
        self.tokens = data.tokens.to(model.device)
        self.means = [means.for_batch(layer, data) for layer in range(dims.n_layers)]
        self.stepper = Stepper(model.module)
        self.keep = self._masks(heads)
        with model.active(), torch.no_grad():
            ids, last = self.tokens.input_ids, self.tokens.last
            self.trace = self.stepper.trace(ids, last, hook=self._hook(self.keep))

    def _masks(self, kept: list[HeadAt]) -> dict[int, torch.Tensor]:
        dims = self.model.dims
        return keep_masks(kept, self.data, dims.n_layers, dims.n_heads, self.scope, positions_of=self.heads)

    def _hook(self, keep: dict[int, torch.Tensor]):
        def hook(layer: int, kind: str, t: torch.Tensor) -> torch.Tensor | None:
            if kind != "z":
                return None
            mean = self.means[layer].to(t.device, t.dtype)
            return torch.where(keep[layer].to(t.device)[..., None], t, mean)

        return hook

    def last(self, removed: frozenset) -> LastLogits:
        if not removed:
            return LastLogits.from_logits(self.trace.logits, self.answers)
        dims = self.model.dims
        keep = self._masks([h for i, h in enumerate(self.heads) if i not in removed])
        start = min(self.heads[i][0] for i in removed)
        h = self.trace.resid[start]
        with self.model.active(), torch.no_grad():
            for layer in range(start, dims.n_layers):
                h = self.stepper.layer(layer, h, hook=self._hook(keep))
            rows = torch.arange(h.shape[0], device=h.device)
            logits = self.stepper.unembed(h[rows, self.tokens.last.to(h.device)])
        return LastLogits.from_logits(logits, self.answers)


def relative_drop(with_v: float, without_v: float) -> float:
    """``(F(C\\K) − F(C\\(K∪{v}))) / F(C\\(K∪{v}))``; ``inf`` for a positive drop from 0, 0 for none."""
    if without_v <= 0:
        return math.inf if with_v > without_v else 0.0
    return (with_v - without_v) / without_v


@dataclass(frozen=True, kw_only=True)
class MinimalCircuitResult(Result):
    """Per head of a candidate circuit: its partners ``K``, ``F`` with and without it, the relative drop,
    and whether it stays; the minimal circuit and its ``F``."""

    title: ClassVar[str] = "minimal circuit (pruning)"
    analysis: ClassVar[str] = "circuit"
    model: str
    metric: str
    threshold: float
    partner_fraction: float
    groups: dict[str, list[list]]  # candidate circuit: name -> (layer, head, position)
    minimal: dict[str, list[list]]  # the heads kept
    heads: list[
        dict[str, Any]
    ]  # group, layer, head, partners, f_without_partners, f_without_both, drop, kept
    f_full: float  # the whole model, nothing ablated
    f_circuit: float  # the candidate circuit
    f_minimal: float  # the minimal circuit
    n_prompts: int
    n_evaluations: int
    n_layers: int
    n_heads: int
    scope: str = "all"  # where everything outside the circuit is ablated (see prune)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        rows = [{**h, "partners": " ".join(f"L{a}.H{b}" for a, b in h["partners"])} for h in self.heads]
        return pd.DataFrame(rows)

    def figure(self):
        """The circuit as a layer × head map: kept heads filled, pruned heads as crosses, one colour per
        group; hover shows the relative drop."""
        import plotly.graph_objects as go

        colours = GROUP_COLOURS
        fig = go.Figure()
        names = list(self.groups)
        for i, g in enumerate(names):
            c = colours[i % len(colours)]
            offset = (i - (len(names) - 1) / 2) * 0.15
            mine = [h for h in self.heads if h["group"] == g]
            pos = self.groups[g][0][2] if self.groups[g] else ""
            for kept, symbol, label in ((True, "circle", "kept"), (False, "x", "pruned")):
                hs = [h for h in mine if h["kept"] == kept]
                fig.add_scatter(
                    x=[h["head"] + offset for h in hs],
                    y=[h["layer"] for h in hs],
                    mode="markers",
                    marker={"symbol": symbol, "color": c, "size": 12 if kept else 9},
                    name=f"{g} @ {pos}: {label} ({len(hs)})",
                    text=[f"L{h['layer']}.H{h['head']} relative drop {h['drop']:.3f}" for h in hs],
                    legendgroup=g,
                )
        where = "every position" if self.scope == "all" else "the circuit positions"
        fig.update_layout(
            title=(
                f"Minimal circuit in {self.model}: {self.metric} {self.f_minimal:.2f} "
                f"(candidate circuit {self.f_circuit:.2f}, full model {self.f_full:.2f})<br><sup>"
                f"the rest ablated at {where}; "
                f"keep a head iff its relative drop ≥ {self.threshold}</sup>"
            ),
            **head_map_axes(self.n_layers, self.n_heads),
        )
        return fig

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "metric": self.metric,
            "scope": self.scope,
            "n_heads_before": {g: len(hs) for g, hs in self.groups.items()},
            "n_heads_after": {g: len(hs) for g, hs in self.minimal.items()},
            "minimal": {g: [f"L{a}.H{b}" for a, b, _ in hs] for g, hs in self.minimal.items()},
            "f_full": round(self.f_full, 3),
            "f_circuit": round(self.f_circuit, 3),
            "f_minimal": round(self.f_minimal, 3),
            "threshold": self.threshold,
            "n_prompts": self.n_prompts,
            "n_evaluations": self.n_evaluations,
        }


def prune(
    model: LoadedModel,
    data: Encoded,
    groups: Mapping[str, Sequence[HeadAt]],
    *,
    reference: Encoded,
    threshold: float = 0.01,
    partner_fraction: float = 0.3,
    metric: PruneMetric = "accuracy",
    scope: Scope = "all",
    provenance: dict[str, Any] | None = None,
) -> MinimalCircuitResult:
    """Prune ``groups`` (heads as ``(layer, head, position)``) in ``model`` on ``data``, means from
    ``reference``; see the module doc. ``metric="prob"``: the mean answer probability instead of accuracy
    (smoother on few prompts). ``scope="positions"``: everything outside the circuit is ablated only at
    the candidate circuit's positions (the same positions for every sub-circuit), for circuits that are not
    faithful at the paper's scope (``"all"``)."""
    if metric not in ("accuracy", "prob"):
        raise ConfigError(f"pruning metric must be 'accuracy' or 'prob', got {metric!r}")
    check_scope(scope)
    if not 0 <= partner_fraction < 1:
        raise ConfigError(f"partner_fraction must be in [0, 1), got {partner_fraction}")
    if not groups or not any(groups.values()):
        raise ConfigError("a circuit to prune needs at least one head")
    answers = Answers.from_encoded(data)
    means = mean_z(model, reference)
    nodes = [(g, (int(h[0]), int(h[1]), h[2])) for g, hs in groups.items() for h in hs]
    runs = _Ablated(model, data, [h for _, h in nodes], means, answers, scope)
    cache: dict[frozenset, float] = {}

    def value(last) -> float:
        return float((accuracy(last) if metric == "accuracy" else answer_prob(last)).mean())

    def f(removed: frozenset) -> float:
        if removed not in cache:
            cache[removed] = value(runs.last(removed))
        return cache[removed]

    f_full = value(ablated_last(model, data, None, means, answers))
    rows = []
    for i, (g, (lay, h, _)) in enumerate(nodes):
        mates = [j for j, (g2, _) in enumerate(nodes) if g2 == g and j != i]
        k = min(math.ceil(partner_fraction * (len(mates) + 1)), len(mates))
        pair_f = {j: f(frozenset({i, j})) for j in mates}
        partners = sorted(mates, key=lambda j: (pair_f[j], j))[:k]  # largest drop = lowest F
        with_v = f(frozenset(partners))
        without_v = f(frozenset([*partners, i]))
        drop = relative_drop(with_v, without_v)
        rows.append(
            {
                "group": g,
                "layer": lay,
                "head": h,
                "partners": [[nodes[j][1][0], nodes[j][1][1]] for j in partners],
                "f_without_partners": with_v,
                "f_without_both": without_v,
                "drop": drop,
                "kept": drop >= threshold,
            }
        )
    minimal = {g: [] for g in groups}
    for (g, hd), row in zip(nodes, rows, strict=True):
        if row["kept"]:
            minimal[g].append(list(hd))
    removed = frozenset(i for i, row in enumerate(rows) if not row["kept"])
    return MinimalCircuitResult(
        model=model.name,
        metric=metric,
        threshold=threshold,
        partner_fraction=partner_fraction,
        groups={g: [list(x) for x in hs] for g, hs in groups.items()},
        minimal=minimal,
        heads=rows,
        f_full=f_full,
        f_circuit=f(frozenset()),
        f_minimal=f(removed) if len(removed) < len(nodes) else float("nan"),
        n_prompts=len(answers),
        n_evaluations=len(cache) + 1,
        n_layers=model.dims.n_layers,
        n_heads=model.dims.n_heads,
        scope=scope,
        provenance=model_provenance(model, provenance),
    )
