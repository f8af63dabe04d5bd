"""Circuit faithfulness by mean ablation (algorithms.md §1.4): everything outside the circuit is replaced by
its mean, and the accuracy that is left is compared with the full model's, chance-corrected.

A circuit is a set of head groups; each head is ``(layer, head, position)`` with ``position`` a name of the
task's positions (``"last"``, ``"query_label"`` …), an index, or ``"all"``. In the evaluated run every head
at every position has its output ``z`` (the input of ``o_proj``) replaced by its mean over a reference
set of prompts (at the task's named positions, e.g. ``last``, the mean over the reference prompts' same
named position; elsewhere per position index, and positions the reference does not cover get the mean
over all positions),
except the circuit's heads at their own positions. Then::

    faithfulness = (acc_circuit − chance) / (acc_full − chance)

with ``chance`` the mean of 1/(number of candidate answers). A control draws ``n_random`` random circuits
with the same number of heads per group at the same positions. When the full model is itself near chance
the ratio is ill-defined; :class:`CircuitResult` keeps the raw accuracies next to it.

Example:
    >>> res = faithfulness(model, data, {"top": [(20, 3, "last")]}, reference=ref)  # doctest: +SKIP
    >>> res.summary()["faithfulness"]  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.patching.metrics import Answers, LastLogits, accuracy, logit_diff
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.models.loaded import LoadedModel
from tunelens.results import Result
from tunelens.stepwise import Stepper
from tunelens.tasks.base import Encoded

HeadAt = tuple[int, int, str | int]
Scope = Literal["all", "positions"]

MIN_GAP = 0.05  # the full model must beat chance by this much for faithfulness to be defined


@dataclass(frozen=True, kw_only=True)
class MeanZ:
    """Mean ``z`` per layer, position and head over a reference set, and the all-position fallback."""

    per_pos: Float[Tensor, "layer pos head d_head"]
    overall: Float[Tensor, "layer head d_head"]
    named: dict[str, Tensor] = field(default_factory=dict)  # name -> layer head d_head, at that position

    def for_batch(self, layer: int, data: Encoded) -> Float[Tensor, "batch pos head d_head"]:
        """Means for every prompt and position: at a named position of the task (``last`` …) the mean over
        the reference prompts' same named position, elsewhere the per-index mean."""
        batch, n_pos = data.tokens.input_ids.shape
        out = self.at(layer, n_pos)[None].repeat(batch, 1, 1, 1)
        rows = torch.arange(batch)
        for name, mean in self.named.items():
            pos = data.positions.get(name)
            if pos is not None and (pos >= 0).all():
                out[rows, pos] = mean[layer]
        return out

    def at(self, layer: int, n_pos: int) -> Tensor:
        """``pos head d_head`` for the first ``n_pos`` positions (the fallback beyond the reference)."""
        have = min(n_pos, self.per_pos.shape[1])
        out = self.overall[layer][None].repeat(n_pos, 1, 1)
        out[:have] = self.per_pos[layer, :have]
        return out


@torch.no_grad()
def mean_z(model: LoadedModel, reference: Encoded) -> MeanZ:
    """Mean per-head output over the real (non-padding) tokens of ``reference``, per position and overall."""
    tokens = reference.tokens.to(model.device)
    with model.active():
        tr = Stepper(model.module).trace(tokens.input_ids, tokens.last, record=["z"])
    mask = tokens.attention_mask.float()  # batch pos
    per_pos, overall = [], []
    for layer in range(model.dims.n_layers):
        z = tr.acts[(layer, "z")].float()  # batch pos head d
        w = mask[:, :, None, None]
        count = w.sum(dim=0)  # pos 1 1
        per_pos.append((z * w).sum(dim=0) / count.clamp(min=1))
        overall.append((z * w).sum(dim=(0, 1)) / w.sum())
    named = {}
    rows = torch.arange(len(tokens))
    for name, pos in reference.positions.items():
        if (pos >= 0).all():
            named[name] = torch.stack(
                [
                    tr.acts[(layer, "z")][rows, pos.to(rows.device)].float().mean(dim=0)
                    for layer in range(len(per_pos))
                ]
            )
    return MeanZ(per_pos=torch.stack(per_pos), overall=torch.stack(overall), named=named)


def check_scope(scope: str) -> None:
    """Where everything outside a circuit is ablated: ``"all"`` (the paper's) or ``"positions"``."""
    if scope not in ("all", "positions"):
        raise ConfigError(f"scope must be 'all' or 'positions', got {scope!r}")


