"""ProbeResult: probe scores by layer for base and tuned, with controls, transfer and directions.

Scores are tensors ``[role, seed, layer]`` (``role`` follows :attr:`ProbeResult.roles`): ``task`` (test
accuracy, or R² for ridge), ``control`` (Hewitt–Liang control task), ``selectivity`` (task − control),
``shuffled`` (trained on shuffled labels), and for classifiers ``auroc`` (binary only) and ``ece``.
``transfer["base->tuned"]`` ``[seed, layer]`` is the base model's probe scored on the tuned model's
activations (and the reverse); ``cosine`` ``[seed, layer]`` is the cosine between the two models' raw-space
probe weights. Weights and biases (seed 0) are kept in raw activation space, so :meth:`direction`
gives a :class:`tunelens.directions.Direction` comparable with any other analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import Tensor

from probes.config import ProbeConfig
from tunelens.directions import Direction
from tunelens.errors import ConfigError
from tunelens.metrics import mean_ci
from tunelens.results import Result
from tunelens.sites import Site

COLORS = {"base": "#1f77b4", "tuned": "#d62728"}
View = Literal["layers", "transfer", "selectivity"]


@dataclass(frozen=True, kw_only=True)
class ProbeResult(Result):
    title: ClassVar[str] = "linear probes by layer"
    analysis: ClassVar[str] = "probes"

    config: ProbeConfig
    task: str
    site_kind: str
    layers: tuple[int, ...]
    roles: tuple[str, ...]
    metric: str
    classes: list[str]
    scores: dict[str, Tensor]
    transfer: dict[str, Tensor]
    cosine: Tensor | None
    weight: Tensor
    bias: Tensor
    chance: Tensor
    converged: Tensor
    n_train: list[int]
    n_test: list[int]
    n_test_items: list[int]
    pair: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    # -- access ----------------------------------------------------------------------------------------
    def _role(self, role: str) -> int:
        if role not in self.roles:
            raise ConfigError(f"this result has roles {self.roles}, not {role!r}")
        return self.roles.index(role)

    @property
    def _bounds(self) -> tuple[float, float] | None:
        """The range intervals are clipped to: an accuracy's [0, 1] (R² has no lower bound)."""
        return (0.0, 1.0) if self.metric == "accuracy" else None

    def _layer(self, layer: int) -> int:
        if layer not in self.layers:
            raise ConfigError(f"this result has layers {self.layers[0]}..{self.layers[-1]}, not {layer}")
        return self.layers.index(layer)

    def curve(self, role: str, measure: str = "task") -> Tensor:
        """Mean over seeds of a score by layer (``measure``: a key of :attr:`scores`)."""
        if measure not in self.scores:
            raise ConfigError(f"unknown measure {measure!r}; this result has {sorted(self.scores)}")
        return self.scores[measure][self._role(role)].mean(0)

    def best_layer(self, role: str) -> int:
        return self.layers[int(self.curve(role).nan_to_num(-math.inf).argmax())]

    def direction(self, role: str, layer: int, cls: int = 0) -> Direction:
        """The raw-space probe direction of ``role`` at ``layer`` (class ``cls`` of a multinomial probe)."""
        w = self.weight[self._role(role), self._layer(layer)]
        if not 0 <= cls < w.shape[-1]:
            raise ConfigError(f"class index {cls} out of range 0..{w.shape[-1] - 1}")
        return Direction(
            site=Site(self.site_kind, layer),  # type: ignore[arg-type]
            vector=w[:, cls],
            model=str(self.pair.get(role, "")),
            name=f"{self.config.kind}-probe:{self.task}:{role}@{self.site_kind}.{layer}",
            scale=float(w[:, cls].norm()),
            meta={"method": f"{self.config.kind} probe", "task": self.task, "class": cls},
        )

    # -- Result interface ---------------------------------------------------------------------------------
    def to_frame(self, *, per_seed: bool = False):
        """One row per (curve, layer): mean over seeds and a 95% interval (``per_seed``: one row per seed).

        Columns: ``model`` (base / tuned / base->tuned / tuned->base), ``measure``, ``layer``, ``value``,
        ``ci_low``, ``ci_high``, ``n_seeds`` (and ``seed`` with ``per_seed``).
        """
        import pandas as pd

        curves: list[tuple[str, str, Tensor]] = []
        for measure, t in self.scores.items():
            for ri, role in enumerate(self.roles):
                curves.append((role, measure, t[ri]))
        for key, t in self.transfer.items():
            curves.append((key, "transfer", t))
        if self.cosine is not None:
            curves.append(("base|tuned", "cosine", self.cosine))
        rows = []
        for model, measure, t in curves:
            for li, layer in enumerate(self.layers):
                col = t[:, li]
                if per_seed:
                    for si, seed in enumerate(self.config.seeds):
                        rows.append(
                            dict(model=model, measure=measure, layer=layer, seed=seed, value=float(col[si]))
                        )
                    continue
                vals = col[~col.isnan()]
                if len(vals) == 0:
                    continue
                m, lo, hi = mean_ci(vals, bounds=self._bounds)
                rows.append(
                    dict(
                        model=model,
                        measure=measure,
                        layer=layer,
                        value=m,
                        ci_low=lo,
                        ci_high=hi,
                        n_seeds=len(vals),
                    )
                )
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "kind": self.config.kind,
            "metric": self.metric,
            "n_test": self.n_test[0],
            "n_test_items": self.n_test_items[0],
            "n_seeds": len(self.config.seeds),
        }
        if not math.isnan(float(self.chance[0, 0])):
            out["majority"] = round(float(self.chance.mean()), 4)
        for role in self.roles:
            best = self.best_layer(role)
            li = self._layer(best)
            vals = self.scores["task"][self._role(role), :, li]
            m, lo, hi = mean_ci(vals, bounds=self._bounds)
            out[f"{role}_best_layer"] = best
            out[f"{role}_best_{self.metric}"] = round(m, 4)
            if len(vals) > 1:
                out[f"{role}_best_ci"] = [round(lo, 4), round(hi, 4)]
            for k in ("selectivity", "shuffled"):
                v = float(self.scores[k][self._role(role), :, li].mean())
                if not math.isnan(v):
                    out[f"{role}_best_{k}"] = round(v, 4)
        for key, t in self.transfer.items():
            src = key.split("->")[0]
            li = self._layer(self.best_layer(src))
            out[f"transfer_{key.replace('->', '_to_')}_at_src_best"] = round(float(t[:, li].mean()), 4)
        if self.cosine is not None:
            out["cosine_mean"] = round(float(self.cosine.mean()), 4)
        return out

    def figure(self, view: View = "layers"):
        """``layers``: score by layer, both models, controls dashed / shuffled dotted, seed intervals;
        ``transfer``: in-model vs transferred scores and the cosine of the two models' directions;
        ``selectivity``: task − control by layer."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        label = "test accuracy" if self.metric == "accuracy" else "test R²"
        x = list(self.layers)

        def band(t: Tensor) -> tuple[list[float], list[float] | None]:
            mean = t.nanmean(0)
            if t.shape[0] < 2:
                return mean.tolist(), None
            half = [mean_ci(t[:, i])[2] - float(mean[i]) for i in range(t.shape[1])]
            return mean.tolist(), half

        def line(fig, t, name, color, dash="solid", row=None, **kw):
            y, half = band(t)
            err = dict(type="data", array=half, visible=True, thickness=1) if half else None
            trace = go.Scatter(
                x=x,
                y=y,
                name=name,
                mode="lines+markers",
                marker=dict(size=4),
                line=dict(color=color, dash=dash),
                error_y=err,
                **kw,
            )
            fig.add_trace(trace, row=row, col=1 if row else None)

        if view == "layers":
            fig = go.Figure()
            for ri, role in enumerate(self.roles):
                c = COLORS.get(role, "#444")
                line(fig, self.scores["task"][ri], f"{role}: task", c)
                if not self.scores["control"][ri].isnan().all():
                    line(fig, self.scores["control"][ri], f"{role}: control task (Hewitt–Liang)", c, "dash")
                if not self.scores["shuffled"][ri].isnan().all():
                    line(fig, self.scores["shuffled"][ri], f"{role}: shuffled labels", c, "dot")
            if self.metric == "accuracy":
                fig.add_hline(
                    y=float(self.chance.mean()),
                    line=dict(color="grey", dash="dot", width=1),
                    annotation_text="majority class",
                    annotation_position="bottom right",
                )
            fig.update_layout(
                title=f"{self.config.kind} probe, {self.task or 'task'}: {label} by layer ({self.site_kind}, "
                f"{self.n_test[0]} test examples, {len(self.config.seeds)} seed(s))",
                xaxis_title="layer",
                yaxis_title=label,
                legend_title="model: probe",
                xaxis=dict(tickmode="linear", dtick=1 if len(self.layers) <= 12 else 2),
            )
            return fig
        if view == "selectivity":
            fig = go.Figure()
            for ri, role in enumerate(self.roles):
                line(fig, self.scores["selectivity"][ri], role, COLORS.get(role, "#444"))
            fig.update_layout(
                title=f"selectivity (task − control {label}) by layer",
                xaxis_title="layer",
                yaxis_title=f"selectivity ({label} points)",
                legend_title="model",
                xaxis=dict(tickmode="linear", dtick=1 if len(self.layers) <= 12 else 2),
            )
            return fig
        if view == "transfer":
            if not self.transfer:
                raise ConfigError("this result has no transfer scores (one model, or config.transfer=False)")
            fig = make_subplots(
                rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.08
            )
            for key, t in self.transfer.items():
                src, dst = key.split("->")
                c = COLORS.get(dst, "#444")
                line(fig, self.scores["task"][self._role(dst)], f"on {dst}: {dst}'s own probe", c, row=1)
                line(fig, t, f"on {dst}: {src}'s probe (transferred)", c, "dash", row=1)
            if self.cosine is not None:
                line(fig, self.cosine, "cosine(base direction, tuned direction)", "#2ca02c", row=2)
            fig.update_yaxes(title_text=label, row=1, col=1)
            fig.update_yaxes(title_text="cosine", row=2, col=1)
            fig.update_xaxes(title_text="layer", row=2, col=1)
            rule = self.config.transfer_standardise
            fig.update_layout(
                title=f"probe transfer across the pair ({self.task}; standardisation: {rule} statistics)",
                legend_title="scored on: probe",
            )
            return fig
        raise ConfigError(f"unknown view {view!r}; expected 'layers', 'transfer' or 'selectivity'")
