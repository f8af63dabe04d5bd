"""Attribution patching: the first-order estimate of every activation patch at once (Nanda 2023).

``effect(site) ≈ ∇_a metric |_target · (a_source − a_target)``, summed over the site's own dimensions:
one source forward, one target forward and one backward give the estimate for every layer, position and
head. Within a model the source is the clean prompt and the target the corrupted one; across a pair the
target is the base model and the source the tuned model on the same prompts (a first-order CMAP).

The metric is the mean logit difference (answer minus foil, or minus the best other candidate) at each
prompt's last position, as in :mod:`circuits.patching.metrics`. :func:`agreement` compares an estimate with
the
exact sweep (Pearson correlation and top-k overlap of the effects).

Example (``model``: a tiny 4-layer Llama; ``dataset``: 12 entity-tracking prompts of 25 tokens):
    >>> from circuits.patching.engine import layer_pos_cells, run_cells, trace
    >>> from circuits.patching.metrics import Answers, logit_diff
    >>> from tunelens.tasks.entity_tracking import counterfactuals
    >>> clean = dataset.encode(model.tokenizer)
    >>> corrupt = counterfactuals(dataset, "query", seed=0).encode(model.tokenizer)  # another box queried
    >>> answers = Answers.from_encoded(clean, foil=corrupt)
    >>> source, target = trace(model, clean.tokens), trace(model, corrupt.tokens)
    >>> est = attribute(target, source, answers, kind="resid_pre")  # one forward and one backward
    >>> tuple(est.shape)  # layer batch pos
    (4, 12, 25)
    >>> cells = layer_pos_cells("resid_pre", range(4), range(25))  # the exact sweep of the same cells
    >>> patched = logit_diff(run_cells(target, source, cells, answers)).mean(dim=-1).view(4, 25)
    >>> exact = patched - logit_diff(target.last(answers)).mean()
    >>> labels = {"layer": [str(i) for i in range(4)], "pos": [str(i) for i in range(25)]}
    >>> res = agreement(est.mean(dim=1), exact, kind="resid_pre", direction="clean -> corrupt",
    ...                 axes=("layer", "pos"), labels=labels)
    >>> res.summary()["cells"], round(res.correlation, 2)
    (100, 0.99)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from circuits.patching.engine import Run
from circuits.patching.metrics import Answers, LastLogits, logit_diff
from tunelens.errors import ConfigError
from tunelens.results import Result
from tunelens.weights import frozen

ATTRIBUTABLE = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v")


def target_gradients(
    target: Run, answers: Answers, kinds: tuple[str, ...]
) -> tuple[dict[tuple[int, str], Tensor], dict]:
    """Re-run the target with gradients; return d(mean logit diff)/d(activation) and the activations."""
    for k in kinds:
        if k not in ATTRIBUTABLE:
            raise ConfigError(f"cannot attribute {k!r}; expected one of {', '.join(ATTRIBUTABLE)}")
    acts: dict[tuple[int, str], Tensor] = {}
    probes: dict[tuple[int, str], Tensor] = {}

    def hook(layer: int, kind: str, t: Tensor) -> Tensor | None:
        if kind in kinds:
            # adding a zero leaf keeps the graph intact (later sites still depend on earlier ones) and its
            # gradient is the gradient with respect to the activation at this point
            probe = torch.zeros_like(t, requires_grad=True)
            probes[(layer, kind)], acts[(layer, kind)] = probe, t.detach()
            return t + probe
        return None

    model = target.model
    tokens = target.tokens
    with model.active(), frozen(model.module), torch.enable_grad():
        tr = target.stepper.trace(tokens.input_ids, tokens.last, hook=hook)
        metric = logit_diff(LastLogits.from_logits(tr.logits, answers)).mean()
        metric.backward()
    grads = {k: v.grad.detach() for k, v in probes.items()}
    return grads, acts


def attribute(target: Run, source: Run, answers: Answers, kind: str) -> Tensor:
    """Estimated change of each prompt's logit difference when ``kind`` is patched from source into
    target; their mean over prompts (as :func:`at_position` takes it) is the estimate for the mean.

    Shape: ``layer batch pos`` for residual kinds, ``layer batch pos head`` for per-head kinds
    (``kv_head`` for k and v).
    """
    grads, acts = target_gradients(target, answers, (kind,))
    out = []
    for layer in range(target.stepper.n_layers):
        a = acts[(layer, kind)]
        diff = source.value(kind, layer).to(a.dtype) - a
        out.append((grads[(layer, kind)] * diff).sum(dim=-1) * len(answers))
    return torch.stack(out)


def at_position(per_prompt: Tensor, position: int | Tensor | None) -> Tensor:
    """Reduce ``attribute``'s output to ``layer [head]`` at one position per prompt (``None``: summed
    over positions, the estimate for patching every position at once), averaged over prompts."""
    if position is None:
        return per_prompt.sum(dim=2).mean(dim=1)
    if isinstance(position, int):
        return per_prompt[:, :, position].mean(dim=1)
    rows = torch.arange(per_prompt.shape[1])
    return per_prompt[:, rows, position.to(per_prompt.device)].mean(dim=1)


def topk_overlap(a: Tensor, b: Tensor, k: int) -> float:
    """Fraction of the ``k`` largest-|value| cells of ``a`` that are among those of ``b``."""
    k = min(k, a.numel())
    ia = set(torch.topk(a.reshape(-1).abs(), k).indices.tolist())
    ib = set(torch.topk(b.reshape(-1).abs(), k).indices.tolist())
    return len(ia & ib) / k


def pearson(a: Tensor, b: Tensor) -> float:
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x @ y) / denom) if denom > 0 else float("nan")


@dataclass(frozen=True, kw_only=True)
class AttributionResult(Result):
    """An attribution estimate next to the exact patching effects of the same cells."""

    title: ClassVar[str] = "attribution patching vs activation patching"
    analysis: ClassVar[str] = "patching"
    kind: str
    direction: str
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    estimate: Tensor
    exact: Tensor
    correlation: float
    topk: int
    topk_overlap: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        index = torch.cartesian_prod(*[torch.arange(len(self.labels[a])) for a in self.axes]).reshape(
            -1, len(self.axes)
        )
        data = {a: [self.labels[a][i] for i in index[:, k].tolist()] for k, a in enumerate(self.axes)}
        data["estimate"] = self.estimate.reshape(-1).tolist()
        data["exact"] = self.exact.reshape(-1).tolist()
        return pd.DataFrame(data)

    def figure(self):
        import plotly.graph_objects as go

        frame = self.to_frame()
        text = [" ".join(f"{a}={row[a]}" for a in self.axes) for _, row in frame.iterrows()]
        fig = go.Figure(go.Scatter(x=frame.exact, y=frame.estimate, mode="markers", text=text, name="cells"))
        lo, hi = (
            float(min(frame.exact.min(), frame.estimate.min())),
            float(max(frame.exact.max(), frame.estimate.max())),
        )
        fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dash"})
        fig.update_layout(
            title=f"Attribution vs exact patching of {self.kind} ({self.direction}): "
            f"r = {self.correlation:.2f}, "
            f"top-{self.topk} overlap {self.topk_overlap:.2f}",
            xaxis_title="exact change of the logit difference (activation patching)",
            yaxis_title="first-order estimate (gradient × activation difference)",
        )
        return fig

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "direction": self.direction,
            "cells": int(self.exact.numel()),
            "correlation": round(self.correlation, 3),
            f"top{self.topk}_overlap": round(self.topk_overlap, 3),
        }


def agreement(
    estimate: Tensor,
    exact: Tensor,
    *,
    kind: str,
    direction: str,
    axes: tuple[str, ...],
    labels: dict[str, list[str]],
    topk: int = 10,
    provenance: dict[str, Any] | None = None,
) -> AttributionResult:
    """Compare an attribution estimate with the exact effects (both: change of the mean logit diff)."""
    if estimate.shape != exact.shape:
        raise ConfigError(f"estimate {tuple(estimate.shape)} and exact {tuple(exact.shape)} must match")
    return AttributionResult(
        kind=kind,
        direction=direction,
        axes=axes,
        labels=labels,
        estimate=estimate.detach().cpu(),
        exact=exact.detach().cpu(),
        correlation=pearson(estimate, exact),
        topk=topk,
        topk_overlap=topk_overlap(estimate, exact, topk),
        provenance=provenance or {},
    )
