"""The four head groups of the entity-tracking circuit, by iterated path patching (algorithms.md §1.3).

Backwards from the logits, each group is the set of sender heads whose path into the previous group's
receivers matters most, in one model, between clean prompts (the *target* run) and the paper's corrupt
prompts (the *source*: another world whose query letter names no box, ``counterfactuals(…, "context")``):

=====================  ========================  =======================================  ===========
group (paper letter)   sender position           receivers                                 via
=====================  ========================  =======================================  ===========
value_fetcher (A)      last                      the logits (direct effect)                logits
position_transmitter   last                      value fetchers' queries at last           q
position_detector      query label (last − 2)    position transmitters' values there      v
structure_reader       earlier query label       position detectors' values there         v
=====================  ========================  =======================================  ===========

For the structure readers the corrupt activation is read at a random box label of the corrupt prompt
(its mark ``random_label``): the corrupt query names no box, so there is no earlier occurrence. Values
(and keys) are patched per KV group (:func:`circuits.patching.path_patching.receiver_units`). The score of
a sender
is the paper's ``(p_patch − p_clean) / p_clean`` of the answer; the most negative scores win (``rank``).
Heads in both the value-fetcher and the position-transmitter lists are kept only as transmitters.

Exact path patching of every head is costly, so every step first estimates every head's path effect at
once by *path attribution* (:func:`path_attribution`, two backward passes) and patches only the
``n_candidates`` best-ranked heads exactly; the result says how many were checked per group.

Example (``model``: an untrained tiny Llama of 4 layers × 4 heads; ``dataset``: 12 entity-tracking
prompts; which heads it finds depends on the model, what the result holds does not):
    >>> from tunelens.tasks.entity_tracking import counterfactuals
    >>> clean = dataset.encode(model.tokenizer)
    >>> corrupt = counterfactuals(dataset, "context", seed=0).encode(model.tokenizer)
    >>> cfg = GroupSearchConfig(top_k=(2, 1, 2, 1), n_candidates=(4, 2, 4, 2))
    >>> res, runs = find_groups(model, clean, corrupt, cfg)
    >>> list(res.groups)
    ['value_fetcher', 'position_transmitter', 'position_detector', 'structure_reader']
    >>> res.summary()["n_checked"]["value_fetcher"], res.summary()["n_heads_in_model"]
    (4, 16)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from circuits.patching.engine import Run, trace
from circuits.patching.metrics import Answers, LastLogits, logit_diff
from circuits.patching.path_patching import PathPatchingResult, path_patching, receiver_units
from tunelens.backends.stepwise import Trace
from tunelens.errors import ConfigError, ShapeError
from tunelens.models.loaded import LoadedModel
from tunelens.results import Result, model_provenance
from tunelens.tasks.base import Encoded
from tunelens.weights import frozen

log = logging.getLogger(__name__)

Rank = Literal["negative", "abs"]
AttrMetric = Literal["log_prob", "logit_diff"]


GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
"""One colour per head group, in group order, in every layer × head map."""


def head_map_axes(n_layers: int, n_heads: int) -> dict[str, Any]:
    """Plotly layout of a layer × head map: every head a tick, every layer (every other one when deep)."""
    return {
        "xaxis_title": "head",
        "yaxis_title": "layer",
        "xaxis": {"dtick": 1, "range": [-0.7, n_heads - 0.3]},
        "yaxis": {"dtick": 1 if n_layers <= 16 else 2, "range": [-0.7, n_layers - 0.3]},
    }


@dataclass(frozen=True, kw_only=True)
class GroupStep:
    """One step of the search: senders at ``position`` (a named position of the clean data) into the
    group ``receivers`` (``None``: the logits) through ``via``, at the same position. ``source_position``
    names where the corrupt activation is read (default: the same index); ``takes_from`` names a group that
    loses the heads this one chooses."""

    name: str
    position: str
    receivers: str | None = None
    via: str = "logits"
    source_position: str | None = None
    takes_from: str | None = None

    def __post_init__(self) -> None:
        if (self.receivers is None) != (self.via == "logits"):
            raise ConfigError(
                f"step {self.name!r}: via='logits' takes no receivers and q/k/v need them, "
                f"got via={self.via!r}, receivers={self.receivers!r}"
            )
        if self.via not in ("logits", "q", "k", "v"):
            raise ConfigError(f"step {self.name!r}: via must be logits, q, k or v, got {self.via!r}")


PAPER_STEPS: tuple[GroupStep, ...] = (
    GroupStep(name="value_fetcher", position="last"),
    GroupStep(
        name="position_transmitter",
        position="last",
        receivers="value_fetcher",
        via="q",
        takes_from="value_fetcher",
    ),
    GroupStep(name="position_detector", position="query_label", receivers="position_transmitter", via="v"),
    GroupStep(
        name="structure_reader",
        position="prev_query_label",
        receivers="position_detector",
        via="v",
        source_position="random_label",
    ),
)
GROUP_POSITIONS = {s.name: s.position for s in PAPER_STEPS}


@dataclass(frozen=True, kw_only=True)
class GroupSearchConfig:
    """How many heads each step keeps (``top_k``, one per step) and checks exactly (``n_candidates``).

    The paper (Llama-7B, 1024 heads): top-k 20 / 5 / 10 / 5 (Goat, FLoat: 50 / 20 / 30 / 5), every head
    checked exactly. ``rank="negative"``: the most negative scores win (the paper); ``"abs"``: the largest
    in magnitude."""

    top_k: tuple[int, ...] = (20, 5, 10, 5)
    n_candidates: tuple[int, ...] = (40, 20, 30, 20)
    rank: Rank = "negative"
    steps: tuple[GroupStep, ...] = PAPER_STEPS

    def __post_init__(self) -> None:
        n = len(self.steps)
        if len(self.top_k) != n or len(self.n_candidates) != n:
            raise ConfigError(
                f"top_k and n_candidates need one entry per step ({n}), got {len(self.top_k)} and "
                f"{len(self.n_candidates)}"
            )
        if any(k < 1 for k in self.top_k) or any(
            c < k for c, k in zip(self.n_candidates, self.top_k, strict=True)
        ):
            raise ConfigError(
                f"need 1 <= top_k <= n_candidates per step, got top_k={self.top_k}, "
                f"n_candidates={self.n_candidates}"
            )
        if self.rank not in ("negative", "abs"):
            raise ConfigError(f"rank must be 'negative' or 'abs', got {self.rank!r}")
        names = [s.name for s in self.steps]
        for i, s in enumerate(self.steps):
            for ref in (s.receivers, s.takes_from):
                if ref is not None and ref not in names[:i]:
                    raise ConfigError(f"step {s.name!r} refers to {ref!r}, which is not an earlier step")


# --- path attribution ------------------------------------------------------------------------------------


def _metric(last: LastLogits, metric: str) -> Tensor:
    """Per prompt: the answer's log-probability, or the logit difference."""
    if metric == "log_prob":
        return last.selected[..., 0] - last.lse
    if metric == "logit_diff":
        return logit_diff(last)
    raise ConfigError(f"path attribution metric must be 'log_prob' or 'logit_diff', got {metric!r}")