def _keep_masks(
    heads: Sequence[HeadAt],
    data: Encoded,
    n_layers: int,
    n_heads: int,
    scope: str = "all",
    positions_of: Sequence[HeadAt] | None = None,
) -> dict[int, Float[Tensor, "batch pos head"]]:
    """Per layer, 1 where the circuit keeps a head's own activation (batch × pos × head).

    ``scope="positions"`` ablates only at the positions of ``positions_of`` (default: ``heads``); pruning
    passes the whole candidate circuit there, so removing a head never changes where the ablation is."""
    batch, n_pos = data.tokens.input_ids.shape
    keep = {layer: torch.zeros(batch, n_pos, n_heads, dtype=torch.bool) for layer in range(n_layers)}
    rows = torch.arange(batch)
    if scope == "positions":  # only the circuit's positions are ablated (every other position kept)
        at = torch.ones(batch, n_pos, dtype=torch.bool)
        for pos in {p for _, _, p in (heads if positions_of is None else positions_of)}:
            if pos == "all":
                at[:] = False
            elif isinstance(pos, str) and pos in data.positions:
                at[rows, data.positions[pos].clamp(min=0)] = False
            elif not isinstance(pos, str) and 0 <= int(pos) < n_pos:
                at[:, int(pos)] = False
        for layer in keep:
            keep[layer] |= at[:, :, None]
    for layer, head, pos in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise SiteError(
                f"head ({layer}, {head}) does not exist; layers 0..{n_layers - 1}, heads 0..{n_heads - 1}"
            )
        if pos == "all":
            keep[layer][:, :, head] = True
        elif isinstance(pos, str):
            keep[layer][rows, data.position(pos), head] = True
        else:
            if not 0 <= int(pos) < n_pos:
                raise ShapeError(f"position {pos} is outside the prompts (0..{n_pos - 1})")
            keep[layer][:, int(pos), head] = True
    return keep


@torch.no_grad()
def ablated_last(
    model: LoadedModel,
    data: Encoded,
    heads: Sequence[HeadAt] | None,
    means: MeanZ,
    answers: Answers,
    scope: str = "all",
) -> LastLogits:
    """The run with every head outside ``heads`` mean-ablated (``None``: the full model, nothing ablated);
    ``scope="positions"``: only at the circuit's positions."""
    tokens = data.tokens.to(model.device)
    dims = model.dims
    hook = None
    if heads is not None:
        keep = _keep_masks(heads, data, dims.n_layers, dims.n_heads, scope)
        batch_means = [means.for_batch(layer, data) for layer in range(dims.n_layers)]

        def hook(layer: int, kind: str, t: Tensor) -> Tensor | None:
            if kind != "z":
                return None
            mean = batch_means[layer].to(t.device, t.dtype)
            return torch.where(keep[layer].to(t.device)[..., None], t, mean)

    with model.active():
        tr = Stepper(model.module).trace(tokens.input_ids, tokens.last, hook=hook)
    return LastLogits.from_logits(tr.logits, answers)


def chance_level(answers: Answers) -> float:
    """Mean over prompts of 1 / (number of candidate answers)."""
    if answers.candidates is None:
        raise ConfigError("chance-corrected faithfulness needs a task with candidate answers")
    n = (answers.candidates >= 0).sum(dim=1).clamp(min=1).float()
    return float((1.0 / n).mean())


def random_circuit(
    groups: Mapping[str, Sequence[HeadAt]], n_layers: int, n_heads: int, rng: random.Random
) -> dict[str, list[HeadAt]]:
    """As many random heads per group as the circuit has, at the same positions, avoiding its heads."""
    taken = {(lay, h) for g in groups.values() for lay, h, _ in g}
    pool = [(lay, h) for lay in range(n_layers) for h in range(n_heads) if (lay, h) not in taken]
    size = sum(len(g) for g in groups.values())
    if len(pool) < size:
        raise ConfigError(f"no random control for a circuit of {size} heads: only {len(pool)} other heads")
    picks = iter(rng.sample(pool, size))
    return {name: [(*next(picks), p) for _, _, p in g] for name, g in groups.items()}


