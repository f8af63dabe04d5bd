"""Steering with a one-dimensional knob: set the coordinate ``uᵀh`` of the residual at one layer.

``h ← h + u (c − uᵀh)`` at the direction's site, on the last token of every forward pass (Minder et al.
2024, §2.4 of the spec): the prompt's end when scoring, and each generated token when generating. ``c``
is calibrated from the distribution of ``uᵀh`` on prompts of each intent (:func:`calibrate`), so the sign
and scale of ``u`` do not matter.

Example:
    >>> import torch
    >>> from tunelens.directions import Direction
    >>> from tunelens.models.tiny import TinyConfig, tiny_llama, tiny_tokenizer
    >>> from tunelens.models.loaded import LoadedModel, ModelSource
    >>> from tunelens.sites import Site
    >>> tok = tiny_tokenizer()
    >>> m = LoadedModel(tiny_llama(TinyConfig(n_layers=2), len(tok.get_vocab()), seed=0), tok,
    ...                 source=ModelSource(kind="memory", location="tiny"))
    >>> u = Direction(site=Site("resid_post", 0), vector=torch.ones(64))
    >>> isinstance(steer(m, u, "Box F contains the", c=3.0, max_new_tokens=2), str)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.knob.data import KnobItems
from circuits.knob.runs import candidate_logits, check_layer, last_resid, picks_context
from tunelens.backends.base import TokenBatch, Write, project
from tunelens.directions import Direction
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.generation import generate_with_edit
from tunelens.metrics import auroc


def check_direction(model, direction: Direction) -> Direction:
    """``direction`` if it can steer ``model``: a residual site inside the model, the model's width."""
    if not isinstance(direction, Direction):
        raise ConfigError(f"expected a tunelens.directions.Direction, got {type(direction).__name__}")
    if direction.site.kind not in ("resid_pre", "resid_post"):
        raise SiteError(
            f"a knob direction lives in the residual stream (resid_pre/post), got {direction.site}"
        )
    check_layer(model, direction.site.layer)
    direction.check_width(model.dims.d_model, f"residual stream of {model.name}")
    return direction


def check_c(c: float | Tensor) -> Tensor:
    """``c`` as a float tensor, or :class:`ConfigError` if it is not finite."""
    if isinstance(c, bool):
        raise ConfigError(f"c must be a finite number, got {c!r}")
    try:
        t = torch.as_tensor(c, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"c must be a finite number (or a tensor of them), got {c!r}") from None
    if not torch.isfinite(t).all():
        raise ConfigError(f"c must be finite, got {c!r}; pick it from calibrate(...).grid(...)")
    return t


def with_layer(direction: Direction, layer: int) -> Direction:
    """The same vector at another layer of the same kind (the residual basis is shared across layers)."""
    from dataclasses import replace

    from tunelens.sites import Site

    return replace(
        direction, site=Site(direction.site.kind, layer), meta={**direction.meta, "moved_to": layer}
    )


def steer_writes(direction: Direction, c: float | Tensor, tokens: TokenBatch) -> list[Write]:
    """The backend write that sets ``uᵀh = c`` at each prompt's last token (``c``: scalar or per prompt)."""
    ct = check_c(c).reshape(-1, 1)
    return [project(direction.site, direction.vector[:, None], coords=ct, positions=tokens.last)]


def projections(
    model, direction: Direction, tokens: TokenBatch, batch_size: int = 32
) -> Float[Tensor, " batch"]:
    """``uᵀh`` at each prompt's last token, at the direction's site."""
    check_direction(model, direction)
    if direction.site.kind != "resid_post":
        raise SiteError(f"projections are read at resid_post sites, got {direction.site}")
    h = last_resid(model, tokens, [direction.site.layer], batch_size=batch_size)[:, 0]
    return direction.project(h).cpu()


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The distribution of ``uᵀh`` per intent (its class means), from which set-points are read."""

    mean_context: float
    mean_prior: float
    std_context: float
    std_prior: float
    auroc: float
    """AUROC of ``uᵀh`` for intent context vs prior (0.5 = no separation; 1 or 0 = perfect, sign aside)."""

    def grid(self, ts: Sequence[float]) -> list[float]:
        """Set-points ``c = mean_prior + t (mean_context − mean_prior)`` for each ``t`` (0 = the prior class
        mean, 1 = the context class mean)."""
        return [self.mean_prior + t * (self.mean_context - self.mean_prior) for t in ts]


def calibrate(model, direction: Direction, items: KnobItems, batch_size: int = 32) -> Calibration:
    """Per-intent mean and spread of ``uᵀh`` on ``items`` (their context and prior prompts)."""
    ctx = projections(model, direction, items.encode(model.tokenizer, "context"), batch_size)
    pri = projections(model, direction, items.encode(model.tokenizer, "prior"), batch_size)
    scores = torch.cat([ctx, pri])
    labels = torch.cat([torch.ones(len(ctx)), torch.zeros(len(pri))])
    return Calibration(
        mean_context=float(ctx.mean()),
        mean_prior=float(pri.mean()),
        std_context=float(ctx.std()) if len(ctx) > 1 else 0.0,
        std_prior=float(pri.std()) if len(pri) > 1 else 0.0,
        auroc=auroc(scores, labels),
    )


def steered_choices(
    model, direction: Direction, items: KnobItems, fmt: str, c: float | None, batch_size: int = 32
) -> Tensor:
    """True where the model picks the context answer on ``fmt`` prompts, steered to ``c`` (None: not)."""
    check_direction(model, direction)
    tokens = items.encode(model.tokenizer, fmt)
    writes = None if c is None else (lambda sl, part: steer_writes(direction, c, part))
    return picks_context(
        candidate_logits(model, tokens, items.candidates, writes=writes, batch_size=batch_size)
    )


def dose_response(
    model,
    direction: Direction,
    items: KnobItems,
    cs: Sequence[float],
    fmts: Sequence[str] = ("none",),
    batch_size: int = 32,
) -> list[dict[str, float | str]]:
    """Rows ``{fmt, c, context_rate}``: the fraction of items answered from the context at each ``c``
    (and unsteered, ``c = nan``), for prompts of each format."""
    rows: list[dict[str, float | str]] = []
    for fmt in fmts:
        base = steered_choices(model, direction, items, fmt, None, batch_size).float().mean()
        rows.append({"fmt": fmt, "c": math.nan, "context_rate": float(base)})
        for c in cs:
            rate = steered_choices(model, direction, items, fmt, c, batch_size).float().mean()
            rows.append({"fmt": fmt, "c": float(c), "context_rate": float(rate)})
    return rows


def steer(model, direction: Direction, prompt: str, c: float, max_new_tokens: int = 16) -> str:
    """Greedy continuation of a free-text ``prompt`` with ``uᵀh`` set to ``c`` at the direction's layer on
    the last token of every forward pass. Returns the generated text only.

    Raises:
        ConfigError: ``c`` is not finite; SiteError / ShapeError: the direction does not fit the model.
    """
    check_direction(model, direction)
    ct = float(check_c(c))
    if not isinstance(prompt, str):
        raise ShapeError(f"prompt must be a string, got {type(prompt).__name__}")
    u = direction.vector

    def fn(h: Tensor) -> Tensor:
        v = u.to(h.device, h.dtype)
        return h + (ct - h @ v)[:, None] * v

    return generate_with_edit(model, prompt, direction.site, fn, max_new_tokens)
