"""Path patching (Wang et al. 2022; algorithms.md §1.3): sender heads → receiver heads through q, k or v.

Two runs of one model on aligned prompts: the *target* run (the one measured) and the *source* run (where
the sender's new output comes from). For each sender head ``(layer, head)`` at the sender position:

1. **Step 1.** The target run from the sender's layer on, with the sender's ``z`` at the sender position
   replaced by the source's, and every *other* head's ``z`` at every later layer frozen to its target
   value (so the change travels only along the direct path and through the MLPs, which are recomputed).
   The receivers' q, k or v inputs (``q_proj``/``k_proj``/``v_proj`` outputs) at the receiver position
   are recorded. With no receivers the step-1 logits are the result (the sender's direct effect).
2. **Step 2.** The target run again, with only those receiver inputs replaced by the recorded values;
   everything downstream is recomputed. The metric is read at the last position.

Receivers at or below a sender's layer are left alone for that sender (the path runs forward).

Grouped-query attention: a k or v input is shared by every query head of a KV group, so for ``via="k"`` or
``"v"`` the unit patched is the KV group ``(layer, kv_head)``; receivers given as query heads are mapped to
their groups (``PathPatchingResult.units`` says what was patched).

Within a model use source = clean, target = corrupt (the sender restores the clean answer along the path)
or the paper's source = corrupt, target = clean (the most negative scores matter). Runs start at the
sender's layer and position from the target's cached residual, keys and values (see
:mod:`tunelens.backends.stepwise`), and all senders of one layer run as one batch.

Example (``model``: a tiny Llama of 4 layers with 4 query heads in 2 KV groups; ``dataset``: 12
entity-tracking prompts of 25 tokens, the query's box letter at position 22):
    >>> from circuits.patching.engine import trace
    >>> from circuits.patching.metrics import Answers
    >>> from tunelens.tasks.entity_tracking import counterfactuals
    >>> clean = dataset.encode(model.tokenizer)
    >>> corrupt = counterfactuals(dataset, "query", seed=0).encode(model.tokenizer)  # another box queried
    >>> answers = Answers.from_encoded(clean, foil=corrupt)
    >>> source = trace(model, clean.tokens, record=["z"])
    >>> target = trace(model, corrupt.tokens, record=["z"])
    >>> res = path_patching(target, source, answers, senders=[(0, 1), (1, 2), (2, 0)],
    ...                     receivers=[(3, 0), (3, 1)], via="k", sender_pos=22, receiver_pos=22)
    >>> res.units  # the query heads 0 and 1 of layer 3 share KV group 0
    [[3, 0]]
    >>> tuple(res.effect("logit_diff").shape)  # the change of the metric, per sender
    (3,)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from circuits.patching.engine import Run, check_aligned
from circuits.patching.metrics import Answers, LastLogits, metric_values
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.results import Result

Via = Literal["q", "k", "v", "logits"]
VIAS = ("q", "k", "v", "logits")
Position = int | Tensor


def receiver_units(
    receivers: Sequence[tuple[int, int]], via: str, n_heads: int, n_kv_heads: int
) -> list[tuple[int, int]]:
    """The (layer, index) units patched: query heads for ``q``, KV groups (deduplicated) for ``k``/``v``."""
    if via == "q":
        return sorted(dict.fromkeys((int(lay), int(h)) for lay, h in receivers))
    group = n_heads // n_kv_heads
    return sorted(dict.fromkeys((int(lay), int(h) // group) for lay, h in receivers))


def _positions(pos: Position, n: int, lengths: Tensor, what: str) -> Tensor:
    t = torch.full((n,), pos) if isinstance(pos, int) else pos.clone().long()
    if t.shape != (n,):
        raise ShapeError(
            f"{what} must be an int or one position per prompt ({n}), got shape {tuple(t.shape)}"
        )
    if (t < 0).any() or (t.cpu() >= lengths.cpu()).any():
        raise ShapeError(f"{what} {t.tolist()} lies outside the prompts (lengths {lengths.tolist()})")
    return t


@dataclass(frozen=True, kw_only=True)
class PathPatchingResult(Result):
    """Per sender head, the metrics after patching the sender → receivers path (means over prompts)."""

    title: ClassVar[str] = "path patching"
    analysis: ClassVar[str] = "patching"
    via: str
    senders: list[list[int]]  # (layer, head)
    units: list[list[int]]  # receiver units patched: (layer, head) for q, (layer, kv_head) for k/v
    values: dict[str, Tensor]  # metric -> (sender,)
    target: dict[str, float]  # unpatched target run
    source: dict[str, float]  # unpatched source run
    n_prompts: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def effect(self, metric: str = "logit_diff") -> Tensor:
        """Change of the metric against the unpatched target run, per sender."""
        return self.values[metric] - self.target[metric]

    def relative_prob(self) -> Tensor:
        """The paper's score ``(p_patch − p_target) / p_target`` of the answer probability."""
        return (self.values["prob"] - self.target["prob"]) / self.target["prob"]

    def to_frame(self):
        import pandas as pd

        data: dict[str, Any] = {
            "layer": [s[0] for s in self.senders],
            "head": [s[1] for s in self.senders],
        }
        for m, v in self.values.items():
            data[m] = v.tolist()
            data[f"effect_{m}"] = self.effect(m).tolist()
        data["relative_prob"] = self.relative_prob().tolist()
        return pd.DataFrame(data)

    def figure(self, metric: str = "logit_diff"):
        import plotly.graph_objects as go

        layers = sorted({s[0] for s in self.senders})
        heads = sorted({s[1] for s in self.senders})
        grid = [[None] * len(heads) for _ in layers]
        for (lay, h), e in zip(self.senders, self.effect(metric).tolist(), strict=True):
            grid[layers.index(lay)][heads.index(h)] = e
        unit = "KV group" if self.via in ("k", "v") else "head"
        target = "the logits (direct)" if self.via == "logits" else f"{len(self.units)} receiver {unit}(s)"
        fig = go.Figure(
            go.Heatmap(z=grid, x=heads, y=layers, colorscale="RdBu", zmid=0, colorbar={"title": "Δ"})
        )
        fig.update_layout(
            title=f"Path patching: sender head → {target} via {self.via}",
            xaxis_title="sender head",
            yaxis_title="sender layer",
        )
        return fig

    def summary(self) -> dict[str, Any]:
        eff = self.effect("logit_diff" if "logit_diff" in self.values else "prob")
        order = eff.abs().argsort(descending=True)[:5].tolist()
        return {
            "via": self.via,
            "n_senders": len(self.senders),
            "receiver_units": [list(u) for u in self.units],
            "top_senders": {
                f"L{self.senders[i][0]}.h{self.senders[i][1]}": round(float(eff[i]), 4) for i in order
            },
        }


