"""The entity-tracking circuit on a real pair and its faithfulness in each model (demo size).

Head groups at the last and the query-label positions come from CMAP (tuned -> base): the saved exact
layer × head sweeps of :mod:`circuits.studies.entity_tracking` when they are already under
``out/circuits``, otherwise
candidates preselected by attribution (base gradient × (tuned − base z), every head at once) and only
those patched exactly. Each model then runs with everything outside the circuit mean-ablated
(:mod:`circuits.circuit.faithfulness`), against random circuits of the same shape: with the paper's scope
(every
head at every position outside the circuit ablated) and with the weaker one (only at the circuit's two
positions).

Then the paper's own procedure (:func:`path_circuit`, algorithms.md §1.3–1.4) in the tuned model: the four
head groups (value fetchers, position transmitters, position detectors, structure readers) by iterated
path patching from attribution-preselected candidates (:mod:`circuits.circuit.groups`), minimality pruning
(:mod:`circuits.circuit.minimality`), and the minimal circuit's faithfulness in both models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from circuits.circuit.faithfulness import faithfulness
from circuits.circuit.groups import GroupSearchConfig, find_groups
from circuits.circuit.minimality import prune
from circuits.patching.attribution import at_position, attribute
from circuits.patching.cmap import trace_pair
from circuits.patching.engine import Patch, run_cells
from circuits.patching.metrics import logit_diff
from circuits.patching.result import PatchingResult
from tunelens.models.pair import ModelPair
from tunelens.results import pair_provenance
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et

log = logging.getLogger(__name__)
POSITIONS = ("last", "query_label")
# SmolLM2 has 270 heads (the paper's Llama-7B 1024): top-k about the paper's Llama values scaled by 0.3-0.4,
# candidate pools of 3-4× top-k checked exactly (the paper checks every head).
DEMO_SEARCH = GroupSearchConfig(top_k=(6, 3, 4, 2), n_candidates=(12, 6, 8, 4))


def path_circuit(
    pair: ModelPair,
    out: Path,
    progress: Callable[[str], None] = log.info,
    *,
    n_contexts: int = 4,
    n_eval: int = 4,
    n_reference: int = 8,
    search: GroupSearchConfig = DEMO_SEARCH,
    n_random: int = 5,
    seed: int = 0,
    role: str = "tuned",
) -> dict[str, Any]:
    """The paper's procedure in ``pair[role]``: the four head groups by iterated path patching (clean
    prompts against the paper's corrupt ones, ``counterfactuals(…, "context")``), minimality pruning, and
    the faithfulness of the minimal circuit in both models (means over prompts with random query letters).

    Writes ``groups``, ``path_patching_<group>``, ``minimality`` (pruned at the paper's scope),
    ``minimality_positions`` (ablated only at the circuit's positions) and
    ``faithfulness_path_circuit_<role>_<scope>`` (each minimal circuit at its scope, in both models) under
    ``out``; returns their headline numbers."""
    tok = pair.tokenizer
    cfg = et.EntityTrackingConfig(n_boxes=3, n_contexts=n_contexts)
    ds = et.generate(cfg, seed + 200)
    clean, corrupt = ds.encode(tok), et.counterfactuals(ds, "context", seed=seed + 201).encode(tok)
    evaluation = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=n_eval), seed + 300).encode(tok)
    ref_ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=n_reference), seed + 400)
    reference = et.counterfactuals(ref_ds, "context", seed=seed + 401).encode(tok)
    prov = pair_provenance(pair)
    summary: dict[str, Any] = {
        "settings": {
            "model": role,
            "n_prompts_path_patching": len(clean),
            "n_prompts_eval": len(evaluation),
            "n_prompts_reference": len(reference),
            "top_k": list(search.top_k),
            "n_candidates": list(search.n_candidates),
            "rank": search.rank,
        }
    }
    t = time.time()
    progress(f"circuits: the four head groups by path patching in the {role} model")
    groups, runs = find_groups(pair[role], clean, corrupt, search, provenance={**prov, "role": role})
    groups.save(out / "groups")
    for name, res in runs.items():
        res.save(out / f"path_patching_{name}")
    summary["groups"] = groups.summary()
    summary["seconds_groups"] = round(time.time() - t, 1)
    heads = {g: hs for g, hs in groups.heads_at().items() if hs}
    if not heads:
        summary["note"] = "no head group found"
        return summary
    checked = sum(groups.n_checked().values())
    # pruned twice: at the paper's scope (everything outside the circuit ablated at every position) and,
    # for circuits that are not faithful there, only at the candidate circuit's positions
    for scope, name in (("all", "minimality"), ("positions", "minimality_positions")):
        t = time.time()
        n = sum(map(len, heads.values()))
        progress(f"circuits: minimality pruning of {n} heads in the {role} model (ablated: {scope})")
        minimal = prune(
            pair[role], evaluation, heads, reference=reference, scope=scope, provenance={**prov, "role": role}
        )
        minimal.save(out / name)
        summary[name] = minimal.summary()
        summary[f"seconds_{name}"] = round(time.time() - t, 1)
        kept = {g: [tuple(h) for h in hs] for g, hs in minimal.minimal.items() if hs}
        if not kept:
            summary[f"note_{name}"] = "pruning kept no head"
            continue
        for who in (role, _other(role)):
            progress(f"circuits: faithfulness of the minimal circuit in the {who} model ({scope})")
            res = faithfulness(
                pair[who], evaluation, kept, reference=reference, n_random=n_random, seed=seed,
                n_candidates_checked=checked, scope=scope, provenance={**prov, "role": who},
            )  # fmt: skip
            res.save(out / f"faithfulness_path_circuit_{who}_{scope}")
            summary[f"faithfulness_{who}_{scope}"] = res.summary()
    return summary


def _other(role: str) -> str:
    return "base" if role == "tuned" else "tuned"


def cmap_heads(
    pair: ModelPair, data, *, top_k: int = 6, n_candidates: int | None = None, saved: Path | None = None
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
        cells = [(Patch(Site("z", lay, h), pos.clone()),) for lay, h in heads]
        exact = logit_diff(run_cells(runs.base, runs.tuned, cells, runs.answers)).mean(-1) - base_ld
        checked += len(cells)
        order = exact.argsort(descending=True)[:top_k].tolist()
        groups[p] = [(heads[i][0], heads[i][1], p) for i in order]
    return groups, checked


def run_circuit_study(
    pair: ModelPair,
    out: Path,
    progress: Callable[[str], None] = log.info,
    *,
    n_contexts: int = 4,
    n_reference: int = 8,
    top_k: int = 6,
    n_random: int = 5,
    seed: int = 0,
    n_pp_contexts: int = 4,
    n_eval_contexts: int = 4,
    search: GroupSearchConfig = DEMO_SEARCH,
) -> dict:
    """CMAP head groups and their faithfulness, then the paper's circuit (:func:`path_circuit`)."""
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
    summary["path_circuit"] = path_circuit(
        pair, out / "circuit", progress, n_contexts=n_pp_contexts, n_eval=n_eval_contexts,
        n_reference=n_reference, search=search, n_random=n_random, seed=seed,
    )  # fmt: skip
    summary["seconds"] = round(time.time() - t0, 1)
    return summary
