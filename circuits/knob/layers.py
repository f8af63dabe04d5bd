"""Where the intent enters the last token: patching last-token attention outputs between the two intents.

Spec §2.2 (Minder et al. 2024, ``das.py::auto_search``). For an item, the *source* prompt has one intent
and the *target* prompt the same context and query with the other intent; the last-token output of
attention (``attn_out``) at a set of layers is copied from the source run into the target run. Two
settings: ``CP`` (context-intent source into a prior-intent target: a switch means the target now answers
from the context) and ``PC`` (the reverse). A run *switches* an item when, at the read-out, the answer
the source intent requires beats the one the target intent requires (restricted to the two candidates).

- :func:`prefix_sweep`: patch layers ``0..L`` for each ``L`` of a grid and read the final answer. Since
  the MLP works position by position and the last token is the same in both prompts, this is the same as
  transplanting the whole last-token residual after block ``L``: the curve says from which layer on the
  last token's residual *carries* the intent.
- :func:`choose_layer`: the rule — the earliest ``L`` of the grid whose switch rate (mean of CP and PC)
  reaches ``threshold``; the knob lives in ``resid_post`` of that layer.
- :func:`lower_bound`: the paper's second binary search, the largest ``l`` such that patching ``l..L``
  still switches at ``threshold``: the layers whose attention writes the intent into the last token.
- :func:`lens_curve`: for one patched range, the logit-lens answer at every layer's residual.

All runs go through ``Backend.run`` with ``replace`` writes on ``attn_out`` at each prompt's last token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.knob.data import CONTEXT, PRIOR, KnobItems
from circuits.knob.runs import check_layer, last_resid, lens
from tunelens.backends.base import TokenBatch, replace
from tunelens.errors import ConfigError
from tunelens.sites import Site

log = logging.getLogger(__name__)

SETTINGS = ("CP", "PC")
"""CP: context-intent source → prior-intent target; PC: prior-intent source → context-intent target."""


@dataclass(frozen=True)
class _Prepared:
    """Per setting: target tokens, source attention outputs (all layers), the two required answers."""

    target: TokenBatch
    src_attn: Float[Tensor, "batch layer d_model"]
    src_answer: Tensor
    tgt_answer: Tensor


class Patcher:
    """Source runs cached once per model and item set; then any layer range is one target run."""

    def __init__(self, model, items: KnobItems, batch_size: int = 32) -> None:
        if len(items) == 0:
            raise ConfigError("layer localisation needs at least one item with both intents, got none")
        self.model, self.items, self.batch_size = model, items, batch_size
        tok = model.tokenizer
        ctx, pri = items.encode(tok, "context"), items.encode(tok, "prior")
        layers = list(range(model.dims.n_layers))
        attn = {fmt: self._attn(t, layers) for fmt, t in (("context", ctx), ("prior", pri))}
        cand = items.candidates
        self.prepared = {
            "CP": _Prepared(pri, attn["context"], cand[:, CONTEXT], cand[:, PRIOR]),
            "PC": _Prepared(ctx, attn["prior"], cand[:, PRIOR], cand[:, CONTEXT]),
        }

    def _attn(self, tokens: TokenBatch, layers: list[int]) -> Tensor:
        sites = [Site("attn_out", layer) for layer in layers]
        backend = self.model.backend()
        out = []
        for start in range(0, len(tokens), self.batch_size):
            part = tokens.select(slice(start, start + self.batch_size))
            run = backend.run(part, reads=sites, logits=False)
            rows = torch.arange(len(part))
            out.append(torch.stack([run.acts[s][rows, part.last] for s in sites], dim=1).float())
        return torch.cat(out)

    def run(
        self, setting: str, layers: Sequence[int], read_layers: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Patch ``layers`` (last token) in ``setting``; read the answer at ``read_layers`` (default: last).

        Returns ``switch`` (batch, read) bool and ``p_src`` (batch, read): the full-vocabulary probability
        of the source-required answer under the logit lens.
        """
        if setting not in SETTINGS:
            raise ConfigError(f"setting must be one of {SETTINGS}, got {setting!r}")
        for layer in layers:
            check_layer(self.model, layer)
        prep = self.prepared[setting]
        read = list(read_layers) if read_layers is not None else [self.model.dims.n_layers - 1]
        layers = list(layers)

        def writes(sl: slice, part: TokenBatch):
            return [
                replace(Site("attn_out", layer), prep.src_attn[sl, layer], positions=part.last)
                for layer in layers
            ]

        resid = last_resid(
            self.model, prep.target, read, writes=writes if layers else None, batch_size=self.batch_size
        )
        logits = lens(self.model, resid).float().cpu()  # batch read vocab
        src = prep.src_answer[:, None, None].expand(-1, len(read), 1)
        tgt = prep.tgt_answer[:, None, None].expand(-1, len(read), 1)
        l_src, l_tgt = logits.gather(2, src)[..., 0], logits.gather(2, tgt)[..., 0]
        return {"switch": l_src > l_tgt, "p_src": logits.softmax(-1).gather(2, src)[..., 0]}

    def switch_rate(self, layers: Sequence[int]) -> dict[str, float]:
        """Final-answer switch rate per setting and their mean, for one patched layer set."""
        rates = {s: float(self.run(s, layers)["switch"][:, -1].float().mean()) for s in SETTINGS}
        return {**rates, "mean": (rates["CP"] + rates["PC"]) / 2}