def path_patching(
    target: Run,
    source: Run,
    answers: Answers,
    *,
    senders: Sequence[tuple[int, int]],
    receivers: Sequence[tuple[int, int]] = (),
    via: Via = "logits",
    sender_pos: Position,
    receiver_pos: Position | None = None,
    provenance: dict[str, Any] | None = None,
) -> PathPatchingResult:
    """Path patching of every sender (one at a time) into the receivers (all together); see the module doc.

    ``target`` must have recorded ``z`` (``trace(model, tokens, record=["z"])``), ``source`` too.
    ``receivers`` are (layer, query head) pairs; ``via="logits"`` takes none.
    """
    check_aligned(target.tokens, source.tokens)
    if via not in VIAS:
        raise ConfigError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
    if not senders:
        raise ConfigError("path patching needs at least one sender head")
    if len(answers) != len(target.tokens):
        raise ShapeError(f"{len(answers)} answers for {len(target.tokens)} prompts")
    dims = target.model.dims
    n = len(target.tokens)
    lengths = target.tokens.lengths
    for lay, h in [*senders, *receivers]:
        if not (0 <= lay < dims.n_layers and 0 <= h < dims.n_heads):
            raise SiteError(
                f"head ({lay}, {h}) does not exist; layers 0..{dims.n_layers - 1}, "
                f"heads 0..{dims.n_heads - 1}"
            )
    if via == "logits":
        if receivers:
            raise ConfigError("via='logits' measures the direct effect and takes no receivers")
        units: list[tuple[int, int]] = []
    else:
        if not receivers:
            raise ConfigError(f"via={via!r} needs receiver heads")
        if receiver_pos is None:
            raise ConfigError("give receiver_pos (where the receivers' inputs are patched)")
        units = receiver_units(receivers, via, dims.n_heads, dims.n_kv_heads)
        last_receiver = max(lay for lay, _ in units)
        late = [s for s in senders if s[0] >= last_receiver]
        if late:
            raise ConfigError(
                f"senders {late} are not before the last receiver layer {last_receiver}; a path runs forward"
            )
    s_pos = _positions(sender_pos, n, lengths, "sender_pos")
    r_pos = None if receiver_pos is None else _positions(receiver_pos, n, lengths, "receiver_pos")
    if r_pos is not None and (r_pos < s_pos).any():
        raise ConfigError(
            f"receiver positions {r_pos.tolist()} precede sender positions {s_pos.tolist()}; "
            "attention is causal"
        )
    for lay in range(dims.n_layers):  # raise a clear error if z was not recorded
        target.value("z", lay)
        source.value("z", lay)

    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, (lay, _) in enumerate(senders):
        by_layer[lay].append(i)
    out: list[LastLogits | None] = [None] * len(senders)
    with target.model.active(), torch.no_grad():
        for lay, idx in by_layer.items():
            heads = [senders[i][1] for i in idx]
            last = _sender_batch(target, source, lay, heads, s_pos, via, units, r_pos, answers)
            for j, i in enumerate(idx):
                out[i] = last[j]
    values = {m: torch.stack([metric_values(o)[m].mean() for o in out]) for m in metric_values(out[0])}
    tgt = {m: float(v.mean()) for m, v in metric_values(target.last(answers)).items()}
    src = {m: float(v.mean()) for m, v in metric_values(source.last(answers)).items()}
    return PathPatchingResult(
        via=via,
        senders=[[int(a), int(b)] for a, b in senders],
        units=[list(u) for u in units],
        values=values,
        target=tgt,
        source=src,
        n_prompts=n,
        provenance=provenance or {},
    )


