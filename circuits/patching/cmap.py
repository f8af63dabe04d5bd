"""CMAP, cross-model activation patching (Prakash et al. 2024, algorithms.md §1.6).

The same prompts go through both models of a pair. The *source* model's per-head outputs ``z`` (the input
of ``o_proj``, before the output projection) are written into the *target* model's run at chosen heads
and positions, and go on through the target's **own** ``o_proj``. Direction ``tuned -> base`` asks how
much of the fine-tune's gain those heads carry; ``base -> tuned`` how much of it they are needed for.

Metrics: accuracy among the candidate answers, and the fraction of the base–tuned gap recovered,
``(patched − target) / (source − target)``, for accuracy and for the logit difference (answer minus the
best other candidate). A control patches as many random heads, ``n_random`` times.

Example (``pair``: a base and its fine-tune, tiny Llamas of 4 layers × 4 heads; ``dataset``: 12
entity-tracking prompts):
    >>> data = dataset.encode(pair.tokenizer)
    >>> sweep = cmap_sweep(pair, data, position="last")  # every head alone: a layer × head PatchingResult
    >>> sweep.direction, sweep.axes, tuple(sweep.values["logit_diff"].shape)
    ('tuned -> base', ('layer', 'head'), (4, 4))
    >>> res = cmap_groups(pair, data, {"top": [(3, 0, "last"), (3, 1, "last")]}, n_random=3)  # CMAPResult
    >>> res.to_frame()[["direction", "group", "n_heads"]]
           direction group  n_heads
    0  tuned -> base   top        2
    1  base -> tuned   top        2
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from circuits.patching.engine import Cell, Patch, Run, run_cells, trace
from circuits.patching.metrics import Answers
from circuits.patching.result import PatchingResult
from circuits.patching.sweeps import SweepConfig, patch_sweep, resolve_positions, summarise
from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.models.loaded import LoadedModel
from tunelens.models.pair import PairLike
from tunelens.results import Result
from tunelens.sites import Site
from tunelens.tasks.base import Encoded

Direction = Literal["tuned -> base", "base -> tuned"]
DIRECTIONS: tuple[str, ...] = ("tuned -> base", "base -> tuned")
HeadAt = tuple[int, int, str | int]  # (layer, head, position name or index)


def _models(pair: PairLike) -> tuple[LoadedModel, LoadedModel]:
    base, tuned = (pair.base, pair.tuned) if hasattr(pair, "base") else pair
    a, b = base.dims.to_dict(), tuned.dims.to_dict()
    for key in a:
        if a[key] != b[key]:
            raise PairIncompatibleError(
                f"CMAP needs two models of the same sizes: {key} is {a[key]} in the base but {b[key]} in "
                "the tuned model"
            )
    return base, tuned


@dataclass(frozen=True)
class PairRuns:
    """Both models traced on the same prompts (per-head ``z`` recorded)."""

    base: Run
    tuned: Run
    answers: Answers

    def ends(self, direction: str) -> tuple[Run, Run]:
        """(target, source) for a direction."""
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return (self.base, self.tuned) if direction == "tuned -> base" else (self.tuned, self.base)


def trace_pair(pair: PairLike, data: Encoded) -> PairRuns:
    base, tuned = _models(pair)
    answers = Answers.from_encoded(data)
    return PairRuns(
        base=trace(base, data.tokens, record=["z"]),
        tuned=trace(tuned, data.tokens, record=["z"]),
        answers=answers,
    )


def cmap_sweep(
    pair: PairLike,
    data: Encoded,
    *,
    position: str | int = "last",
    direction: Direction = "tuned -> base",
    runs: PairRuns | None = None,
    max_rows: int = 2048,
) -> PatchingResult:
    """Every head of every layer patched alone at ``position``, in one batched sweep (layer × head)."""
    runs = runs or trace_pair(pair, data)
    target, source = runs.ends(direction)
    cfg = SweepConfig(kind="z", by="layer_head", positions=(position,), max_rows=max_rows)
    prov = {"name": getattr(pair, "name", ""), **(pair.hashes() if hasattr(pair, "hashes") else {})}
    return patch_sweep(target, source, runs.answers, cfg, data=data, direction=direction, provenance=prov)


def _cell(heads: Sequence[HeadAt], data: Encoded) -> Cell:
    """One cell patching every head of ``heads`` at its position (``"all"``: every position)."""
    names = tuple(dict.fromkeys(p for _, _, p in heads if p != "all"))
    positions, _ = resolve_positions(names, data) if names else ([], [])
    where: dict = dict(zip(names, positions, strict=True)) | {"all": None}
    return tuple(Patch(Site("z", layer, head), where[p]) for layer, head, p in heads)


def random_heads(n_layers: int, n_heads: int, group: Sequence[HeadAt], rng: random.Random) -> list[HeadAt]:
    """As many random heads as ``group``, at the group's positions, avoiding its own heads."""
    taken = {(lay, h) for lay, h, _ in group}
    pool = [(lay, h) for lay in range(n_layers) for h in range(n_heads) if (lay, h) not in taken]
    if len(pool) < len(group):
        raise ConfigError(
            f"no random control for a group of {len(group)} heads: only {len(pool)} other heads exist"
        )
    picks = rng.sample(pool, len(group))
    return [(lay, h, p) for (lay, h), (_, _, p) in zip(picks, group, strict=True)]