def prefix_sweep(patcher: Patcher, grid: Sequence[int]) -> list[dict[str, float]]:
    """Rows ``{upper, CP, PC, mean}``: switch rates after patching layers ``0..upper`` (``upper = -1``:
    nothing patched, the baseline)."""
    rows = [{"upper": -1.0, **patcher.switch_rate([])}]
    for upper in grid:
        rows.append({"upper": float(upper), **patcher.switch_rate(list(range(upper + 1)))})
    return rows


def choose_layer(rows: Sequence[dict[str, float]], threshold: float) -> tuple[int, bool]:
    """The earliest ``upper`` whose mean switch rate reaches ``threshold``; ``(layer, True)``.

    When no layer reaches it, the layer with the highest rate and ``False`` (say so: no clear knob).
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must lie in (0, 1], got {threshold}")
    swept = [r for r in rows if r["upper"] >= 0]
    if not swept:
        raise ConfigError("the sweep has no patched layer; give a non-empty grid")
    for r in swept:
        if r["mean"] >= threshold:
            return int(r["upper"]), True
    best = max(swept, key=lambda r: r["mean"])
    return int(best["upper"]), False


def sweep_layers(
    patchers: Mapping[str, Patcher],
    choose_on: str,
    n_layers: int,
    step: int,
    threshold: float,
    *,
    refine: bool = True,
) -> tuple[list[dict[str, Any]], int, bool]:
    """:func:`prefix_sweep` of every patcher (rows gain ``model``) on a grid of ``step`` layers (and the last
    layer), the layer :func:`choose_layer` picks on ``choose_on``'s rows, and whether the rule was met.

    With ``refine`` and a grid step above one, the layers between the last grid layer below the choice and
    the choice are swept too, so the layer is exact: on a grid of 5, "layer 20" would otherwise mean
    "somewhere in 16-20".
    """
    grid = sorted(set(range(0, n_layers, step)) | {n_layers - 1})
    rows = [{"model": role, **r} for role, p in patchers.items() for r in prefix_sweep(p, grid)]

    def choose() -> tuple[int, bool]:
        return choose_layer([r for r in rows if r["model"] == choose_on], threshold)

    layer, met = choose()
    below = max((g for g in grid if g < layer), default=-1)
    if refine and met and layer - below > 1:
        log.info("knob: refining the layer sweep between layers %d and %d", below, layer)
        for role, p in patchers.items():
            rows += [{"model": role, **r} for r in prefix_sweep(p, range(below + 1, layer))[1:]]
        order = list(patchers)
        rows.sort(key=lambda r: (order.index(r["model"]), r["upper"]))
        layer, met = choose()
    return rows, layer, met


def lower_bound(patcher: Patcher, upper: int, threshold: float) -> tuple[int, list[dict[str, float]]]:
    """Binary search for the largest ``l`` such that patching ``l..upper`` keeps the mean switch rate
    ≥ ``threshold`` (the spec's step 2). Returns ``l`` and the runs made (``{lower, CP, PC, mean}``)."""
    lo, hi = 0, upper  # invariant: lo passes (assumed, as patching 0..upper does), answer in [lo, hi]
    runs = []
    while lo < hi:
        mid = (lo + hi + 1) // 2
        rate = patcher.switch_rate(list(range(mid, upper + 1)))
        runs.append({"lower": float(mid), **rate})
        if rate["mean"] >= threshold:
            lo = mid
        else:
            hi = mid - 1
    return lo, runs


def lens_curve(patcher: Patcher, layers: Sequence[int]) -> list[dict[str, float]]:
    """Rows ``{read, setting, switch, p_src}``: the logit-lens answer at every layer's residual after
    patching ``layers``."""
    read = list(range(patcher.model.dims.n_layers))
    rows = []
    for setting in SETTINGS:
        out = patcher.run(setting, layers, read)
        for j, layer in enumerate(read):
            rows.append(
                {
                    "read": float(layer),
                    "setting": setting,
                    "switch": float(out["switch"][:, j].float().mean()),
                    "p_src": float(out["p_src"][:, j].mean()),
                }
            )
    return rows
