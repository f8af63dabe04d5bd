"""Activation patching: one engine over sites × layers × positions × heads, within a model or across a pair.

A *cell* is a set of :class:`Patch` es applied together to the *target* run (the corrupted prompt, or the
base model), each copying the *source* run's activation (the clean prompt, or the tuned model) at one
site, position and head. :func:`run_cells` evaluates many cells and returns, per cell and prompt, what the
metrics read from the last-position logits.

It does less work than one full forward per cell (what ``transformer_lens.patching`` does):

* a cell whose first patch is at layer ``L`` and position ``p`` starts at layer ``L`` from the target's
  cached residual, on positions ``p..`` only, with the cached keys and values of positions ``< p``
  (they cannot change: attention is causal and nothing before ``L`` changed);
* cells that start at the same position are batched, and a cell joins the batch at its own first layer;
* only the last position of each prompt is unembedded, and only the metric's token ids are kept.

Both runs must have the same token lengths (positions must align); prompts are right-padded.

Example (``model``: a tiny 4-layer Llama; ``dataset``: 12 entity-tracking prompts of 25 tokens):
    >>> from circuits.patching.metrics import Answers, logit_diff
    >>> from tunelens.tasks.entity_tracking import counterfactuals
    >>> clean = dataset.encode(model.tokenizer)
    >>> corrupt = counterfactuals(dataset, "query", seed=0).encode(model.tokenizer)  # another box queried
    >>> answers = Answers.from_encoded(clean, foil=corrupt)
    >>> source, target = trace(model, clean.tokens), trace(model, corrupt.tokens)
    >>> cells = layer_pos_cells("resid_pre", layers=range(4), positions=range(25))
    >>> last = run_cells(target, source, cells, answers)  # LastLogits, leading dims (cell, prompt)
    >>> tuple(logit_diff(last).shape)
    (100, 12)
    >>> everything = run_cells(target, source, [(Patch(Site("resid_pre", 0)),)], answers)  # every position
    >>> torch.allclose(logit_diff(everything)[0], logit_diff(source.last(answers)), atol=1e-4)
    True
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from circuits.patching.metrics import Answers, LastLogits
from tunelens.backends.base import TokenBatch
from tunelens.backends.stepwise import Stepper, Trace
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.models.loaded import LoadedModel
from tunelens.sites import Site

PatchKind = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v"]
PATCH_KINDS: tuple[str, ...] = get_args(PatchKind)  # the Site kinds the engine patches (not pattern, logits)
Position = int | Tensor | None


@dataclass(frozen=True, eq=False)
class Patch:
    """Copy the source activation at ``site`` (a :class:`~tunelens.sites.Site`, the backends' own
    vocabulary: one head, or all) at ``position``: an int, one position per prompt as a ``(batch,)``
    tensor, or ``None`` for every position."""

    site: Site
    position: Position = None

    def __post_init__(self) -> None:
        if not isinstance(self.site, Site):
            raise SiteError(f"a Patch takes a Site, e.g. Patch(Site('z', 3, 2), position), got {self.site!r}")
        if self.site.kind not in PATCH_KINDS:
            raise SiteError(f"cannot patch {self.site.kind!r}; expected one of {', '.join(PATCH_KINDS)}")

    @property
    def kind(self) -> str:
        return self.site.kind

    @property
    def layer(self) -> int:
        return self.site.layer  # type: ignore[return-value]

    @property
    def head(self) -> int | None:
        return self.site.head

    def __repr__(self) -> str:
        pos = (
            "all"
            if self.position is None
            else (self.position if isinstance(self.position, int) else "per-prompt")
        )
        return f"Patch({self.site}@{pos})"


Cell = tuple[Patch, ...]


@dataclass(frozen=True, kw_only=True)
class Run:
    """One model's traced run on one batch: what patched runs start from or copy from."""

    model: LoadedModel
    tokens: TokenBatch
    trace: Trace
    stepper: Stepper

    def value(self, kind: str, layer: int) -> Tensor:
        """The activation of ``kind`` at ``layer`` over all positions (canonical shape)."""
        if kind == "resid_pre":
            return self.trace.resid[layer]
        if kind == "resid_post":
            return self.trace.resid[layer + 1]
        key = (layer, kind)
        if key not in self.trace.acts:
            raise ShapeError(
                f"the run did not record {kind} at layer {layer}; trace it with record=[{kind!r}]"
            )
        return self.trace.acts[key]

    def last(self, answers: Answers) -> LastLogits:
        return LastLogits.from_logits(self.trace.logits, answers)