def path_attribution(
    target: Run,
    source: Run,
    answers: Answers,
    *,
    receivers: list[tuple[int, int]] = (),
    via: str = "logits",
    sender_pos: Tensor,
    source_pos: Tensor | None = None,
    metric: AttrMetric = "log_prob",
) -> Tensor:
    """First-order estimate of every head's path-patching effect at once, shape ``layer head``.

    ``effect(sender) ≈ ∂metric/∂(receiver inputs) · ∂(receiver inputs)/∂z_sender · (z_source − z_target)``
    with every head's ``z`` detached in the second factor: the change may travel only along the residual
    stream and through the MLPs, as in path patching's first step (other heads frozen). Two backward
    passes: the metric into the receivers' ``via`` inputs at ``sender_pos`` (skipped for ``logits``), then
    their weighted sum into every ``z``. ``metric``: mean log-probability of the answer (the first order of
    the paper's relative probability change) or mean logit difference.
    """
    model, tokens = target.model, target.tokens
    n = len(tokens)
    rows = torch.arange(n)
    sender_pos = sender_pos.long()
    source_pos = sender_pos if source_pos is None else source_pos.long()
    dims = model.dims
    units = [] if via == "logits" else receiver_units(receivers, via, dims.n_heads, dims.n_kv_heads)
    weights: dict[int, Tensor] = {}
    with model.active(), frozen(model.module), torch.enable_grad():
        if units:
            probes: dict[int, Tensor] = {}
            layers = {lay for lay, _ in units}

            def first(layer: int, kind: str, t: Tensor) -> Tensor | None:
                if kind == via and layer in layers:
                    probes[layer] = torch.zeros_like(t, requires_grad=True)
                    return t + probes[layer]
                return None

            tr = target.stepper.trace(tokens.input_ids, tokens.last, hook=first)
            _metric(LastLogits.from_logits(tr.logits, answers), metric).sum().backward()
            for lay in layers:  # keep only the receiver units at the receiver position
                mask = torch.zeros_like(probes[lay])
                for ul, u in units:
                    if ul == lay:
                        mask[rows, sender_pos.to(mask.device), u] = 1
                weights[lay] = (probes[lay].grad * mask).detach()

        z_probes: dict[int, Tensor] = {}
        received: list[Tensor] = []

        def second(layer: int, kind: str, t: Tensor) -> Tensor | None:
            if kind == "z":
                z_probes[layer] = torch.zeros_like(t, requires_grad=True)
                return t.detach() + z_probes[layer]
            if kind == via and layer in weights:
                received.append((weights[layer].to(t.dtype) * t).sum())
            return None

        tr = target.stepper.trace(tokens.input_ids, tokens.last, hook=second)
        if units:
            total = torch.stack(received).sum()
        else:
            total = _metric(LastLogits.from_logits(tr.logits, answers), metric).sum()
        if total.requires_grad:  # else no sender reaches the receivers (all in layer 0): every grad is None
            total.backward()
    out = []
    for lay in range(dims.n_layers):
        grad = z_probes[lay].grad  # None where no path reaches the receivers (layers at or after them)
        if grad is None:
            out.append(torch.zeros(dims.n_heads))
            continue
        g = grad[rows, sender_pos.to(grad.device)]  # batch head d_head
        diff = source.value("z", lay)[rows, source_pos] - target.value("z", lay)[rows, sender_pos]
        out.append((g * diff.to(g.dtype)).sum(-1).mean(0).float().cpu())
    return torch.stack(out)


