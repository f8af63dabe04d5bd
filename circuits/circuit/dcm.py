"""DCM, desiderata-based component masking (Davies et al. 2023; algorithms.md §1.5).

Which heads of a group carry a property? Each head ``h`` of the group gets a mask ``m_h = sigmoid(θ_h)`` in
[0, 1]. At the group's position the head's output becomes ``m_h · z_h(base) + (1 − m_h) · z_h(source)``
(``m = 1``: untouched, ``m = 0``: patched from the source run at its own matching position). The masks are
trained, model frozen, to make the patched base run predict the *desideratum* (the answer the source
implies) at the last position::

    L = − mean_b logit_b[desideratum_b] + λ · Σ_h (1 − m_h)        (λ = 0.01)

Adam (lr 0.1), batches of 32; every ``eval_every`` steps the masks are rounded and the validation accuracy
(arg-max over the vocabulary == desideratum) is measured; the best rounded mask is kept (ties: more heads
patched). The reported heads are those with rounded ``m = 0``.

Runs are partial: each step starts at the group's first layer and position from the base run's cached
residual, keys and values (see :mod:`tunelens.backends.stepwise`).

Example (``model``: an untrained tiny Llama of 4 layers × 4 heads; ``dataset``: 12 entity-tracking
prompts): which heads at the last position carry the answer of another queried box?
    >>> from tunelens.tasks.entity_tracking import counterfactuals
    >>> base = dataset.encode(model.tokenizer)
    >>> source = counterfactuals(dataset, "query", seed=0).encode(model.tokenizer)
    >>> last = base.position("last")
    >>> heads = [(2, 0), (2, 1), (3, 0), (3, 1)]
    >>> res = dcm(model, base.tokens, source.tokens, source.answer_ids, heads=heads, position=last,
    ...           desideratum="the other box's object")
    >>> tuple(res.mask.shape), len(res.losses)  # one mask per head; 2 epochs of one batch
    ((4,), 2)
    >>> res.selected  # this model never predicts the desideratum: patching no head helps
    []
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from circuits.patching.engine import Run, check_aligned, trace
from tunelens.backends.base import TokenBatch
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.models.loaded import LoadedModel
from tunelens.results import Result, model_provenance
from tunelens.weights import frozen


@dataclass(frozen=True, kw_only=True)
class DCMConfig:
    lam: float = 0.01
    lr: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    eval_every: int = 4
    init_logit: float = 3.0  # sigmoid(3) ≈ 0.95: start near "nothing patched"
    train_fraction: float = 0.5
    val_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lam < 0 or self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ConfigError(
                "DCMConfig needs lam >= 0, lr > 0, epochs >= 1, batch_size >= 1, eval_every >= 1"
            )
        if not (
            0 < self.train_fraction < 1
            and self.val_fraction > 0
            and self.train_fraction + self.val_fraction <= 1
        ):
            raise ConfigError(
                f"train_fraction {self.train_fraction} and val_fraction {self.val_fraction} must be in "
                "(0, 1) and sum to at most 1"
            )


@dataclass(frozen=True, kw_only=True)
class DCMResult(Result):
    """Trained masks per head, the selected (patched) heads, and accuracies on the desideratum."""

    title: ClassVar[str] = "desiderata-based component masking"
    analysis: ClassVar[str] = "circuit"
    heads: list[list[int]]  # (layer, head) of the group
    mask: Tensor  # (head,) sigmoid of the trained logits at the end
    best_rounded: Tensor  # (head,) the kept rounded mask (0 = patched)
    val_accuracy: float  # of the best rounded mask
    test_accuracy: float  # of the best rounded mask on the held-out prompts
    base_accuracy: float  # no head patched, on the test prompts
    all_patched_accuracy: float  # every head of the group patched, on the test prompts
    losses: list[float]
    desideratum: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> list[tuple[int, int]]:
        return [tuple(h) for h, m in zip(self.heads, self.best_rounded.tolist(), strict=True) if m == 0]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": [h[0] for h in self.heads],
                "head": [h[1] for h in self.heads],
                "mask": self.mask.tolist(),
                "patched": [m == 0 for m in self.best_rounded.tolist()],
            }
        )

    def figure(self):
        import plotly.graph_objects as go

        labels = [f"L{lay}.h{h}" for lay, h in self.heads]
        fig = go.Figure(go.Bar(x=labels, y=(1 - self.mask).tolist(), name="1 − mask (patched share)"))
        fig.add_hline(y=0.5, line_dash="dash", annotation_text="rounding threshold")
        fig.update_layout(
            title=f"DCM {self.desideratum}: {len(self.selected)} heads patched, test accuracy "
            f"{self.test_accuracy:.2f} (none {self.base_accuracy:.2f}, all {self.all_patched_accuracy:.2f})",
            xaxis_title="head (layer.head)",
            yaxis_title="1 − m: how much of the head comes from the source run",
        )
        return fig

    def summary(self) -> dict[str, Any]:
        return {
            "desideratum": self.desideratum,
            "n_heads": len(self.heads),
            "selected": [f"L{a}.h{b}" for a, b in self.selected],
            "val_accuracy": round(self.val_accuracy, 3),
            "test_accuracy": round(self.test_accuracy, 3),
            "base_accuracy": round(self.base_accuracy, 3),
            "all_patched_accuracy": round(self.all_patched_accuracy, 3),
        }


def _as_positions(pos: int | Tensor, n: int, lengths: Tensor, what: str) -> Tensor:
    t = torch.full((n,), pos) if isinstance(pos, int) else pos.clone().long()
    if t.shape != (n,):
        raise ShapeError(f"{what} must be an int or one position per prompt ({n}), got {tuple(t.shape)}")
    if (t < 0).any() or (t.cpu() >= lengths.cpu()).any():
        raise ShapeError(f"{what} {t.tolist()} lies outside the prompts (lengths {lengths.tolist()})")
    return t


class _Masked:
    """Partial runs of the base with the group's heads mixed with the source's z by a mask."""

    def __init__(
        self, base: Run, source: Run, heads: Sequence[tuple[int, int]], pos: Tensor, src_pos: Tensor
    ):
        self.base, self.source = base, source
        self.by_layer: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, (lay, h) in enumerate(heads):
            self.by_layer[lay].append((i, h))
        self.layer0 = min(self.by_layer)
        self.pos, self.src_pos = pos, src_pos
        self.p0 = int(pos.min())

    def last_logits(self, rows: Tensor, mask: Tensor) -> Tensor:
        """Logits at the last position of prompts ``rows`` with mask ``mask`` (head,)."""
        tr, stepper = self.base.trace, self.base.stepper
        p0 = self.p0
        pos = self.pos[rows] - p0
        r = torch.arange(len(rows))

        def hook(layer: int, kind: str, t: Tensor) -> Tensor | None:
            if kind != "z" or layer not in self.by_layer:
                return None
            src = self.source.value("z", layer)[rows, self.src_pos[rows]]  # rows head d
            out = t.clone()
            for i, h in self.by_layer[layer]:
                m = mask[i]
                out[r, pos, h] = m * t[r, pos, h] + (1 - m) * src[:, h].to(t.dtype)
            return out

        h = tr.resid[self.layer0][rows, p0:]
        for layer in range(self.layer0, stepper.n_layers):
            k, v = tr.past(layer, p0, rows)
            h = stepper.layer(layer, h, start=p0, past=(k, v), hook=hook)
        last = self.base.tokens.last[rows] - p0
        return stepper.unembed(h[r, last])


def dcm(
    model: LoadedModel,
    base: TokenBatch,
    source: TokenBatch,
    desiderata: Tensor,
    *,
    heads: Sequence[tuple[int, int]],
    position: int | Tensor,
    source_position: int | Tensor | None = None,
    config: DCMConfig = DCMConfig(),
    desideratum: str = "",
    provenance: dict[str, Any] | None = None,
) -> DCMResult:
    """Train per-head masks so that patching the masked heads from ``source`` realises ``desiderata``
    (one target token id per prompt); see the module doc."""
    check_aligned(base, source)
    n = len(base)
    if desiderata.shape != (n,):
        raise ShapeError(
            f"desiderata must hold one token id per prompt ({n}), got shape {tuple(desiderata.shape)}"
        )
    if not heads:
        raise ConfigError("DCM needs at least one head")
    dims = model.dims
    for lay, h in heads:
        if not (0 <= lay < dims.n_layers and 0 <= h < dims.n_heads):
            raise SiteError(
                f"head ({lay}, {h}) does not exist; layers 0..{dims.n_layers - 1}, "
                f"heads 0..{dims.n_heads - 1}"
            )
    pos = _as_positions(position, n, base.lengths, "position")
    src_pos = _as_positions(
        position if source_position is None else source_position, n, source.lengths, "source_position"
    )
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n, generator=gen)
    n_train = max(1, round(config.train_fraction * n))
    n_val = max(1, round(config.val_fraction * n))
    train, val, test = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    if len(test) == 0:
        test = val
    base_run = trace(model, base)
    src_run = trace(model, source, record=["z"])
    runner = _Masked(base_run, src_run, heads, pos, src_pos)
    target = desiderata.to(model.device)

    def acc(rows: Tensor, mask: Tensor) -> float:
        with torch.no_grad():
            return float((runner.last_logits(rows, mask).argmax(-1) == target[rows]).float().mean())

    theta = torch.full((len(heads),), config.init_logit, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=config.lr)
    best: tuple[float, int, Tensor] | None = None
    losses: list[float] = []
    step = 0
    with model.active(), frozen(model.module):
        for _ in range(config.epochs):
            order = train[torch.randperm(len(train), generator=gen)]
            for b0 in range(0, len(order), config.batch_size):
                rows = order[b0 : b0 + config.batch_size]
                with torch.enable_grad():
                    m = torch.sigmoid(theta)
                    logits = runner.last_logits(rows, m)
                    loss = -logits[torch.arange(len(rows)), target[rows]].mean() + config.lam * (1 - m).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if step % config.eval_every == 0:
                    best = _keep_best(best, torch.sigmoid(theta.detach()), acc, val)
        best = _keep_best(best, torch.sigmoid(theta.detach()), acc, val)
        rounded = best[2]
        ones, zeros = torch.ones(len(heads)), torch.zeros(len(heads))
        result = DCMResult(
            heads=[[int(a), int(b)] for a, b in heads],
            mask=torch.sigmoid(theta.detach()),
            best_rounded=rounded,
            val_accuracy=best[0],
            test_accuracy=acc(test, rounded),
            base_accuracy=acc(test, ones),
            all_patched_accuracy=acc(test, zeros),
            losses=losses,
            desideratum=desideratum,
            provenance=model_provenance(model, provenance),
        )
    return result


def _keep_best(best, mask: Tensor, acc, val: Tensor):
    rounded = (mask > 0.5).float()
    a = acc(val, rounded)
    n_patched = int((rounded == 0).sum())
    if best is None or a > best[0] or (a == best[0] and n_patched > best[1]):
        return (a, n_patched, rounded)
    return best