def trace(model: LoadedModel, tokens: TokenBatch, *, record: Iterable[str] = (), grad: bool = False) -> Run:
    """Run ``model`` on ``tokens`` once, keeping every layer's input, keys and values (and ``record``)."""
    stepper = Stepper(model.module)
    tokens = tokens.to(model.device)
    record = tuple(sorted({k for k in record if k not in ("resid_pre", "resid_post")}))
    with model.active(), torch.set_grad_enabled(grad):
        tr = stepper.trace(tokens.input_ids, tokens.last, record=record)
    return Run(model=model, tokens=tokens, trace=tr, stepper=stepper)


def source_kinds(cells: Iterable[Cell]) -> set[str]:
    """The kinds a source run must record for these cells."""
    return {p.kind for cell in cells for p in cell}


# --- cell builders -------------------------------------------------------------------------------------


def layer_pos_cells(kind: PatchKind, layers: Iterable[int], positions: Iterable[Position]) -> list[Cell]:
    """One cell per (layer, position), layer-major (a whole-site patch, e.g. the residual stream)."""
    positions = list(positions)
    return [(Patch(Site(kind, layer), pos),) for layer in layers for pos in positions]


def layer_head_cells(
    kind: PatchKind, layers: Iterable[int], heads: Iterable[int], position: Position = None
) -> list[Cell]:
    """One cell per (layer, head) at one position (``None``: every position), layer-major."""
    heads = list(heads)
    return [(Patch(Site(kind, layer, h), position),) for layer in layers for h in heads]


def group_cell(kind: PatchKind, heads: Iterable[tuple[int, int]], position: Position) -> Cell:
    """One cell patching several (layer, head) pairs at once (a head group of a circuit)."""
    return tuple(Patch(Site(kind, layer, h), position) for layer, h in heads)


# --- the engine ----------------------------------------------------------------------------------------


def check_aligned(target: TokenBatch, source: TokenBatch) -> None:
    """Positions must align: same batch size and the same token length for every prompt."""
    if target.input_ids.shape != source.input_ids.shape or not torch.equal(
        target.lengths.cpu(), source.lengths.cpu()
    ):
        raise ShapeError(
            "source and target prompts must have the same token lengths so positions align; got "
            f"lengths {source.lengths.tolist()} (source) vs {target.lengths.tolist()} (target). "
            "Build counterfactuals of equal length (e.g. entity_tracking.counterfactuals)."
        )


def _check_cells(cells: Sequence[Cell], run: Run) -> None:
    dims = run.model.dims
    n_pos = run.tokens.input_ids.shape[1]
    lengths = run.tokens.lengths
    if not cells:
        raise ConfigError("no cells to patch")
    for cell in cells:
        if not cell:
            raise ConfigError("a cell must hold at least one patch")
        for p in cell:
            if not 0 <= p.layer < dims.n_layers:
                raise SiteError(
                    f"{p}: layer {p.layer} out of range; this model has layers 0..{dims.n_layers - 1}"
                )
            if p.head is not None:
                n = dims.n_kv_heads if p.kind in ("k", "v") else dims.n_heads
                if not 0 <= p.head < n:
                    what = "kv_head" if p.kind in ("k", "v") else "head"
                    raise SiteError(f"{p}: {what} {p.head} out of range; this model has {what}s 0..{n - 1}")
            if isinstance(p.position, int):
                if not 0 <= p.position < n_pos:
                    raise ShapeError(f"{p}: position {p.position} is outside the prompt (0..{n_pos - 1})")
            elif p.position is not None:
                pos = p.position
                if pos.shape != (len(run.tokens),):
                    raise ShapeError(f"{p}: per-prompt positions must have shape ({len(run.tokens)},)")
                if (pos < 0).any() or (pos.cpu() >= lengths.cpu()).any():
                    raise ShapeError(
                        f"{p}: a per-prompt position lies outside its prompt (positions {pos.tolist()}, "
                        f"lengths {lengths.tolist()})"
                    )