@dataclass(frozen=True, kw_only=True)
class CMAPResult(Result):
    """CMAP per head group, in each direction, against random heads of the same count."""

    title: ClassVar[str] = "cross-model activation patching"
    analysis: ClassVar[str] = "patching"
    table: Any  # pandas frame: one row per (direction, group)
    base: dict[str, float]
    tuned: dict[str, float]
    n_prompts: int
    n_random: int
    groups: dict[str, list[list]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_frame(self):
        return self.table

    def figure(self, metric: str = "accuracy"):
        """Fraction of the base–tuned gap recovered per group, with the random-heads control."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for direction in DIRECTIONS:
            rows = self.table[self.table.direction == direction]
            if rows.empty:
                continue
            fig.add_bar(name=f"{direction}: circuit heads", x=rows.group, y=rows[f"gap_{metric}"])
            fig.add_bar(
                name=f"{direction}: random heads (mean ± sd, {self.n_random} draws)",
                x=rows.group,
                y=rows[f"random_gap_{metric}"],
                error_y={"type": "data", "array": rows[f"random_gap_{metric}_sd"].tolist()},
            )
        fig.update_layout(
            barmode="group",
            title=f"CMAP: {metric} gap recovered "
            f"(base {self.base[metric]:.2f}, tuned {self.tuned[metric]:.2f})",
            xaxis_title="head group",
            yaxis_title="fraction of the base–tuned gap recovered (1 = source model's value)",
        )
        return fig

    def summary(self) -> dict[str, Any]:
        rows = self.table[self.table.direction == "tuned -> base"]
        return {
            "base_accuracy": round(self.base["accuracy"], 3),
            "tuned_accuracy": round(self.tuned["accuracy"], 3),
            "n_prompts": self.n_prompts,
            "tuned->base accuracy": {
                g: round(float(a), 3) for g, a in zip(rows.group, rows.accuracy, strict=True)
            },
            "tuned->base gap recovered (logit diff)": {
                g: round(float(a), 3) for g, a in zip(rows.group, rows.gap_logit_diff, strict=True)
            },
        }


def cmap_groups(
    pair: PairLike,
    data: Encoded,
    groups: Mapping[str, Sequence[HeadAt]],
    *,
    directions: Sequence[str] = DIRECTIONS,
    n_random: int = 10,
    seed: int = 0,
    runs: PairRuns | None = None,
) -> CMAPResult:
    """Patch each group of heads (each at its own position) as one cell, both directions, with controls."""
    import pandas as pd

    if not groups:
        raise ConfigError("cmap_groups needs at least one head group")
    runs = runs or trace_pair(pair, data)
    dims = runs.base.model.dims
    rng = random.Random(seed)
    names = list(groups)
    cells = [_cell(groups[g], data) for g in names]
    n_all = dims.n_layers * dims.n_heads
    controls = {
        g: [_cell(random_heads(dims.n_layers, dims.n_heads, groups[g], rng), data) for _ in range(n_random)]
        if 2 * len({(lay, h) for lay, h, _ in groups[g]}) <= n_all
        else []  # a group of more than half the heads has no meaningful random twin
        for g in names
    }
    base_m = {k: float(v) for k, v in summarise(runs.base.last(runs.answers)).items()}
    tuned_m = {k: float(v) for k, v in summarise(runs.tuned.last(runs.answers)).items()}
    rows = []
    for direction in directions:
        target, source = runs.ends(direction)
        tgt, src = (base_m, tuned_m) if direction == "tuned -> base" else (tuned_m, base_m)
        all_cells = cells + [c for g in names for c in controls[g]]
        values = summarise(run_cells(target, source, all_cells, runs.answers))
        offset = len(names)
        for i, g in enumerate(names):
            row: dict[str, Any] = {"direction": direction, "group": g, "n_heads": len(groups[g])}
            ctrl = slice(offset, offset + len(controls[g]))
            offset += len(controls[g])
            for m in ("accuracy", "logit_diff", "prob"):
                gap = src[m] - tgt[m]
                frac = lambda x, gap=gap, t=tgt[m]: (x - t) / gap if abs(gap) > 1e-12 else float("nan")
                row[m] = float(values[m][i])
                row[f"gap_{m}"] = frac(float(values[m][i]))
                gaps = torch.tensor([frac(float(x)) for x in values[m][ctrl]] or [float("nan")])
                row[f"random_{m}"] = float(values[m][ctrl].mean()) if controls[g] else float("nan")
                row[f"random_gap_{m}"] = float(gaps.mean())
                row[f"random_gap_{m}_sd"] = float(gaps.std()) if len(gaps) > 1 else 0.0
            rows.append(row)
    return CMAPResult(
        table=pd.DataFrame(rows),
        base=base_m,
        tuned=tuned_m,
        n_prompts=len(runs.answers),
        n_random=n_random,
        groups={g: [list(x) for x in groups[g]] for g in names},
        provenance={"name": getattr(pair, "name", ""), **(pair.hashes() if hasattr(pair, "hashes") else {})},
    )
