"""PatchingResult: a patching sweep's metric grids (layer × position, layer × head, …) with heat-maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from circuits.patching.metrics import normalised
from tunelens.errors import ConfigError
from tunelens.results import Result

METRIC_TITLES = {
    "logit_diff": "logit difference",
    "prob": "answer probability",
    "accuracy": "accuracy",
}


@dataclass(frozen=True, kw_only=True)
class PatchingResult(Result):
    """Mean metric over prompts for every cell of a sweep, on a grid with named axes.

    ``values[metric]`` has one dimension per axis in ``axes`` (e.g. ``("layer", "pos")``), with tick
    labels in ``labels``. ``source``/``target`` are the unpatched runs' means, so
    :meth:`normalised` gives ``(patched − target)/(source − target)`` (1 = source behaviour restored).
    """

    title: ClassVar[str] = "activation patching"
    analysis: ClassVar[str] = "patching"
    kind: str
    direction: str  # e.g. "clean -> corrupt" or "tuned -> base"
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    values: dict[str, Tensor]
    source: dict[str, float]
    target: dict[str, float]
    n_prompts: int
    provenance: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def normalised(self, metric: str = "logit_diff") -> Tensor:
        self._check(metric)
        return normalised(self.values[metric], self.source[metric], self.target[metric])

    def _check(self, metric: str) -> None:
        if metric not in self.values:
            raise ConfigError(f"metric {metric!r} is not in this result; it has {', '.join(self.values)}")

    def to_frame(self):
        import pandas as pd

        grids = {m: v.reshape(-1) for m, v in self.values.items()}
        index = torch.cartesian_prod(*[torch.arange(len(self.labels[a])) for a in self.axes])
        index = index.reshape(-1, len(self.axes))
        data: dict[str, list] = {
            a: [self.labels[a][i] for i in index[:, k].tolist()] for k, a in enumerate(self.axes)
        }
        for m, v in grids.items():
            data[m] = v.tolist()
            data[f"{m}_normalised"] = self.normalised(m).reshape(-1).tolist()
        return pd.DataFrame(data)

    def figure(self, metric: str = "logit_diff", *, normalise: bool = True, position: int | None = None):
        """Heat-map of the metric (normalised recovery by default) over the first two axes.

        For a three-axis sweep (layer × position × head) ``position`` picks the position (default: the
        one with the largest effect).
        """
        import plotly.graph_objects as go

        grid = self.normalised(metric) if normalise else self.values[metric]
        axes = list(self.axes)
        if grid.ndim == 3:
            if position is None:
                position = int(grid.abs().nan_to_num().amax(dim=(0, 2)).argmax())
            grid = grid[:, position]
            axes = [axes[0], axes[2]]
        name = METRIC_TITLES.get(metric, metric)
        ztitle = f"{name}, normalised (1 = {self.direction.split(' -> ')[0]} restored)" if normalise else name
        fig = go.Figure(
            go.Heatmap(
                z=grid.T.numpy(),
                x=self.labels[axes[0]],
                y=self.labels[axes[1]],
                colorscale="RdBu",
                zmid=0,
                colorbar={"title": {"text": ztitle, "side": "right"}},
            )
        )
        fig.update_layout(
            title=f"Patching {self.kind} ({self.direction}), {self.n_prompts} prompts",
            xaxis_title=axes[0],
            yaxis_title=axes[1],
        )
        return fig

    def top(self, k: int = 5, metric: str = "logit_diff") -> list[tuple[str, float]]:
        """The ``k`` cells with the largest normalised effect, as (label, value)."""
        grid = self.normalised(metric).reshape(-1).nan_to_num(nan=float("-inf"))
        shape = self.values[metric].shape
        out = []
        for flat in torch.topk(grid, min(k, grid.numel())).indices.tolist():
            idx = torch.unravel_index(torch.tensor(flat), shape)
            label = " ".join(f"{a}={self.labels[a][int(i)]}" for a, i in zip(self.axes, idx, strict=True))
            out.append((label, float(grid[flat])))
        return out

    def summary(self) -> dict[str, Any]:
        metric = "logit_diff" if "logit_diff" in self.values else next(iter(self.values))
        return {
            "kind": self.kind,
            "direction": self.direction,
            "grid": "x".join(str(len(self.labels[a])) for a in self.axes),
            "n_prompts": self.n_prompts,
            f"source_{metric}": round(self.source[metric], 4),
            f"target_{metric}": round(self.target[metric], 4),
            "top_cells": [(label, round(v, 3)) for label, v in self.top(3, metric)],
        }
