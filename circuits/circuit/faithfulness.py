"""Circuit faithfulness by mean ablation (algorithms.md §1.4): everything outside the circuit is replaced by
its mean, and the accuracy that is left is compared with the full model's, chance-corrected.

A circuit is a set of head groups; each head is ``(layer, head, position)`` with ``position`` a name of the
task's positions (``"last"``, ``"query_label"`` …), an index, or ``"all"``. In the evaluated run every head
at every position has its output ``z`` (the input of ``o_proj``) replaced by its mean over a reference
set of prompts (at the task's named positions, e.g. ``last``, the mean over the reference prompts' same
named position; elsewhere per position index, and positions the reference does not cover get the mean
over all positions),
except the circuit's heads at their own positions. Then::

    faithfulness = (acc_circuit − chance) / (acc_full − chance)

with ``chance`` the mean of 1/(number of candidate answers). A control draws ``n_random`` random circuits
with the same number of heads per group at the same positions. When the full model is itself near chance
the ratio is ill-defined; :class:`CircuitResult` keeps the raw accuracies next to it.

Example (``model``: an untrained tiny Llama of 4 layers × 4 heads; ``dataset``: 12 entity-tracking
prompts of 3 boxes):
    >>> from tunelens.tasks.entity_tracking import EntityTrackingConfig, generate
    >>> data = dataset.encode(model.tokenizer)
    >>> ref = generate(EntityTrackingConfig(n_boxes=3, n_contexts=4), seed=1).encode(model.tokenizer)
    >>> res = faithfulness(model, data, {"top": [(3, 0, "last"), (3, 1, "last")]}, reference=ref, n_random=3)
    >>> res.n_prompts, round(res.chance, 3), len(res.acc_random)
    (12, 0.333, 3)
    >>> res.defined, res.summary()["note"]  # this model is at chance: there is nothing to be faithful to
    (False, 'undefined: the full model is not above chance')
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.circuit.result import CircuitResult
from circuits.patching.metrics import Answers, LastLogits, accuracy, logit_diff
from tunelens.backends.stepwise import Stepper
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.models.loaded import LoadedModel
from tunelens.results import model_provenance
from tunelens.tasks.base import Encoded

HeadAt = tuple[int, int, str | int]
Scope = Literal["all", "positions"]


@dataclass(frozen=True, kw_only=True)
class MeanZ:
    """Mean ``z`` per layer, position and head over a reference set, and the all-position fallback."""

    per_pos: Float[Tensor, "layer pos head d_head"]
    overall: Float[Tensor, "layer head d_head"]
    named: dict[str, Tensor] = field(default_factory=dict)  # name -> layer head d_head, at that position

    def for_batch(self, layer: int, data: Encoded) -> Float[Tensor, "batch pos head d_head"]:
        """Means for every prompt and position: at a named position of the task (``last`` …) the mean over
        the reference prompts' same named position, elsewhere the per-index mean."""
        batch, n_pos = data.tokens.input_ids.shape
        out = self.at(layer, n_pos)[None].repeat(batch, 1, 1, 1)
        rows = torch.arange(batch)
        for name, mean in self.named.items():
            pos = data.positions.get(name)
            if pos is not None and (pos >= 0).all():
                out[rows, pos] = mean[layer]
        return out

    def at(self, layer: int, n_pos: int) -> Tensor:
        """``pos head d_head`` for the first ``n_pos`` positions (the fallback beyond the reference)."""
        have = min(n_pos, self.per_pos.shape[1])
        out = self.overall[layer][None].repeat(n_pos, 1, 1)
        out[:have] = self.per_pos[layer, :have]
        return out


@torch.no_grad()
def mean_z(model: LoadedModel, reference: Encoded) -> MeanZ:
    """Mean per-head output over the real (non-padding) tokens of ``reference``, per position and overall."""
    tokens = reference.tokens.to(model.device)
    with model.active():
        tr = Stepper(model.module).trace(tokens.input_ids, tokens.last, record=["z"])
    mask = tokens.attention_mask.float()  # batch pos
    per_pos, overall = [], []
    for layer in range(model.dims.n_layers):
        z = tr.acts[(layer, "z")].float()  # batch pos head d
        w = mask[:, :, None, None]
        count = w.sum(dim=0)  # pos 1 1
        per_pos.append((z * w).sum(dim=0) / count.clamp(min=1))
        overall.append((z * w).sum(dim=(0, 1)) / w.sum())
    named = {}
    rows = torch.arange(len(tokens))
    for name, pos in reference.positions.items():
        if (pos >= 0).all():
            named[name] = torch.stack(
                [
                    tr.acts[(layer, "z")][rows, pos.to(rows.device)].float().mean(dim=0)
                    for layer in range(len(per_pos))
                ]
            )
    return MeanZ(per_pos=torch.stack(per_pos), overall=torch.stack(overall), named=named)


def check_scope(scope: str) -> None:
    """Where everything outside a circuit is ablated: ``"all"`` (the paper's) or ``"positions"``."""
    if scope not in ("all", "positions"):
        raise ConfigError(f"scope must be 'all' or 'positions', got {scope!r}")