def _sender_batch(
    target: Run,
    source: Run,
    layer: int,
    heads: list[int],
    s_pos: Tensor,
    via: str,
    units: list[tuple[int, int]],
    r_pos: Tensor | None,
    answers: Answers,
) -> list[LastLogits]:
    """Steps 1 and 2 for the senders ``heads`` of one layer, as one batch (rows = sender × prompt)."""
    stepper, tr = target.stepper, target.trace
    n, b = len(target.tokens), len(heads)
    dev = tr.resid[0].device
    rows = torch.arange(n * b, device=dev)
    p0 = int(s_pos.min())
    sp = s_pos.to(dev).repeat(b)
    head_of_row = torch.tensor(heads, device=dev).repeat_interleave(n)
    prompt_of_row = torch.arange(n, device=dev).repeat(b)
    src_z = source.value("z", layer).to(dev)
    stop = stepper.n_layers if via == "logits" else max(lay for lay, _ in units) + 1
    rec_layers = {lay for lay, _ in units if lay > layer}
    recorded: dict[int, Tensor] = {}

    def step1(lay: int, kind: str, t: Tensor) -> Tensor | None:
        if kind == "z":
            if lay == layer:
                t = t.clone()
                t[rows, sp - p0, head_of_row] = src_z[prompt_of_row, sp, head_of_row].to(t.dtype)
                return t
            if lay > layer:  # freeze every head to the target run
                return target.value("z", lay)[:, p0:].repeat(b, 1, 1, 1).to(t.dtype)
        if kind == via and lay in rec_layers:
            recorded[lay] = t
        return None

    h = _run(target, layer, p0, b, step1, stop)
    if via == "logits":
        return _split(_logits(target, h, p0, b, answers), b)

    units = [u for u in units if u[0] > layer]  # receivers at or below the sender's layer see no change
    r0 = int(r_pos.min())
    rp = r_pos.to(dev).repeat(b)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for lay, u in units:
        by_layer[lay].append(u)

    def step2(lay: int, kind: str, t: Tensor) -> Tensor | None:
        if kind != via or lay not in by_layer:
            return None
        t = t.clone()
        rec = recorded[lay]
        for u in by_layer[lay]:
            t[rows, rp - r0, u] = rec[rows, rp - p0, u]
        return t

    start = min(rec_layers)
    h = _run(target, start, r0, b, step2, stepper.n_layers)
    return _split(_logits(target, h, r0, b, answers), b)


def _run(target: Run, layer: int, p0: int, b: int, hook, stop: int) -> Tensor:
    """The target run of ``b`` copies of the batch from ``layer``, positions ``p0..``, up to ``stop``."""
    tr, stepper = target.trace, target.stepper
    h = tr.resid[layer][:, p0:].repeat(b, 1, 1)
    for lay in range(layer, stop):
        k, v = tr.past(lay, p0)
        h = stepper.layer(lay, h, start=p0, past=(k.repeat(b, 1, 1, 1), v.repeat(b, 1, 1, 1)), hook=hook)
    return h


def _logits(target: Run, h: Tensor, p0: int, b: int, answers: Answers) -> LastLogits:
    last = (target.tokens.last - p0).repeat(b).to(h.device)
    logits = target.stepper.unembed(h[torch.arange(h.shape[0], device=h.device), last])
    return LastLogits.from_logits(logits.view(b, len(target.tokens), -1), answers)


def _split(last: LastLogits, b: int) -> list[LastLogits]:
    return [last.index(j) for j in range(b)]