@dataclass(frozen=True, kw_only=True)
class CircuitResult(Result):
    """A circuit's head groups, its accuracy with everything else mean-ablated, and the random control."""

    title: ClassVar[str] = "circuit faithfulness"
    analysis: ClassVar[str] = "circuit"
    groups: dict[str, list[list]]
    model: str
    n_prompts: int
    acc_full: float
    acc_circuit: float
    acc_random: list[float]
    chance: float
    logit_diff_full: float
    logit_diff_circuit: float
    n_candidates_checked: int | None = None  # heads examined exactly before choosing the circuit
    scope: str = "all"
    provenance: dict[str, Any] = field(default_factory=dict)

    def _faith(self, acc: float) -> float:
        """Chance-corrected; NaN (undefined) when the full model is not above chance by MIN_GAP."""
        gap = self.acc_full - self.chance
        return (acc - self.chance) / gap if gap > MIN_GAP else float("nan")

    @property
    def defined(self) -> bool:
        return self.acc_full - self.chance > MIN_GAP

    @property
    def faithfulness(self) -> float:
        return self._faith(self.acc_circuit)

    @property
    def random_faithfulness(self) -> tuple[float, float]:
        """Mean and standard deviation over the random circuits."""
        if not self.acc_random:
            return float("nan"), float("nan")
        f = torch.tensor([self._faith(a) for a in self.acc_random])
        return float(f.mean()), float(f.std()) if len(f) > 1 else 0.0

    def to_frame(self):
        import pandas as pd

        rows = [
            {"group": g, "layer": h[0], "head": h[1], "position": h[2]}
            for g, hs in self.groups.items()
            for h in hs
        ]
        return pd.DataFrame(rows)

    def figure(self):
        import plotly.graph_objects as go

        rm, rs = self.random_faithfulness
        racc = float(torch.tensor(self.acc_random).mean()) if self.acc_random else float("nan")
        n_heads = sum(len(g) for g in self.groups.values())
        fig = go.Figure(
            go.Bar(
                x=[
                    "full model",
                    f"circuit ({n_heads} heads)",
                    f"random circuits ({len(self.acc_random)} draws)",
                ],
                y=[self.acc_full, self.acc_circuit, racc],
                text=(
                    ["", f"faithfulness {self.faithfulness:.2f}", f"faithfulness {rm:.2f} ± {rs:.2f}"]
                    if self.defined
                    else ["at or below chance: faithfulness undefined", "", ""]
                ),
                name="accuracy",
            )
        )
        fig.add_hline(y=self.chance, line_dash="dash", annotation_text=f"chance {self.chance:.2f}")
        fig.update_layout(
            title=f"Circuit faithfulness in {self.model}: everything outside the circuit mean-ablated",
            xaxis_title="what runs",
            yaxis_title=f"accuracy among the candidate answers ({self.n_prompts} prompts)",
        )
        return fig

    def summary(self) -> dict[str, Any]:
        rm, rs = self.random_faithfulness
        return {
            "model": self.model,
            "n_heads": len({(h[0], h[1]) for g in self.groups.values() for h in g}),
            "acc_full": round(self.acc_full, 3),
            "acc_circuit": round(self.acc_circuit, 3),
            "chance": round(self.chance, 3),
            "faithfulness": round(self.faithfulness, 3) if self.defined else None,
            "random_faithfulness": [round(rm, 3), round(rs, 3)] if self.defined else None,
            **({} if self.defined else {"note": "undefined: the full model is not above chance"}),
            "n_candidates_checked": self.n_candidates_checked,
            "scope": self.scope,
        }


def faithfulness(
    model: LoadedModel,
    data: Encoded,
    groups: Mapping[str, Sequence[HeadAt]],
    *,
    reference: Encoded,
    n_random: int = 10,
    seed: int = 0,
    n_candidates_checked: int | None = None,
    scope: Scope = "all",
    provenance: dict[str, Any] | None = None,
) -> CircuitResult:
    """Accuracy of ``model`` on ``data`` with everything outside ``groups`` mean-ablated (means over
    ``reference``), chance-corrected, with ``n_random`` random circuits of the same shape.

    ``scope="all"`` (the paper's): every head at every position outside the circuit is ablated;
    ``"positions"``: only the heads outside the circuit at the circuit's own positions (a weaker test)."""
    check_scope(scope)
    if not groups or not any(groups.values()):
        raise ConfigError("a circuit needs at least one head")
    answers = Answers.from_encoded(data)
    means = mean_z(model, reference)
    heads = [h for g in groups.values() for h in g]
    full = ablated_last(model, data, None, means, answers)
    circ = ablated_last(model, data, heads, means, answers, scope)
    rng = random.Random(seed)
    dims = model.dims
    rand = []
    for _ in range(n_random):
        rg = random_circuit(groups, dims.n_layers, dims.n_heads, rng)
        rand.append(
            float(
                accuracy(
                    ablated_last(model, data, [h for g in rg.values() for h in g], means, answers, scope)
                ).mean()
            )
        )
    has_ld = full.has_foil or full.n_candidates > 1
    return CircuitResult(
        groups={g: [list(h) for h in hs] for g, hs in groups.items()},
        model=model.name,
        n_prompts=len(answers),
        acc_full=float(accuracy(full).mean()),
        acc_circuit=float(accuracy(circ).mean()),
        acc_random=rand,
        chance=chance_level(answers),
        logit_diff_full=float(logit_diff(full).mean()) if has_ld else float("nan"),
        logit_diff_circuit=float(logit_diff(circ).mean()) if has_ld else float("nan"),
        n_candidates_checked=n_candidates_checked,
        scope=scope,
        provenance=provenance or {},
    )