def keep_masks(
    heads: Sequence[HeadAt],
    data: Encoded,
    n_layers: int,
    n_heads: int,
    scope: str = "all",
    positions_of: Sequence[HeadAt] | None = None,
) -> dict[int, Float[Tensor, "batch pos head"]]:
    """Per layer, 1 where the circuit keeps a head's own activation (batch × pos × head).

    ``scope="positions"`` ablates only at the positions of ``positions_of`` (default: ``heads``); pruning
    passes the whole candidate circuit there, so removing a head never changes where the ablation is."""
    batch, n_pos = data.tokens.input_ids.shape
    keep = {layer: torch.zeros(batch, n_pos, n_heads, dtype=torch.bool) for layer in range(n_layers)}
    rows = torch.arange(batch)
    if scope == "positions":  # only the circuit's positions are ablated (every other position kept)
        at = torch.ones(batch, n_pos, dtype=torch.bool)
        for pos in {p for _, _, p in (heads if positions_of is None else positions_of)}:
            if pos == "all":
                at[:] = False
            elif isinstance(pos, str) and pos in data.positions:
                at[rows, data.positions[pos].clamp(min=0)] = False
            elif not isinstance(pos, str) and 0 <= int(pos) < n_pos:
                at[:, int(pos)] = False
        for layer in keep:
            keep[layer] |= at[:, :, None]
    for layer, head, pos in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise SiteError(
                f"head ({layer}, {head}) does not exist; layers 0..{n_layers - 1}, heads 0..{n_heads - 1}"
            )
        if pos == "all":
            keep[layer][:, :, head] = True
        elif isinstance(pos, str):
            keep[layer][rows, data.position(pos), head] = True
        else:
            if not 0 <= int(pos) < n_pos:
                raise ShapeError(f"position {pos} is outside the prompts (0..{n_pos - 1})")
            keep[layer][:, int(pos), head] = True
    return keep


@torch.no_grad()
def ablated_last(
    model: LoadedModel,
    data: Encoded,
    heads: Sequence[HeadAt] | None,
    means: MeanZ,
    answers: Answers,
    scope: str = "all",
) -> LastLogits:
    """The run with every head outside ``heads`` mean-ablated (``None``: the full model, nothing ablated);
    ``scope="positions"``: only at the circuit's positions."""
    tokens = data.tokens.to(model.device)
    dims = model.dims
    hook = None
    if heads is not None:
        keep = keep_masks(heads, data, dims.n_layers, dims.n_heads, scope)
        batch_means = [means.for_batch(layer, data) for layer in range(dims.n_layers)]

        def hook(layer: int, kind: str, t: Tensor) -> Tensor | None:
            if kind != "z":
                return None
            mean = batch_means[layer].to(t.device, t.dtype)
            return torch.where(keep[layer].to(t.device)[..., None], t, mean)

    with model.active():
        tr = Stepper(model.module).trace(tokens.input_ids, tokens.last, hook=hook)
    return LastLogits.from_logits(tr.logits, answers)


def chance_level(answers: Answers) -> float:
    """Mean over prompts of 1 / (number of candidate answers)."""
    if answers.candidates is None:
        raise ConfigError("chance-corrected faithfulness needs a task with candidate answers")
    n = (answers.candidates >= 0).sum(dim=1).clamp(min=1).float()
    return float((1.0 / n).mean())


def random_circuit(
    groups: Mapping[str, Sequence[HeadAt]], n_layers: int, n_heads: int, rng: random.Random
) -> dict[str, list[HeadAt]]:
    """As many random heads per group as the circuit has, at the same positions, avoiding its heads."""
    taken = {(lay, h) for g in groups.values() for lay, h, _ in g}
    pool = [(lay, h) for lay in range(n_layers) for h in range(n_heads) if (lay, h) not in taken]
    size = sum(len(g) for g in groups.values())
    if len(pool) < size:
        raise ConfigError(f"no random control for a circuit of {size} heads: only {len(pool)} other heads")
    picks = iter(rng.sample(pool, size))
    return {name: [(*next(picks), p) for _, _, p in g] for name, g in groups.items()}


def faithfulness(
    model: LoadedModel,
    data: Encoded,
    groups: Mapping[str, Sequence[HeadAt]],
    *,
    reference: Encoded,
    n_random: int = 10,
    seed: int = 0,
    n_candidates_checked: int | None = None,
    scope: Scope = "all",
    provenance: dict[str, Any] | None = None,
) -> CircuitResult:
    """Accuracy of ``model`` on ``data`` with everything outside ``groups`` mean-ablated (means over
    ``reference``), chance-corrected, with ``n_random`` random circuits of the same shape.

    ``scope="all"`` (the paper's): every head at every position outside the circuit is ablated;
    ``"positions"``: only the heads outside the circuit at the circuit's own positions (a weaker test)."""
    check_scope(scope)
    if not groups or not any(groups.values()):
        raise ConfigError("a circuit needs at least one head")
    answers = Answers.from_encoded(data)
    means = mean_z(model, reference)
    heads = [h for g in groups.values() for h in g]
    full = ablated_last(model, data, None, means, answers)
    circ = ablated_last(model, data, heads, means, answers, scope)
    rng = random.Random(seed)
    dims = model.dims
    rand = []
    for _ in range(n_random):
        rg = random_circuit(groups, dims.n_layers, dims.n_heads, rng)
        rand.append(
            float(
                accuracy(
                    ablated_last(model, data, [h for g in rg.values() for h in g], means, answers, scope)
                ).mean()
            )
        )
    has_ld = full.has_foil or full.n_candidates > 1
    return CircuitResult(
        groups={g: [list(h) for h in hs] for g, hs in groups.items()},
        model=model.name,
        n_prompts=len(answers),
        acc_full=float(accuracy(full).mean()),
        acc_circuit=float(accuracy(circ).mean()),
        acc_random=rand,
        chance=chance_level(answers),
        logit_diff_full=float(logit_diff(full).mean()) if has_ld else float("nan"),
        logit_diff_circuit=float(logit_diff(circ).mean()) if has_ld else float("nan"),
        n_candidates_checked=n_candidates_checked,
        scope=scope,
        provenance=model_provenance(model, provenance),
    )
