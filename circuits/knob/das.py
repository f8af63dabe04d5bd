"""The knob itself: rank-1 distributed alignment search (DAS) in plain PyTorch, and its baselines.

Spec §2.3. A unit vector ``u`` at ``resid_post`` of one layer, last token. For an item, the *target*
prompt has one intent and the *source* prompt the same context and query with the other intent; the
interchange intervention replaces the target's coordinate along ``u`` by the source's,
``h_t ← h_t + u (uᵀh_s − uᵀh_t)``, and the loss is the cross-entropy (full vocabulary) of the answer the
*source* intent requires. Model weights are frozen; only ``u`` is trained (Adam on an unnormalised
vector, normalised in the forward pass). Items must be answered right in both intents by the model the
direction is trained on (:func:`confident`), and never share an answer's first token (guaranteed by
:class:`~circuits.knob.data.KnobItems`).

*Interchange accuracy*: the fraction of (target, source) pairs whose patched answer is the one the source
intent requires, restricted to the two candidates. Baselines: the difference of class means
(:func:`tunelens.directions.diff_of_means`, context minus prior) and a random unit vector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.knob.data import CONTEXT, PRIOR, KnobItems
from circuits.knob.runs import candidate_logits, check_layer, last_logits, last_resid, picks_context
from tunelens.backends.base import TokenBatch, project
from tunelens.directions import Direction, diff_of_means
from tunelens.errors import ConfigError
from tunelens.sites import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DASConfig:
    """Training settings (spec: 1 epoch, batch 8, lr 1e-3 on 1000 pairs; we have ~10× fewer pairs, so
    more epochs and a larger step)."""

    epochs: int = 6
    batch_size: int = 8
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")


def confident(model, items: KnobItems, batch_size: int = 32) -> Tensor:
    """True for items ``model`` answers right in both intents (restricted to the two candidates)."""
    tok = model.tokenizer
    ctx = picks_context(
        candidate_logits(model, items.encode(tok, "context"), items.candidates, batch_size=batch_size)
    )
    pri = picks_context(
        candidate_logits(model, items.encode(tok, "prior"), items.candidates, batch_size=batch_size)
    )
    return ctx & ~pri


@dataclass(frozen=True)
class Interchange:
    """Both directions of every item: targets, the sources' residuals at the site, required answers."""

    target: TokenBatch
    h_src: Float[Tensor, "batch d_model"]
    label: Tensor
    other: Tensor

    def __len__(self) -> int:
        return len(self.target)


def interchange_set(model, items: KnobItems, layer: int, batch_size: int = 32) -> Interchange:
    """Targets of both intents (prior targets first), each with its source's residual at ``layer``."""
    check_layer(model, layer)
    if len(items) == 0:
        raise ConfigError("an interchange set needs at least one item")
    tok = model.tokenizer
    target = model.encode(items.prompts("prior") + items.prompts("context"))
    h_ctx = last_resid(model, items.encode(tok, "context"), [layer], batch_size=batch_size)[:, 0]
    h_pri = last_resid(model, items.encode(tok, "prior"), [layer], batch_size=batch_size)[:, 0]
    cand = items.candidates
    return Interchange(
        target=target,
        h_src=torch.cat([h_ctx, h_pri]).detach(),
        label=torch.cat([cand[:, CONTEXT], cand[:, PRIOR]]),
        other=torch.cat([cand[:, PRIOR], cand[:, CONTEXT]]),
    )


def _writes(site: Site, basis: Tensor, h_src: Tensor) -> Callable:
    return lambda sl, part: [project(site, basis, source=h_src[sl].to(basis.dtype), positions=part.last)]


def interchange_hits(model, direction: Direction, data: Interchange, batch_size: int = 32) -> Tensor:
    """Per pair: whether the patched answer is the source-required one (two-candidate restricted)."""
    basis = direction.vector[:, None]
    logits = last_logits(
        model, data.target, writes=_writes(direction.site, basis, data.h_src), batch_size=batch_size
    )
    return (logits.gather(1, data.label[:, None]) > logits.gather(1, data.other[:, None]))[:, 0].cpu()


def interchange_accuracy(model, direction: Direction, data: Interchange, batch_size: int = 32) -> float:
    """Fraction of pairs whose patched answer is the source-required one (two-candidate restricted)."""
    return float(interchange_hits(model, direction, data, batch_size).float().mean())


def train_das(
    model, data: Interchange, layer: int, cfg: DASConfig, *, name: str = "das"
) -> tuple[Direction, list[float]]:
    """Learn ``u`` by rank-1 DAS on ``data``; returns the direction and the loss of every step."""
    check_layer(model, layer)
    site = Site("resid_post", layer)
    gen = torch.Generator().manual_seed(cfg.seed)
    w = torch.randn(model.dims.d_model, generator=gen)
    w = (w / w.norm()).to(model.device).requires_grad_(True)  # unit length: Adam's lr is then an angle
    opt = torch.optim.Adam([w], lr=cfg.lr)
    losses: list[float] = []
    n = len(data)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            part = data.target.select(idx)
            basis = (w / w.norm())[:, None]
            h_src = data.h_src[idx].to(w.device)
            logits = last_logits(
                model,
                part,
                writes=lambda sl, p, b=basis, h=h_src: [project(site, b, source=h[sl], positions=p.last)],
                batch_size=len(part),
                grad=True,
            )
            loss = torch.nn.functional.cross_entropy(logits.float(), data.label[idx].to(logits.device))
            (grad,) = torch.autograd.grad(loss, [w])
            opt.zero_grad(set_to_none=True)
            w.grad = grad
            opt.step()
            losses.append(float(loss.detach()))
        log.info("DAS epoch %d/%d: loss %.3f", epoch + 1, cfg.epochs, losses[-1])
    direction = Direction(
        site=site,
        vector=w.detach(),
        model=model.content_hash,
        name=name,
        meta={
            "method": "das_rank1",
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "n_train": n,
            "final_loss": losses[-1],
        },
    )
    return direction, losses


def mean_direction(model, items: KnobItems, layer: int, batch_size: int = 32) -> Direction:
    """Difference of means of ``resid_post[layer]`` at the last token, context intent minus prior intent."""
    check_layer(model, layer)
    tok = model.tokenizer
    h_ctx = last_resid(model, items.encode(tok, "context"), [layer], batch_size=batch_size)[:, 0]
    h_pri = last_resid(model, items.encode(tok, "prior"), [layer], batch_size=batch_size)[:, 0]
    acts = torch.cat([h_ctx, h_pri]).cpu()
    labels = torch.cat([torch.ones(len(h_ctx)), torch.zeros(len(h_pri))]).long()
    return diff_of_means(
        acts, labels, site=Site("resid_post", layer), model=model.content_hash, name="diff-of-means"
    )


def random_direction(model, layer: int, seed: int = 0) -> Direction:
    """A uniformly random unit vector at ``resid_post[layer]`` (the null baseline)."""
    check_layer(model, layer)
    v = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(seed))
    return Direction(
        site=Site("resid_post", layer),
        vector=v,
        model=model.content_hash,
        name="random",
        meta={"method": "random", "seed": seed},
    )
