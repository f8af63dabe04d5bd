"""The entity-tracking circuit on a real pair and its faithfulness in each model (demo size).

Head groups at the last and the query-label positions come from CMAP (tuned -> base): the saved exact
layer × head sweeps of :mod:`circuits.study` when they are already under ``out/circuits``, otherwise
candidates preselected by attribution (base gradient × (tuned − base z), every head at once) and only
those patched exactly. Each model then runs with everything outside the circuit mean-ablated
(:mod:`circuits.faithfulness`), against random circuits of the same shape: with the paper's scope (every
head at every position outside the circuit ablated) and with the weaker one (only at the circuit's two
positions).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from circuits.attribution import at_position, attribute
from circuits.cmap import trace_pair
from circuits.faithfulness import faithfulness
from circuits.metrics import Answers, logit_diff
from circuits.patching import Patch, run_cells, trace
from circuits.patching_result import PatchingResult
from circuits.path_patching import path_patching
from tunelens.results import pair_provenance
from tunelens.tasks import entity_tracking as et

log = logging.getLogger(__name__)
POSITIONS = ("last", "query_label")


def cmap_heads(
    pair: Any, data, *, top_k: int = 6, n_candidates: int | None = None, saved: Path | None = None
) -> tuple[dict[str, list[tuple[int, int, str]]], int]:
    """Per position, the ``top_k`` heads whose tuned ``z`` raises the base's logit difference most;
    and how many heads were patched exactly to find them (``n_candidates`` per position, preselected by
    attribution; default ``max(20, 2·top_k)``), unless the exact sweeps are saved under ``saved``."""
    groups: dict[str, list[tuple[int, int, str]]] = {}
    dims = pair.dims
    if saved is not None and all((saved / f"cmap_sweep_{p}").exists() for p in POSITIONS):
        for p in POSITIONS:
            sweep = PatchingResult.load(saved / f"cmap_sweep_{p}")
            grid = sweep.values["logit_diff"] - sweep.target["logit_diff"]
            top = torch.topk(grid.reshape(-1), top_k).indices.tolist()
            groups[p] = [(i // dims.n_heads, i % dims.n_heads, p) for i in top]
        return groups, len(POSITIONS) * dims.n_layers * dims.n_heads
    runs = trace_pair(pair, data)
    per_prompt = attribute(runs.base, runs.tuned, runs.answers, "z")  # layer batch pos head
    base_ld = logit_diff(runs.base.last(runs.answers)).mean()
    checked = 0
    for p in POSITIONS:
        est = at_position(per_prompt, data.positions[p])  # layer head
        cand = torch.topk(est.reshape(-1), n_candidates or max(20, 2 * top_k)).indices.tolist()
        heads = [(i // dims.n_heads, i % dims.n_heads) for i in cand]
        pos = data.positions[p]
        cells = [(Patch("z", lay, pos.clone(), h),) for lay, h in heads]
        exact = logit_diff(run_cells(runs.base, runs.tuned, cells, runs.answers)).mean(-1) - base_ld
        checked += len(cells)
        order = exact.argsort(descending=True)[:top_k].tolist()
        groups[p] = [(heads[i][0], heads[i][1], p) for i in order]
    return groups, checked


def path_study(
    model: Any, clean, corrupt, *, n_candidates: int = 20, top_vf: int = 6, top_pt: int = 4
) -> tuple[dict[str, list[tuple[int, int, str]]], dict[str, Any], int]:
    """The paper's first two path-patching steps in one model (clean -> corrupt, positions ``last``):
    value fetchers = heads with the largest direct effect on the logits; position transmitters = heads
    whose output reaches the value fetchers' queries. Candidates of each step are preselected by attribution
    (``n_candidates`` of all heads); returns the groups, the two results and the number of heads checked."""
    answers = Answers.from_encoded(clean, foil=corrupt)
    source = trace(model, clean.tokens, record=["z"])
    target = trace(model, corrupt.tokens, record=["z"])
    last = clean.positions["last"]
    est = at_position(attribute(target, source, answers, "z"), last)  # layer head
    n_heads = model.dims.n_heads
    ranked = [(i // n_heads, i % n_heads) for i in est.abs().reshape(-1).argsort(descending=True).tolist()]
    vf_cand = ranked[:n_candidates]
    vf = path_patching(target, source, answers, senders=vf_cand, via="logits", sender_pos=last)
    vf_heads = [vf_cand[i] for i in vf.effect().argsort(descending=True)[:top_vf].tolist()]
    top_layer = max(lay for lay, _ in vf_heads)
    pt_cand = [h for h in ranked if h not in vf_heads and h[0] < top_layer][:n_candidates]
    pt = path_patching(
        target,
        source,
        answers,
        senders=pt_cand,
        receivers=vf_heads,
        via="q",
        sender_pos=last,
        receiver_pos=last,
    )
    pt_heads = [pt_cand[i] for i in pt.effect().argsort(descending=True)[:top_pt].tolist()]
    groups = {
        "value_fetcher": [(a, b, "last") for a, b in vf_heads],
        "position_transmitter": [(a, b, "last") for a, b in pt_heads],
    }
    return groups, {"value_fetcher": vf, "position_transmitter": pt}, len(vf_cand) + len(pt_cand)


def run_circuit_study(
    pair: Any,
    out: Path,
    progress: Callable[[str], None] = log.info,
    *,
    n_contexts: int = 4,
    n_reference: int = 8,
    top_k: int = 6,
    n_random: int = 5,
    seed: int = 0,
) -> dict:
    t0 = time.time()
    out = Path(out)
    tok = pair.tokenizer
    data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=n_contexts), seed).encode(tok)
    reference = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=n_reference), seed + 100).encode(
        tok
    )
    progress("circuits: CMAP head groups for the circuit")
    groups, checked = cmap_heads(pair, data, top_k=top_k, saved=out / "circuits")
    summary: dict[str, Any] = {"groups": {g: [list(h) for h in hs] for g, hs in groups.items()}}
    summary["n_candidates_checked"] = checked
    prov = pair_provenance(pair)
    for role in ("tuned", "base"):
        for scope in ("all", "positions"):
            progress(f"circuits: faithfulness of the circuit in the {role} model (mean ablation, {scope})")
            res = faithfulness(
                pair[role], data, groups, reference=reference, n_random=n_random, seed=seed,
                n_candidates_checked=checked, scope=scope, provenance={**prov, "role": role},
            )  # fmt: skip
            res.save(out / "circuit" / f"faithfulness_{role}_{scope}")
            summary[f"faithfulness_{role}_{scope}"] = res.summary()
    progress("circuits: path patching (value fetchers, position transmitters) in the tuned model")
    corrupt = et.counterfactuals(
        et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=n_contexts), seed), "query", seed=seed + 1
    ).encode(tok)
    t1 = time.time()
    pp_groups, pp, pp_checked = path_study(pair.tuned, data, corrupt)
    for name, res in pp.items():
        res.save(out / "circuit" / f"path_patching_{name}")
    summary["path_patching"] = {
        "groups": {g: [f"L{a}.h{b}" for a, b, _ in hs] for g, hs in pp_groups.items()},
        "n_candidates_checked": pp_checked,
        "seconds": round(time.time() - t1, 1),
    }
    for role, scope in (("tuned", "positions"), ("tuned", "all"), ("base", "positions")):
        progress(f"circuits: faithfulness of the path-patching circuit in the {role} model ({scope})")
        res = faithfulness(
            pair[role], data, pp_groups, reference=reference, n_random=n_random, seed=seed,
            n_candidates_checked=pp_checked, scope=scope, provenance={**prov, "role": role},
        )  # fmt: skip
        res.save(out / "circuit" / f"faithfulness_path_circuit_{role}_{scope}")
        summary[f"faithfulness_path_circuit_{role}_{scope}"] = res.summary()
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def circuit_demo_step(ctx) -> dict:
    """Demo size: 12 prompts, 24 reference prompts, 6 heads per group, 5 random circuits."""
    return run_circuit_study(ctx.pair, Path(ctx.out), ctx.progress)
