"""Skill localisation by grafting (Panigrahi, Saunshi, Zhao, Arora, ICML 2023; spec §3).

A binary mask ``γ`` over the fine-tuning update ``τ = θ_tuned − θ_base`` selects a few coordinates; the
grafted model is ``θ(γ) = θ_base + γ ⊙ τ`` (evaluated exactly as ``where(γ, θ_tuned, θ_base)``, so the
all-ones mask *is* the tuned model and the all-zeros mask the base, bit for bit).

The mask is learned as in the reference code (``graft_trainer.py``): ``γ_base`` = the top ``s·N``
coordinates by ``|τ|``; real scores ``S ~ U[0, 1)``, bias ``b = 10``,
``γ = γ_base + (1 − 2γ_base) ⊙ σ(S − b)``; plain gradient steps
``S ← S − lr · (1 − 2γ_base) ⊙ ∂L/∂θ|_{θ(γ)} ⊙ τ ⊙ σ'(S − b)`` with the gradient taken *at the grafted
model*, full batch; after each step the rounded mask is scored on fit + dev accuracy and the best is kept.
``lr`` is set at every step (``lr=None``) so that the ``s·N``-th largest step has size ``step_size``, and
no score moves more than ``step_clip · step_size`` in one step. By default ``step_size = 1.5 b / steps``: a
coordinate pushed at that rate crosses γ = 1/2 after two thirds of the step budget, the strongest ones
(clipped) after a third: "some σ(S − b) cross 0.5 within the step budget" (spec §3.5; the reference's
hand-tuned ``1e7`` has no meaning across models). A rate fixed from the first step, where every slope
``σ'`` is ~7.5e-5, threw the scores of the coordinates it had moved (slopes up to 0.25 one step later)
to ±2.5e5 in the second step: γ saturated at exactly 1.0 for millions of coordinates and the relaxation
stopped being one.

Rounding keeps the coordinates with γ > 1/2, cut to ``s·N`` by their *margin* (``S − b`` off the base mask,
``b − S`` on it), which keeps ranking where γ itself has saturated in float32; ties left at the cut are broken
in a seeded random order, never by position, and counted in the history. (Ranked by γ, the saturated ties
were cut by ``topk`` in parameter order: the demo's mask was the first saturated coordinates of layers 0-16.)

Baselines at the same number of coordinates: the untrained ``γ_base`` (top-|τ|) and a uniformly random
mask. Sparsity is a fraction of the *graft set*: by default every linear matrix and norm weight of every
layer. Embeddings and the LM head join it only when ``kinds`` has ``"embedding"`` (the zoo's full fine-tunes
freeze them); any parameter that differs outside the graft set, embeddings included, is named in a warning
and the result's provenance, and the whole graft set grafted is scored beside the tuned model.

Example (``pair``: a base and its fine-tune, tiny 4-layer Llamas; a toy graft, far smaller than the
demo's):
    >>> from tunelens.tasks.entity_tracking import EntityTrackingConfig, generate
    >>> data = generate(EntityTrackingConfig(n_boxes=3, n_contexts=10), seed=0)
    >>> splits = data.split({"train": 0.6, "test": 0.4}, seed=0)  # by world
    >>> config = GraftConfig(sparsities=(1e-2,), steps=3, max_fit=16, max_dev=8)
    >>> res = graft(pair, {"entity_tracking": splits}, config)
    >>> res.curve[["method", "sparsity", "n_params"]]  # 1 % of the 148,032 matrix and norm weights
        method  sparsity  n_params
    0    graft      0.01      1480
    1  top_abs      0.01      1480
    2   random      0.01      1480
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from tunelens.errors import ConfigError, PairIncompatibleError, TaskError
from tunelens.metrics import bootstrap_means, ece, percentile_ci
from tunelens.models.loaded import LoadedModel
from tunelens.models.pair import ModelPair
from tunelens.readout import answer_index, candidate_logits, last_logits
from tunelens.results import Result, pair_provenance
from tunelens.tasks.base import Dataset, Encoded
from tunelens.weights import (
    MATRIX_KINDS,
    canonical_param_name,
    frozen,
    functional_forward,
    matrix_param_names,
    read_stored,
    trainable_params,
)

log = logging.getLogger(__name__)
NORM = "norm"
EMBEDDING = "embedding"
KINDS = (*MATRIX_KINDS, NORM, EMBEDDING)
# |S − b| beyond which a coordinate's γ is saturated: σ' < 4.2e-8, and σ(S − b) rounds to 1.0 in float32
SATURATED = 17.0


@dataclass(frozen=True, kw_only=True)
class GraftConfig:
    """Mask training settings. ``kinds`` may hold matrix kinds, ``"norm"`` and ``"embedding"`` (embeddings
    and LM head); ``layers`` None = all. ``lr`` None sets the rate at every step so that the ``s·N``-th
    largest score step is ``step_size`` (None: ``1.5 · sigmoid_bias / steps``); ``step_clip`` caps any
    score's step at ``step_clip · step_size``.

    ``max_fit`` / ``max_dev`` cap the examples the mask is fitted / selected on (taken from the task's
    *train* split, split by item); the reported accuracies are on the task's test split.
    """

    sparsities: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    steps: int = 10
    lr: float | None = None
    step_size: float | None = None
    step_clip: float | None = 2.0
    sigmoid_bias: float = 10.0
    batch_size: int = 32
    max_fit: int = 128
    max_dev: int = 64
    kinds: tuple[str, ...] = (*MATRIX_KINDS, NORM)
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sparsities:
            raise ConfigError("sparsities must not be empty")
        for s in self.sparsities:
            if not 0 < s <= 1:
                raise ConfigError(f"each sparsity must be in (0, 1] (fraction of the graft set), got {s}")
        if self.steps < 1 or self.batch_size < 1 or self.max_fit < 1 or self.max_dev < 0:
            raise ConfigError(
                f"steps, batch_size, max_fit must be >= 1 and max_dev >= 0; got {self.steps}, "
                f"{self.batch_size}, {self.max_fit}, {self.max_dev}"
            )
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0 or None (automatic), got {self.lr}")
        if (self.step_size is not None and not self.step_size > 0) or not self.sigmoid_bias > 0:
            raise ConfigError("step_size (or None: automatic) and sigmoid_bias must be > 0")
        if self.step_clip is not None and not self.step_clip > 0:
            raise ConfigError(f"step_clip must be > 0 or None (unclipped), got {self.step_clip}")
        for k in self.kinds:
            if k not in KINDS:
                raise ConfigError(f"unknown kind {k!r}; expected some of {', '.join(KINDS)}")


# ------------------------------------------------------------------------------------- graft space


@dataclass
class GraftSpace:
    """The graft set: parameter names (canonical; a block of a fused projection by its block key), base and
    tuned values, the update τ, and each name's ``(layer, kind)``."""

    names: list[str]
    base: dict[str, Tensor]
    tuned: dict[str, Tensor]
    delta: dict[str, Tensor]
    outside_differ: list[str] = field(default_factory=list)  # differing parameters left at base
    where: dict[str, tuple[int | None, str]] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.base.values())

    def grafted(self, mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Parameters of the grafted model for a binary mask: tuned where the mask is set, base elsewhere."""
        return {n: torch.where(mask[n], self.tuned[n], self.base[n]) for n in self.names}

    def full_mask(self, value: bool) -> dict[str, Tensor]:
        return {n: torch.full_like(self.base[n], value, dtype=torch.bool) for n in self.names}


def _classifier(model: LoadedModel):
    """``name -> (layer, kind)`` for the graft set's names: a matrix (a block key of a fused projection too),
    the embeddings, or a norm (with its layer, from the family's layer path)."""
    mats = {key: mat for mat, key in matrix_param_names(model.module).items()}
    layer_re = re.compile(rf"(?:^|\.){re.escape(model.family.layers)}\.(\d+)\.")

    def classify(name: str) -> tuple[int | None, str]:
        if name in mats:
            return mats[name].layer, mats[name].kind
        if name.rsplit(".", 2)[-2] in model.family.embedding_modules:
            return None, EMBEDDING
        m = layer_re.search(name)
        return (int(m[1]) if m else None), NORM

    return classify


def _params(model: LoadedModel) -> dict[str, Tensor]:
    """Effective values of the graftable parameters (LoRA updates added for an adapter-on view)."""
    params = dict(trainable_params(model.module, include_norms=True, include_embeddings=True))
    if model.adapter is True:
        with model.active() as module:
            for mat, key in matrix_param_names(module).items():
                params[key] = read_stored(module, mat)
    return params


def graft_space(
    base: LoadedModel,
    tuned: LoadedModel,
    *,
    kinds: Sequence[str] = (*MATRIX_KINDS, NORM),
    layers: Sequence[int] | None = None,
) -> GraftSpace:
    """The graft set of a pair; :class:`PairIncompatibleError` if parameter names or shapes differ."""
    pb, pt = _params(base), _params(tuned)
    classify = _classifier(base)
    if set(pb) != set(pt):
        only_b, only_t = sorted(set(pb) - set(pt)), sorted(set(pt) - set(pb))
        first = (only_b or only_t)[0]
        raise PairIncompatibleError(
            f"cannot graft: parameter {first!r} is only in the {'base' if only_b else 'tuned'} model "
            f"({len(only_b)} names only in base, {len(only_t)} only in tuned); grafting needs two models "
            "with the same parameter names"
        )
    names, outside = [], []
    for n in pb:
        if pb[n].shape != pt[n].shape:
            raise PairIncompatibleError(
                f"cannot graft: parameter {n!r} has shape {tuple(pb[n].shape)} in the base model but "
                f"{tuple(pt[n].shape)} in the tuned model"
            )
        layer, kind = classify(n)
        if kind in kinds and (layers is None or layer in layers):
            names.append(n)
        elif not torch.equal(pb[n], pt[n]):
            outside.append(n)
    if not names:
        raise ConfigError(f"the graft set is empty for kinds {tuple(kinds)} and layers {layers}")
    outside += _other_differences(base, tuned, pb)
    return GraftSpace(
        where={n: classify(n) for n in names},
        names=names,
        base={n: pb[n] for n in names},
        tuned={n: pt[n] for n in names},
        delta={n: (pt[n] - pb[n]).float() for n in names},
        outside_differ=outside,
    )


def _other_differences(base: LoadedModel, tuned: LoadedModel, graftable: Mapping[str, Tensor]) -> list[str]:
    """Parameters that are not graftable at all (projection biases: Qwen2, GPT-2, GPT-NeoX) but differ
    between the models: they stay at base in every graft, and are named in ``outside_differ``."""
    covered = {n.split("[")[0] for n in graftable}
    with base.active() as mb:
        pb = {canonical_param_name(n): p for n, p in mb.named_parameters() if "lora_" not in n}
    with tuned.active() as mt:
        pt = {canonical_param_name(n): p for n, p in mt.named_parameters() if "lora_" not in n}
    return [n for n in pb if n not in covered and n in pt and not torch.equal(pb[n], pt[n])]


def cut_top(
    scores: Mapping[str, Tensor], n_keep: int, generator: torch.Generator | None = None
) -> tuple[dict[str, Tensor], int]:
    """Boolean masks with exactly ``n_keep`` coordinates set: the largest ``scores``, all tensors jointly.

    Coordinates tied at the cut are chosen in a random order from ``generator`` (seed 0 when None), never
    by their position. Also returns how many coordinates tied at the cut when a tie had to be broken (0 when
    the cut fell between two values).
    """
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    if not 0 <= n_keep <= total:
        raise ConfigError(f"cannot keep {n_keep} of {total} coordinates")
    flat = torch.zeros(total, dtype=torch.bool)
    n_tied = 0
    if n_keep:
        values = torch.cat([scores[n].reshape(-1).float() for n in names])
        cut = torch.topk(values, n_keep, sorted=False).values.min()
        torch.gt(values, cut, out=flat)
        tied = torch.nonzero(values == cut).flatten()
        need = n_keep - int(flat.sum())
        if need < len(tied):
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            n_tied = len(tied)
            tied = tied[torch.randperm(len(tied), generator=gen)[:need]]
        flat[tied] = True
    return {n: part.view_as(scores[n]) for n, part in zip(names, flat.split(sizes), strict=True)}, n_tied


def top_mask(
    scores: Mapping[str, Tensor], n_keep: int, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """:func:`cut_top`'s masks alone."""
    return cut_top(scores, n_keep, generator)[0]


def round_mask(
    scores: Mapping[str, Tensor],
    base_mask: Mapping[str, Tensor],
    bias: float,
    n_keep: int,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], int]:
    """The relaxed mask rounded under ‖γ‖₀ ≤ ``n_keep``: the coordinates with γ > 1/2, cut to the ``n_keep``
    with the largest margin (``S − b`` off ``base_mask``, ``b − S`` on it; γ > 1/2 iff the margin is > 0).

    The margin, unlike γ = σ(±(S − b)), does not saturate in float32, so it still ranks coordinates whose γ
    is exactly 1.0. Returns the mask and the number of coordinates tied at the cut (see :func:`cut_top`).
    """
    margin = {n: torch.where(base_mask[n], bias - scores[n], scores[n] - bias) for n in scores}
    on = {n: m.masked_fill(m <= 0, -math.inf) for n, m in margin.items()}
    cut, n_tied = cut_top(on, n_keep, generator)
    return {n: cut[n] & (margin[n] > 0) for n in scores}, n_tied


def saturated_fraction(
    scores: Mapping[str, Tensor], bias: float, within: Mapping[str, Tensor] | None = None
) -> float:
    """Fraction of coordinates (of those set in ``within``, if given) whose γ has saturated
    (``|S − b| > SATURATED``): they no longer move, and γ no longer ranks them."""
    if within is None:
        n = sum(t.numel() for t in scores.values())
        return sum(int(((t - bias).abs() > SATURATED).sum()) for t in scores.values()) / max(n, 1)
    n = sum(int(m.sum()) for m in within.values())
    hit = sum(int((((scores[k] - bias).abs() > SATURATED) & within[k]).sum()) for k in scores)
    return hit / max(n, 1)


# ----------------------------------------------------------------------------------------- forward


def _forward_last(model: LoadedModel, params: Mapping[str, Tensor] | None, enc: Encoded) -> Tensor:
    with model.active() as module:
        forward = (lambda **kw: functional_forward(module, params, **kw)) if params else None
        return last_logits(module, enc.tokens, forward=forward)


@torch.no_grad()
def _predictions(
    model: LoadedModel, params: Mapping[str, Tensor] | None, enc: Encoded, batch_size: int
) -> tuple[Tensor, Tensor, float]:
    """Candidate probabilities, the answer's candidate index, and the summed answer loss."""
    probs, labels, loss = [], [], 0.0
    for start in range(0, len(enc), batch_size):
        part = enc.select(slice(start, start + batch_size))
        logits = _forward_last(model, params, part)
        cl, label = (
            candidate_logits(logits, part.candidate_ids),
            answer_index(part.candidate_ids, part.answer_ids),
        )
        probs.append(cl.softmax(-1).double())
        labels.append(label)
        loss += float(torch.nn.functional.cross_entropy(logits.float(), part.answer_ids, reduction="sum"))
    return torch.cat(probs), torch.cat(labels), loss


def _metrics(p: Tensor, y: Tensor, loss: float) -> dict[str, float]:
    return {"accuracy": float((p.argmax(1) == y).double().mean()), "ece": ece(p, y), "loss": loss / len(y)}


def evaluate(
    model: LoadedModel, params: Mapping[str, Tensor] | None, enc: Encoded, *, batch_size: int = 64
) -> dict[str, float]:
    """Accuracy restricted to the candidates, its ECE (10 bins, candidate softmax) and the answer loss."""
    return _metrics(*_predictions(model, params, enc, batch_size))


def _scored(model, params, enc: Encoded) -> tuple[dict[str, float], Tensor]:
    """:func:`evaluate`'s numbers and the per-example hits (1.0 where the answer wins)."""
    p, y, loss = _predictions(model, params, enc, 64)
    return _metrics(p, y, loss), (p.argmax(1) == y).double()


# ------------------------------------------------------------------------------------ mask training


@dataclass
class _Fit:
    mask: dict[str, Tensor]
    history: list[dict[str, Any]]  # per step, with the rate that step used


def fit_mask(
    model: LoadedModel,
    space: GraftSpace,
    fit: Encoded,
    dev: Encoded | None,
    sparsity: float,
    config: GraftConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> _Fit:
    """Learn a rounded mask with about ``sparsity · N`` coordinates (see the module doc)."""
    gen = torch.Generator().manual_seed(config.seed)
    n_keep = max(1, round(sparsity * space.n_params))
    gb = top_mask({n: space.delta[n].abs() for n in space.names}, n_keep, gen)
    scores = {n: torch.rand(space.base[n].shape, generator=gen) for n in space.names}
    b = config.sigmoid_bias
    step_size = config.step_size if config.step_size is not None else 1.5 * b / config.steps
    history: list[dict[str, Any]] = []

    def score(mask: dict[str, Tensor]) -> float:
        params = space.grafted(mask)
        acc = evaluate(model, params, fit)["accuracy"]
        return acc + (evaluate(model, params, dev)["accuracy"] if dev is not None else 0.0)

    best = (score(gb), {n: m.clone() for n, m in gb.items()})
    history.append(
        {
            "step": 0,
            "selection": best[0],
            "n_on": n_keep,
            "loss": float("nan"),
            "lr": float("nan"),
            "saturated": saturated_fraction(scores, b),
            "saturated_in_mask": saturated_fraction(scores, b, gb),
            "ties_at_cut": 0,
        }
    )
    with frozen(model.module):  # gradients reach θ(γ) only, never the base model's own parameters
        for step in range(1, config.steps + 1):
            t0 = time.perf_counter()
            theta = {}
            for n in space.names:
                sig = torch.sigmoid(scores[n] - b)
                gamma = torch.where(gb[n], 1 - sig, sig)
                theta[n] = (space.base[n] + gamma * space.delta[n]).requires_grad_(True)
            total = 0.0
            for start in range(0, len(fit), config.batch_size):
                part = fit.select(slice(start, start + config.batch_size))
                loss = torch.nn.functional.cross_entropy(
                    _forward_last(model, theta, part).float(), part.answer_ids
                )
                (loss * len(part) / len(fit)).backward()
                total += loss.item() * len(part) / len(fit)
            with torch.no_grad():
                upd = {}
                for n in space.names:  # the chain rule through θ(γ), in the gradient's own buffer
                    sig = torch.sigmoid(scores[n] - b)
                    g = theta[n].grad.mul_(space.delta[n]).mul_(sig.mul_(1 - sig))
                    upd[n] = torch.where(gb[n], g.neg(), g) if bool(gb[n].any()) else g
                del theta
                lr = config.lr
                if lr is None:  # the s·N-th largest step is step_size
                    steps_abs = torch.cat([u.abs().reshape(-1) for u in upd.values()])
                    lr = step_size / max(float(torch.topk(steps_abs, n_keep).values[-1]), 1e-30)
                    del steps_abs
                clip = None if config.step_clip is None else config.step_clip * step_size
                for n in space.names:
                    step_n = upd[n].mul_(lr)
                    if clip is not None:
                        step_n.clamp_(-clip, clip)
                    scores[n].sub_(step_n)
                del upd
            mask, n_tied = round_mask(scores, gb, b, n_keep, gen)
            n_on = int(sum(int(m.sum()) for m in mask.values()))
            sel_score = score(mask)
            saturated = saturated_fraction(scores, b)
            saturated_in_mask = saturated_fraction(scores, b, mask)
            history.append(
                {
                    "step": step,
                    "selection": sel_score,
                    "n_on": n_on,
                    "loss": total,
                    "lr": lr,
                    "saturated": saturated,
                    "saturated_in_mask": saturated_in_mask,
                    "ties_at_cut": n_tied,
                }
            )
            if progress is not None:
                progress(
                    f"graft s={sparsity:g} step {step}/{config.steps}: loss {total:.3f}, fit+dev acc "
                    f"{sel_score:.3f}, {n_on} coords on ({saturated_in_mask:.1%} of them saturated), "
                    f"{n_tied} tied at the cut ({time.perf_counter() - t0:.1f} s)"
                )
            if sel_score > best[0]:
                best = (sel_score, {n: m.clone() for n, m in mask.items()})
    return _Fit(mask=best[1], history=history)


# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class GraftResult(Result):
    """Grafting curves, calibration, per-layer maps and (for several tasks) mask overlaps.

    ``curve``: task × method (graft / top_abs / random) × sparsity → accuracy, ECE, loss, recovered
    fraction ``(acc − base) / (tuned − base)``. ``reference``: base and tuned on each task.
    ``layer_map``: grafted coordinates per task, sparsity, layer and kind. ``overlap``: mask pairs per
    sparsity (intersection, ``|∩| / min``, Jaccard, and the value expected for random masks). ``cross``:
    each task's graft evaluated on every task. ``masks``: flat indices of each learned mask into the
    concatenation of ``param_names`` (sizes ``param_sizes``).
    """

    title: ClassVar[str] = "Skill localisation by grafting"
    analysis: ClassVar[str] = "skills"
    config: GraftConfig
    tasks: tuple[str, ...]
    curve: Any
    reference: Any
    layer_map: Any
    history: Any
    overlap: Any
    cross: Any
    param_names: tuple[str, ...]
    param_sizes: Tensor
    masks: dict
    provenance: dict = field(default_factory=dict)
    comparisons: Any = None  # method differences with intervals (None in results saved before they existed)

    def to_frame(self):
        return self.curve

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"graft_set_params": int(self.param_sizes.sum())}
        ref = self.reference.set_index(["task", "model"])
        for task in self.tasks:
            for m in ("base", "tuned"):
                out[f"{m}[{task}]"] = {
                    "accuracy": round(float(ref.loc[(task, m), "accuracy"]), 3),
                    "ece": round(float(ref.loc[(task, m), "ece"]), 3),
                }
            for _, row in self.curve[(self.curve.task == task)].iterrows():
                entry = {
                    "accuracy": round(float(row.accuracy), 3),
                    "ece": round(float(row.ece), 3),
                    "recovered": None if math.isnan(row.recovered) else round(float(row.recovered), 3),
                }
                for k in ("accuracy", "recovered"):
                    if f"{k}_lo" in row and not math.isnan(row[f"{k}_lo"]):
                        entry[f"{k}_ci"] = [round(float(row[f"{k}_lo"]), 3), round(float(row[f"{k}_hi"]), 3)]
                out[f"{row.method}@{row.sparsity:g}[{task}]"] = entry
        if self.comparisons is not None and len(self.comparisons):
            for r in self.comparisons.itertuples():
                out[f"{r.comparison}@{r.sparsity:g}[{r.task}]"] = {
                    "difference": round(float(r.difference), 3),
                    "ci": [round(float(r.lo), 3), round(float(r.hi), 3)],
                    "separated": bool(r.separated),
                    "n_items": int(r.n_items),
                    "n_groups": int(r.n_groups),
                }
        if self.overlap is not None and len(self.overlap):
            for _, row in self.overlap.iterrows():
                entry = {
                    "over_min": round(float(row.over_min), 4),
                    "jaccard": round(float(row.jaccard), 4),
                    "random_expected": round(float(row.random_expected), 6),
                }
                if "learned_overlap" in row:  # results saved before these columns lack them
                    entry |= {
                        "start_share": [
                            round(float(row.start_share_a), 4),
                            round(float(row.start_share_b), 4),
                        ],
                        "learned": [int(row.learned_a), int(row.learned_b)],
                        "learned_overlap": round(float(row.learned_overlap), 4),
                        "learned_random_expected": round(float(row.learned_random_expected), 6),
                    }
                out[f"overlap@{row.sparsity:g}[{row.task_a}|{row.task_b}]"] = entry
        return out

    def figure(
        self, view: Literal["curve", "ece", "layers", "steps", "overlap"] = "curve", task: str | None = None
    ):
        """``curve``: accuracy vs sparsity for graft, top-|τ| and random masks, with base/tuned lines;
        ``ece``: calibration of base, tuned and grafts; ``layers``: grafted coordinates per layer and kind;
        ``steps``: the mask training, selection accuracy (fit + dev) and the fraction of saturated scores
        per step; ``overlap``: mask overlap between tasks."""
        import plotly.express as px

        task = task or self.tasks[0]
        if view == "curve":
            df = self.curve[self.curve.task == task].copy()
            bars = {}
            if "accuracy_lo" in df:  # 95 % cluster-bootstrap intervals over the test items
                df["err_hi"], df["err_lo"] = df.accuracy_hi - df.accuracy, df.accuracy - df.accuracy_lo
                bars = {"error_y": "err_hi", "error_y_minus": "err_lo"}
            fig = px.line(
                df,
                x="sparsity",
                y="accuracy",
                color="method",
                markers=True,
                log_x=True,
                labels={"sparsity": "fraction of graft-set parameters grafted", "accuracy": "test accuracy"},
                title=f"Grafting {task}: accuracy vs sparsity"
                + ("<br><sup>bars: 95 % bootstrap intervals over test items</sup>" if bars else ""),
                **bars,
            )
            ref = self.reference[self.reference.task == task].set_index("model").accuracy
            fig.add_hline(y=float(ref["tuned"]), line_dash="dash", annotation_text="fine-tuned")
            fig.add_hline(y=float(ref["base"]), line_dash="dot", annotation_text="base")
            return fig
        if view == "ece":
            df = self.curve[(self.curve.task == task) & (self.curve.method == "graft")]
            rows = [
                {"model": r.model, "ece": r.ece}
                for r in self.reference[self.reference.task == task].itertuples()
            ]
            rows += [{"model": f"graft {r.sparsity:g}", "ece": r.ece} for r in df.itertuples()]
            return px.bar(
                rows,
                x="model",
                y="ece",
                labels={"ece": "expected calibration error (10 bins)", "model": "model"},
                title=f"Calibration on {task}",
            )
        if view == "layers":
            df = self.layer_map[self.layer_map.task == task]
            return px.bar(
                df,
                x="layer",
                y="n_grafted",
                color="kind",
                facet_row="sparsity",
                labels={"n_grafted": "grafted coordinates", "layer": "layer"},
                title=f"Where the {task} graft lives",
            )
        if view == "steps":
            from plotly.subplots import make_subplots

            df = self.history[self.history.task == task]
            sat = "saturated_in_mask" if "saturated_in_mask" in df else "saturated"
            fig = make_subplots(
                rows=1,
                cols=2,
                subplot_titles=(
                    "selection accuracy (fit + dev, max 2)",
                    "saturated scores (|S − b| > 17)"
                    + (" among the mask's coordinates" if sat == "saturated_in_mask" else ""),
                ),
            )
            palette = px.colors.qualitative.Plotly
            for i, (s, part) in enumerate(df.groupby("sparsity")):
                part = part.sort_values("step")
                line = dict(color=palette[i % len(palette)])
                kw = dict(name=f"s={s:g}", legendgroup=str(s), line=line)
                fig.add_scatter(x=part.step, y=part.selection, row=1, col=1, **kw)
                if sat in part:
                    fig.add_scatter(x=part.step, y=part[sat], showlegend=False, row=1, col=2, **kw)
            fig.update_xaxes(title_text="step", dtick=1)
            fig.update_yaxes(title_text="fraction", row=1, col=2)
            fig.update_layout(title=f"Mask training on {task}")
            return fig
        if view == "overlap":
            if self.overlap is None or not len(self.overlap):
                raise ConfigError("this result has one task; overlaps need a multi-task graft")
            measures = {
                "over_min": "whole masks",
                "random_expected": "whole masks, random",
                "learned_overlap": "learned (outside the shared top-|Δθ| start)",
                "learned_random_expected": "learned, random",
            }
            have = [m for m in measures if m in self.overlap.columns]
            df = self.overlap.melt(
                id_vars=["sparsity", "task_a", "task_b"],
                value_vars=have,
                var_name="measure",
                value_name="overlap",
            ).replace({"measure": measures})
            return px.bar(
                df,
                x="sparsity",
                y="overlap",
                color="measure",
                barmode="group",
                log_x=True,
                labels={"overlap": "|a ∧ b| / min(|a|, |b|)", "sparsity": "sparsity"},
                title="Overlap of the task masks: whole masks (both start from the same top-|Δθ| mask, so "
                "two unlearned masks overlap by 1) and what each learned beyond that start, against random",
            )
        raise ConfigError(f"unknown view {view!r}; expected curve, ece, layers, steps or overlap")


# ------------------------------------------------------------------------------------------ engine


def _test_split(data: Mapping[str, Dataset]) -> Dataset:
    """The split the reported numbers come from: ``test``, else the first ``test_<name>``."""
    return data["test"] if "test" in data else next(v for k, v in data.items() if k.startswith("test"))


def _prepare(data: Mapping[str, Dataset], tokenizer, config: GraftConfig, task: str):
    if "train" not in data or not any(k.startswith("test") for k in data):
        raise TaskError(f"task {task!r}: expected data with a 'train' and a 'test' split, got {sorted(data)}")
    train = data["train"]
    parts = train.split({"fit": 0.75, "dev": 0.25}, seed=config.seed) if config.max_dev else {"fit": train}
    fit = parts["fit"].subset(range(min(config.max_fit, len(parts["fit"]))))
    dev = parts["dev"].subset(range(min(config.max_dev, len(parts["dev"])))) if config.max_dev else None
    return (
        fit.encode(tokenizer),
        (dev.encode(tokenizer) if dev is not None else None),
        _test_split(data).encode(tokenizer),
    )


N_BOOT = 2000
METHODS = ("graft", "top_abs", "random")


def _intervals(
    hits: Mapping[tuple[str, str], Tensor],
    task: str,
    sparsity: float,
    groups: list[str],
    curve: list[dict[str, Any]],
    seed: int,
) -> list[dict[str, Any]]:
    """95 % cluster-bootstrap intervals (over the test items' ``item_id``: for entity tracking, its worlds)
    of each method's accuracy and recovered fraction, written into its ``curve`` row, and the differences
    between the methods, returned as rows. All share one set of draws."""
    keys = ["base", "tuned", *(f"{m}@{sparsity:g}" for m in METHODS)]
    means = bootstrap_means(torch.stack([hits[(task, k)] for k in keys]), groups, n_boot=N_BOOT, seed=seed)
    col = {k: means[:, i] for i, k in enumerate(keys)}
    gap = col["tuned"] - col["base"]
    for row in curve:
        if row["task"] == task and row["sparsity"] == sparsity:
            acc = col[f"{row['method']}@{sparsity:g}"]
            row["accuracy_lo"], row["accuracy_hi"] = percentile_ci(acc)
            ratio = (acc - col["base"]) / gap.where(gap.abs() > 1e-9, torch.tensor(math.nan, dtype=gap.dtype))
            row["recovered_lo"], row["recovered_hi"] = percentile_ci(ratio)
    rows = []
    for a, b in (("graft", "top_abs"), ("graft", "random"), ("top_abs", "random")):
        d = col[f"{a}@{sparsity:g}"] - col[f"{b}@{sparsity:g}"]
        lo, hi = percentile_ci(d)
        point = float(hits[(task, f"{a}@{sparsity:g}")].mean() - hits[(task, f"{b}@{sparsity:g}")].mean())
        rows.append(
            {
                "task": task,
                "sparsity": sparsity,
                "comparison": f"{a} - {b}",
                "difference": point,
                "lo": lo,
                "hi": hi,
                "separated": bool(lo > 0 or hi < 0),
                "n_items": len(groups),
                "n_groups": len(set(groups)),
            }
        )
    return rows


def _layer_rows(space: GraftSpace, mask: Mapping[str, Tensor], task: str, sparsity: float) -> list[dict]:
    rows: dict[tuple[int, str], list[int]] = {}
    for n in space.names:
        layer, kind = space.where[n]
        key = (-1 if layer is None else layer, kind)
        acc = rows.setdefault(key, [0, 0])
        acc[0] += int(mask[n].sum())
        acc[1] += mask[n].numel()
    return [
        {
            "task": task,
            "sparsity": sparsity,
            "layer": lk[0],
            "kind": lk[1],
            "n_grafted": v[0],
            "fraction": v[0] / v[1],
        }
        for lk, v in sorted(rows.items())
    ]


def _flat_indices(space: GraftSpace, mask: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([mask[n].reshape(-1) for n in space.names]).nonzero().flatten()


def graft(
    pair: ModelPair,
    tasks: Mapping[str, Mapping[str, Dataset]],
    config: GraftConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> GraftResult:
    """Learn a graft per task and sparsity on ``pair``; compare with top-|τ| and random masks.

    ``tasks`` maps a task name to its data: a ``train`` split (fit + dev for the mask) and a ``test``
    split (or ``test_<name>``) for the reported numbers. With several tasks (a multi-task fine-tune) the
    result also holds mask overlaps and cross-task accuracies.
    """
    import pandas as pd

    config = config or GraftConfig()
    if not tasks:
        raise ConfigError("expected at least one task to graft")
    say = progress or (lambda msg: log.info(msg))
    space = graft_space(pair.base, pair.tuned, kinds=config.kinds, layers=config.layers)
    if space.outside_differ:
        log.warning(
            "%d parameters differ between base and tuned but lie outside the graft set (kept at base): %s…",
            len(space.outside_differ),
            space.outside_differ[0],
        )
    say(f"graft set: {len(space.names)} tensors, {space.n_params:,} parameters")
    model = pair.base
    enc = {t: _prepare(d, pair.tokenizer, config, t) for t, d in tasks.items()}
    gen = torch.Generator().manual_seed(config.seed + 1)
    reference, curve, layer_rows, history, cross, comparisons = [], [], [], [], [], []
    masks: dict[str, Tensor] = {}
    learned: dict[tuple[str, float], dict[str, Tensor]] = {}
    starts: dict[float, dict[str, Tensor]] = {}  # the top-|Δθ| mask every learned mask starts from
    hits: dict[tuple[str, str], Tensor] = {}  # (task, model or method@sparsity) -> per-test-example hits
    groups = {t: [e.item_id for e in _test_split(d)] for t, d in tasks.items()}
    for t, (_, _, test) in enc.items():
        for role, m in (("base", pair.base), ("tuned", pair.tuned)):
            metrics, hits[(t, role)] = _scored(m, None, test)
            reference.append({"task": t, "model": role, **metrics})
        if space.outside_differ:  # the whole graft set grafted: what a restricted set can reach at most
            all_on = space.grafted(space.full_mask(True))
            reference.append({"task": t, "model": "graft_set_all", **evaluate(model, all_on, test)})
            del all_on
    ref = pd.DataFrame(reference).set_index(["task", "model"])
    for s in config.sparsities:
        n_keep = max(1, round(s * space.n_params))
        # the same draw as fit_mask's γ_base, so top_abs *is* the learned mask's starting point
        top = top_mask(
            {n: space.delta[n].abs() for n in space.names}, n_keep, torch.Generator().manual_seed(config.seed)
        )
        starts[s] = top
        rand = top_mask({n: torch.rand(space.base[n].shape, generator=gen) for n in space.names}, n_keep)
        for t, (fit, dev, test) in enc.items():
            say(f"graft: task {t}, sparsity {s:g} ({n_keep:,} coordinates)")
            res = fit_mask(model, space, fit, dev, s, config, progress=say)
            learned[(t, s)] = res.mask
            masks[f"{t}@{s:g}"] = _flat_indices(space, res.mask)
            history += [{"task": t, "sparsity": s, **h} for h in res.history]
            layer_rows += _layer_rows(space, res.mask, t, s)
            base_acc, tuned_acc = ref.loc[(t, "base"), "accuracy"], ref.loc[(t, "tuned"), "accuracy"]
            for method, mask in (("graft", res.mask), ("top_abs", top), ("random", rand)):
                m, hits[(t, f"{method}@{s:g}")] = _scored(model, space.grafted(mask), test)
                n_on = int(sum(int(x.sum()) for x in mask.values()))
                gain = tuned_acc - base_acc
                curve.append(
                    {
                        "task": t,
                        "method": method,
                        "sparsity": s,
                        "n_params": n_on,
                        **m,
                        "recovered": (m["accuracy"] - base_acc) / gain if abs(gain) > 1e-9 else math.nan,
                    }
                )
            comparisons += _intervals(hits, t, s, groups[t], curve, config.seed)
    overlap = []
    names = list(tasks)
    for s in config.sparsities:
        for i, a in enumerate(names):
            for bname in names[i + 1 :]:
                ma, mb, start = learned[(a, s)], learned[(bname, s)], starts[s]
                na = sum(int(x.sum()) for x in ma.values())
                nb = sum(int(x.sum()) for x in mb.values())
                inter = sum(int((ma[n] & mb[n]).sum()) for n in space.names)
                union = na + nb - inter
                # Both masks start from the same top-|Δθ| mask, so their raw overlap is high even if
                # neither learned anything (two unlearned masks overlap by 1.0). What each mask *learned*
                # is what it added outside that start; those additions are compared with random ones.
                n_start = sum(int(x.sum()) for x in start.values())
                add_a = {n: ma[n] & ~start[n] for n in space.names}
                add_b = {n: mb[n] & ~start[n] for n in space.names}
                la = sum(int(x.sum()) for x in add_a.values())
                lb = sum(int(x.sum()) for x in add_b.values())
                l_inter = sum(int((add_a[n] & add_b[n]).sum()) for n in space.names)
                overlap.append(
                    {
                        "sparsity": s,
                        "task_a": a,
                        "task_b": bname,
                        "n_a": na,
                        "n_b": nb,
                        "intersection": inter,
                        "over_min": inter / max(1, min(na, nb)),
                        "jaccard": inter / max(1, union),
                        "random_expected": max(na, nb) / space.n_params,
                        "start_share_a": (na - la) / max(1, na),
                        "start_share_b": (nb - lb) / max(1, nb),
                        "learned_a": la,
                        "learned_b": lb,
                        "learned_overlap": l_inter / max(1, min(la, lb)),
                        "learned_random_expected": max(la, lb) / max(1, space.n_params - n_start),
                    }
                )
        if len(names) > 1:
            for a in names:
                params = space.grafted(learned[(a, s)])
                for b_task, (_, _, test) in enc.items():
                    cross.append(
                        {"sparsity": s, "mask_task": a, "eval_task": b_task, **evaluate(model, params, test)}
                    )
    return GraftResult(
        config=config,
        tasks=tuple(names),
        curve=pd.DataFrame(curve),
        reference=pd.DataFrame(reference),
        layer_map=pd.DataFrame(layer_rows),
        history=pd.DataFrame(history),
        overlap=pd.DataFrame(overlap),
        cross=pd.DataFrame(cross),
        comparisons=pd.DataFrame(comparisons),
        param_names=tuple(space.names),
        param_sizes=torch.tensor([space.base[n].numel() for n in space.names]),
        masks=masks,
        provenance=pair_provenance(pair)
        | {
            "graft_set": f"{len(space.names)} tensors, {space.n_params} parameters, kinds {config.kinds}, "
            f"layers {'all' if config.layers is None else config.layers}",
            "outside_graft_set_differing": len(space.outside_differ),
            "outside_graft_set_differing_names": space.outside_differ[:20],
            "n_fit": {t: len(e[0]) for t, e in enc.items()},
            "n_dev": {t: (len(e[1]) if e[1] is not None else 0) for t, e in enc.items()},
            "n_test": {t: len(e[2]) for t, e in enc.items()},
        },
    )


__all__ = [
    "KINDS",
    "GraftConfig",
    "GraftResult",
    "GraftSpace",
    "cut_top",
    "evaluate",
    "fit_mask",
    "graft",
    "graft_space",
    "round_mask",
    "saturated_fraction",
    "top_mask",
]