def _start(cell: Cell, run: Run) -> tuple[int, int]:
    """(first layer, first position) a cell changes, the position capped at the earliest last token."""
    last = int(run.tokens.last.min())
    positions = []
    for p in cell:
        if p.position is None:
            positions.append(0)
        elif isinstance(p.position, int):
            positions.append(p.position)
        else:
            positions.append(int(p.position.min()))
    return min(p.layer for p in cell), min(min(positions), last)


def run_cells(
    target: Run,
    source: Run,
    cells: Sequence[Cell],
    answers: Answers,
    *,
    max_rows: int = 512,
) -> LastLogits:
    """Patch each cell's source activations into the target run; metrics' inputs, shape (cell, prompt).

    ``max_rows`` bounds the rows (cells × prompts) run at once, which bounds memory.
    """
    check_aligned(target.tokens, source.tokens)
    _check_cells(cells, target)
    if len(answers) != len(target.tokens):
        raise ShapeError(f"{len(answers)} answers for {len(target.tokens)} prompts")
    n = len(target.tokens)
    groups: dict[int, list[int]] = defaultdict(list)
    starts = [_start(c, target) for c in cells]
    for i, (_, p0) in enumerate(starts):
        groups[p0].append(i)
    per_chunk = max(1, max_rows // n)
    out: list[LastLogits | None] = [None] * len(cells)
    with target.model.active(), torch.no_grad():
        for p0, idx in groups.items():
            idx = sorted(idx, key=lambda i: starts[i][0])
            for c0 in range(0, len(idx), per_chunk):
                chunk = idx[c0 : c0 + per_chunk]
                last = _run_chunk(
                    target, source, [cells[i] for i in chunk], [starts[i][0] for i in chunk], p0, answers
                )
                for j, i in enumerate(chunk):
                    out[i] = last.index(slice(j, j + 1))
    return LastLogits.stack(out)  # type: ignore[arg-type]


def _run_chunk(
    target: Run, source: Run, cells: list[Cell], layers: list[int], p0: int, answers: Answers
) -> LastLogits:
    stepper, tr = target.stepper, target.trace
    n = len(target.tokens)
    plan: dict[tuple[int, str], list[tuple[int, Patch]]] = defaultdict(list)
    for b, cell in enumerate(cells):
        for p in cell:
            plan[(p.layer, p.kind)].append((b * n, p))
    rows_n = torch.arange(n, device=tr.resid[0].device)

    def hook(layer: int, kind: str, t: Tensor) -> Tensor | None:
        todo = plan.get((layer, kind))
        if not todo:
            return None
        t = t.clone()
        for r0, p in todo:
            src = source.value(kind, layer).to(t.dtype)
            if p.head is not None:
                src, view = src[:, :, p.head], t[:, :, p.head]
            else:
                view = t
            if p.position is None:
                view[r0 : r0 + n] = src[:, p0:]
            elif isinstance(p.position, int):
                view[r0 : r0 + n, p.position - p0] = src[:, p.position]
            else:
                pos = p.position.to(t.device)
                view[r0 + rows_n, pos - p0] = src[rows_n, pos]
        return t

    h: Tensor | None = None
    n_blocks = 0
    for layer in range(min(layers), stepper.n_layers):
        entering = sum(1 for lay in layers if lay == layer)
        if entering:
            new = tr.resid[layer][:, p0:].repeat(entering, 1, 1)
            h = new if h is None else torch.cat([h, new], dim=0)
            n_blocks += entering
        k, v = tr.past(layer, p0)
        past = (k.repeat(n_blocks, 1, 1, 1), v.repeat(n_blocks, 1, 1, 1))
        h = stepper.layer(layer, h, start=p0, past=past, hook=hook)
    last = (target.tokens.last - p0).repeat(n_blocks)
    rows = torch.arange(h.shape[0], device=h.device)
    logits = stepper.unembed(h[rows, last.to(h.device)]).view(n_blocks, n, -1)
    return LastLogits.from_logits(logits, answers)