# --- the search ------------------------------------------------------------------------------------------


def moved_source(source: Run, to_pos: Tensor, from_pos: Tensor) -> Run:
    """A copy of ``source`` whose ``z`` at ``to_pos`` (per prompt) is its ``z`` at ``from_pos``: path
    patching then takes a sender's corrupt activation from another position than the one it patches."""
    rows = torch.arange(len(source.tokens))
    acts = dict(source.trace.acts)
    for (lay, kind), t in source.trace.acts.items():
        if kind == "z":
            moved = t.clone()
            moved[rows, to_pos.to(t.device)] = t[rows, from_pos.to(t.device)]
            acts[(lay, kind)] = moved
    tr = source.trace
    new = Trace(resid=tr.resid, keys=tr.keys, values=tr.values, acts=acts, logits=tr.logits)
    return Run(model=source.model, tokens=source.tokens, trace=new, stepper=source.stepper)


def _rank(scores: Tensor, rank: str) -> list[int]:
    return (scores if rank == "negative" else -scores.abs()).argsort().tolist()


@dataclass(frozen=True, kw_only=True)
class HeadGroupsResult(Result):
    """The head groups found by iterated path patching, with every candidate checked and its scores."""

    title: ClassVar[str] = "circuit head groups (path patching)"
    analysis: ClassVar[str] = "circuit"
    model: str
    n_layers: int
    n_heads: int
    steps: list[dict[str, Any]]  # name, position, receivers, via, source_position
    groups: dict[str, list[list[int]]]  # name -> (layer, head)
    candidates: dict[str, list[list[int]]]  # name -> heads patched exactly, in attribution order
    estimate: dict[str, list[float]]  # name -> path attribution of each candidate
    score: dict[str, list[float]]  # name -> exact (p_patch − p_clean) / p_clean of each candidate
    taken: dict[str, list[list[int]]] = field(default_factory=dict)  # name -> heads moved to a later group
    n_prompts: int
    rank: str = "negative"
    seconds: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> dict[str, str]:
        return {s["name"]: s["position"] for s in self.steps}

    def heads_at(self) -> dict[str, list[tuple[int, int, str]]]:
        """The groups as ``(layer, head, position)`` lists, as
        :func:`circuits.circuit.faithfulness.faithfulness`
        takes them."""
        pos = self.positions
        return {g: [(a, b, pos[g]) for a, b in hs] for g, hs in self.groups.items()}

    def n_checked(self) -> dict[str, int]:
        return {g: len(c) for g, c in self.candidates.items()}

    def to_frame(self):
        import pandas as pd

        rows = []
        for g, cand in self.candidates.items():
            chosen = {tuple(h) for h in self.groups.get(g, [])}
            taken = {tuple(h) for h in self.taken.get(g, [])}
            for (lay, h), est, sc in zip(cand, self.estimate[g], self.score[g], strict=True):
                rows.append(
                    {
                        "group": g,
                        "position": self.positions[g],
                        "layer": lay,
                        "head": h,
                        "attribution": est,
                        "score": sc,
                        "chosen": (lay, h) in chosen,
                        "moved_to_later_group": (lay, h) in taken,
                    }
                )
        return pd.DataFrame(rows)

    def figure(self):
        """Layer × head: the chosen heads of each group (filled), the candidates checked (hollow)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        colours = GROUP_COLOURS
        n = max(len(self.groups), 1)
        for i, s in enumerate(self.steps):
            g = s["name"]
            offset = (i - (n - 1) / 2) * 0.15  # heads in several groups stay visible side by side
            c = colours[i % len(colours)]
            cand = self.candidates.get(g, [])
            fig.add_scatter(
                x=[h + offset for _, h in cand],
                y=[lay for lay, _ in cand],
                mode="markers",
                marker={"symbol": "circle-open", "color": c, "size": 7},
                name=f"{g}: checked ({len(cand)})",
                text=[f"L{a}.H{b} score {sc:.3f}" for (a, b), sc in zip(cand, self.score[g], strict=True)],
                legendgroup=g,
            )
            chosen = self.groups.get(g, [])
            fig.add_scatter(
                x=[h + offset for _, h in chosen],
                y=[lay for lay, _ in chosen],
                mode="markers",
                marker={"symbol": "circle", "color": c, "size": 12},
                name=f"{g} @ {s['position']} ({len(chosen)} heads)",
                text=[f"L{a}.H{b}" for a, b in chosen],
                legendgroup=g,
            )
        fig.update_layout(
            title=f"Circuit head groups in {self.model} by path patching (filled: chosen; hollow: checked)",
            **head_map_axes(self.n_layers, self.n_heads),
        )
        return fig

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "groups": {g: [f"L{a}.H{b}" for a, b in hs] for g, hs in self.groups.items()},
            "n_heads": {g: len(hs) for g, hs in self.groups.items()},
            "n_checked": self.n_checked(),
            "n_heads_in_model": self.n_layers * self.n_heads,
            "n_prompts": self.n_prompts,
            "rank": self.rank,
        }


def find_groups(
    model: LoadedModel,
    clean: Encoded,
    corrupt: Encoded,
    cfg: GroupSearchConfig = GroupSearchConfig(),
    *,
    provenance: dict[str, Any] | None = None,
) -> tuple[HeadGroupsResult, dict[str, PathPatchingResult]]:
    """Run the steps of ``cfg`` in ``model``: target = clean, source = corrupt (aligned token lengths).

    Returns the groups and, per group, the exact path-patching result of its candidates."""
    if clean.tokens.input_ids.shape != corrupt.tokens.input_ids.shape:
        raise ShapeError(
            f"clean and corrupt prompts must align, got shapes {tuple(clean.tokens.input_ids.shape)} "
            f"and {tuple(corrupt.tokens.input_ids.shape)}"
        )
    answers = Answers.from_encoded(clean)
    target = trace(model, clean.tokens, record=["z"])
    source = trace(model, corrupt.tokens, record=["z"])
    dims = model.dims
    groups: dict[str, list[tuple[int, int]]] = {}
    cands: dict[str, list[list[int]]] = {}
    ests: dict[str, list[float]] = {}
    scores: dict[str, list[float]] = {}
    taken: dict[str, list[list[int]]] = {}
    runs: dict[str, PathPatchingResult] = {}
    seconds: dict[str, float] = {}
    for step, top_k, n_cand in zip(cfg.steps, cfg.top_k, cfg.n_candidates, strict=True):
        t0 = time.time()
        s_pos = clean.position(step.position)
        src = source
        src_pos = None
        if step.source_position is not None:
            src_pos = corrupt.position(step.source_position)
            src = moved_source(source, s_pos, src_pos)
        receivers = groups.get(step.receivers, []) if step.receivers else []
        if step.receivers and not receivers:
            log.warning("step %s: group %s is empty, nothing to patch into", step.name, step.receivers)
            groups[step.name], cands[step.name], ests[step.name], scores[step.name] = [], [], [], []
            continue
        top_layer = max(lay for lay, _ in receivers) if receivers else dims.n_layers
        if top_layer == 0:
            log.warning("step %s: the receivers are all in layer 0, no head can send to them", step.name)
            groups[step.name], cands[step.name], ests[step.name], scores[step.name] = [], [], [], []
            continue
        est = path_attribution(
            target, source, answers, receivers=receivers, via=step.via, sender_pos=s_pos, source_pos=src_pos
        )  # layer head
        pool = [(lay, h) for lay in range(top_layer) for h in range(dims.n_heads)]
        flat = torch.stack([est[lay, h] for lay, h in pool])
        chosen_idx = _rank(flat, cfg.rank)[:n_cand]
        candidates = [pool[i] for i in chosen_idx]
        res = path_patching(
            target,
            src,
            answers,
            senders=candidates,
            receivers=receivers,
            via=step.via,  # type: ignore[arg-type]
            sender_pos=s_pos,
            receiver_pos=None if step.via == "logits" else s_pos,
            provenance=model_provenance(model, provenance),
        )
        score = res.relative_prob()
        order = _rank(score, cfg.rank)[:top_k]
        groups[step.name] = [candidates[i] for i in order]
        if step.takes_from:
            mine = set(groups[step.name])
            taken[step.takes_from] = [list(h) for h in groups[step.takes_from] if h in mine]
            groups[step.takes_from] = [h for h in groups[step.takes_from] if h not in mine]
        cands[step.name] = [list(h) for h in candidates]
        ests[step.name] = [float(flat[i]) for i in chosen_idx]
        scores[step.name] = score.tolist()
        runs[step.name] = res
        seconds[step.name] = round(time.time() - t0, 2)
        log.info("step %s: %d heads from %d checked", step.name, len(groups[step.name]), len(candidates))
    result = HeadGroupsResult(
        model=model.name,
        n_layers=dims.n_layers,
        n_heads=dims.n_heads,
        steps=[
            {
                "name": s.name,
                "position": s.position,
                "receivers": s.receivers,
                "via": s.via,
                "source_position": s.source_position,
            }
            for s in cfg.steps
        ],
        groups={g: [list(h) for h in hs] for g, hs in groups.items()},
        candidates=cands,
        estimate=ests,
        score=scores,
        taken=taken,
        n_prompts=len(clean),
        rank=cfg.rank,
        seconds=seconds,
        provenance=model_provenance(model, provenance),
    )
    return result, runs
