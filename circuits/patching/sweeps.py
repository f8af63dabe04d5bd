"""Named patching sweeps over the engine of :mod:`circuits.patching.engine`: layer × position, layer × head,
layer × position × head, from a clean into a corrupted run of one model.

Example (``model``: a tiny 4-layer Llama; ``dataset``: 12 entity-tracking prompts of 25 tokens, whose
query's box letter is at position 22):
    >>> from tunelens.tasks.entity_tracking import counterfactuals
    >>> clean = dataset.encode(model.tokenizer)
    >>> corrupt = counterfactuals(dataset, "query", seed=0).encode(model.tokenizer)  # another box queried
    >>> cfg = SweepConfig(kind="resid_pre", by="layer_pos")
    >>> result = activation_patching(model, clean, corrupt, cfg)
    >>> result.axes, tuple(result.values["logit_diff"].shape), sorted(result.values)
    (('layer', 'pos'), (4, 25), ['accuracy', 'logit_diff', 'prob'])
    >>> recovered = result.normalised()  # (patched − corrupt) / (clean − corrupt), per (layer, position)
    >>> int(recovered[0].argmax()), round(float(recovered[0, 22]), 3)  # at layer 0 only the letter counts
    (22, 1.0)
    >>> fig = result.figure()  # a layer × position heat-map
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import Tensor

from circuits.patching.engine import (
    PATCH_KINDS,
    Cell,
    PatchKind,
    Position,
    Run,
    layer_head_cells,
    layer_pos_cells,
    run_cells,
    trace,
)
from circuits.patching.metrics import Answers, LastLogits, metric_values
from circuits.patching.result import PatchingResult
from tunelens.errors import ConfigError
from tunelens.models.loaded import LoadedModel
from tunelens.sites import HEAD_KINDS as SITE_HEAD_KINDS
from tunelens.tasks.base import Encoded

HEAD_KINDS = tuple(k for k in SITE_HEAD_KINDS if k in PATCH_KINDS)  # the patchable per-head kinds

SweepBy = Literal["layer_pos", "layer_head", "layer_pos_head"]


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What to sweep: ``kind`` patched per (layer, position), (layer, head) at all positions (or at the
    single position in ``positions``), or per (layer, position, head).

    ``positions``: ints or names of the task's positions (``"last"``, ``"query_label"`` …); ``None`` = every
    position for ``layer_pos``/``layer_pos_head``, all positions at once for ``layer_head``.
    """

    kind: PatchKind
    by: SweepBy
    layers: tuple[int, ...] | None = None
    positions: tuple[int | str, ...] | None = None
    max_rows: int = 512

    def __post_init__(self) -> None:
        if self.kind not in PATCH_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(PATCH_KINDS)}, got {self.kind!r}")
        if self.by not in ("layer_pos", "layer_head", "layer_pos_head"):
            raise ConfigError(f"by must be 'layer_pos', 'layer_head' or 'layer_pos_head', got {self.by!r}")
        if self.by != "layer_pos" and self.kind not in HEAD_KINDS:
            raise ConfigError(
                f"a per-head sweep needs a head kind ({', '.join(HEAD_KINDS)}), got {self.kind!r}"
            )
        if self.by == "layer_head" and self.positions is not None and len(self.positions) != 1:
            raise ConfigError(
                "a layer_head sweep patches at one position (or all): give at most one position"
            )
        if self.max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {self.max_rows}")


def resolve_positions(
    positions: tuple[int | str, ...] | None, data: Encoded
) -> tuple[list[Position], list[str]]:
    """Positions as the engine takes them, and their labels (a named position equal in every prompt
    becomes an int)."""
    n_pos = data.tokens.input_ids.shape[1]
    if positions is None:
        return list(range(n_pos)), [str(p) for p in range(n_pos)]
    out: list[Position] = []
    for p in positions:
        if isinstance(p, str):
            t = data.position(p)
            out.append(int(t[0]) if bool((t == t[0]).all()) else t.clone())
        else:
            out.append(int(p))
    return out, [str(p) for p in positions]


def sweep_cells(config: SweepConfig, n_layers: int, n_heads: int, positions: list[Position]) -> list[Cell]:
    layers = range(n_layers) if config.layers is None else config.layers
    if config.by == "layer_pos":
        return layer_pos_cells(config.kind, layers, positions)
    if config.by == "layer_head":
        pos = None if config.positions is None else positions[0]
        return layer_head_cells(config.kind, layers, range(n_heads), pos)
    return [
        c
        for layer in layers
        for p in positions
        for c in layer_head_cells(config.kind, [layer], range(n_heads), p)
    ]


def summarise(last: LastLogits) -> dict[str, Tensor]:
    """Mean over prompts (the last dimension) of every metric."""
    return {k: v.mean(dim=-1) for k, v in metric_values(last).items()}


def patch_sweep(
    target: Run,
    source: Run,
    answers: Answers,
    config: SweepConfig,
    *,
    data: Encoded,
    direction: str,
    provenance: dict[str, Any] | None = None,
) -> PatchingResult:
    """Run a sweep between two traced runs (the generic form: within a model or across a pair)."""
    dims = target.model.dims
    positions, pos_labels = resolve_positions(config.positions, data)
    n_heads = dims.n_kv_heads if config.kind in ("k", "v") else dims.n_heads
    cells = sweep_cells(config, dims.n_layers, n_heads, positions)
    last = run_cells(target, source, cells, answers, max_rows=config.max_rows)
    layers = list(range(dims.n_layers)) if config.layers is None else list(config.layers)
    labels: dict[str, list[str]] = {"layer": [str(x) for x in layers]}
    head_axis = "kv_head" if config.kind in ("k", "v") else "head"
    if config.by == "layer_pos":
        axes, shape = ("layer", "pos"), (len(layers), len(positions))
        labels["pos"] = pos_labels
    elif config.by == "layer_head":
        axes, shape = ("layer", head_axis), (len(layers), n_heads)
        labels[head_axis] = [str(h) for h in range(n_heads)]
    else:
        axes, shape = ("layer", "pos", head_axis), (len(layers), len(positions), n_heads)
        labels["pos"], labels[head_axis] = pos_labels, [str(h) for h in range(n_heads)]
    values = {k: v.reshape(shape) for k, v in summarise(last).items()}
    src = {k: float(v) for k, v in summarise(source.last(answers)).items()}
    tgt = {k: float(v) for k, v in summarise(target.last(answers)).items()}
    return PatchingResult(
        kind=config.kind,
        direction=direction,
        axes=axes,
        labels=labels,
        values=values,
        source=src,
        target=tgt,
        n_prompts=len(answers),
        provenance=provenance or {},
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    )


def activation_patching(
    model: LoadedModel,
    clean: Encoded,
    corrupt: Encoded,
    config: SweepConfig,
    *,
    provenance: dict[str, Any] | None = None,
) -> PatchingResult:
    """Patch ``clean`` activations into the ``corrupt`` run of ``model``; metrics on the clean answer
    (logit difference against the corrupt answer, probability, accuracy among the candidates)."""
    answers = Answers.from_encoded(clean, foil=corrupt)
    cells_kinds = {config.kind}
    source = trace(model, clean.tokens, record=cells_kinds)
    target = trace(model, corrupt.tokens)
    return patch_sweep(
        target, source, answers, config, data=clean, direction="clean -> corrupt", provenance=provenance
    )
