"""The entity-tracking study on a real pair: residual patching, CMAP and attribution (demo and reproduce).

Settings are a frozen :class:`StudySettings`; :data:`DEMO` is the reduced one (about 2–3 minutes for
SmolLM2 on two CPU cores), :data:`FULL` the larger one for ``tunelens reproduce``.

1. Residual patching (layer × position) in the tuned model: clean prompt → the same world queried for
   another box (``query`` counterfactual), logit difference clean answer − corrupt answer.
2. CMAP: every head alone at the last position and at the query-label position (tuned → base), in one
   batched sweep each; then the top heads (chosen on one half of the prompts) patched together on the
   other half, both directions, against random heads of the same count.
3. Attribution patching: agreement with step 1 (within the tuned model) and with the CMAP sweep at the
   last position (base gradient × (tuned − base z)).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from circuits.patching.attribution import agreement, at_position, attribute
from circuits.patching.cmap import cmap_groups, cmap_sweep, trace_pair
from circuits.patching.engine import trace
from circuits.patching.metrics import Answers
from circuits.patching.sweeps import SweepConfig, patch_sweep, resolve_positions
from tunelens.errors import ConfigError
from tunelens.models.pair import ModelPair
from tunelens.results import pair_provenance
from tunelens.tasks import entity_tracking as et

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StudySettings:
    n_boxes: int = 3
    n_contexts: int = 6  # prompts = n_contexts × n_boxes
    seed: int = 0
    resid_contexts: int = (
        2  # worlds for the residual sweep (its cost grows with prompts × positions × layers²)
    )
    resid_positions: str = "task"  # "task": the named positions of the prompt; "all": every position
    resid_layer_step: int = 1
    top_k: int = 6  # heads per CMAP group, chosen on the selection half
    n_random: int = 10
    max_rows: int = 256

    def __post_init__(self) -> None:
        if self.n_contexts < 2:
            raise ConfigError(
                f"n_contexts must be >= 2 (the prompts are split in halves), got {self.n_contexts}"
            )
        if self.resid_positions not in ("task", "all"):
            raise ConfigError(f"resid_positions must be 'task' or 'all', got {self.resid_positions!r}")
        if self.top_k < 1 or self.n_random < 0:
            raise ConfigError("top_k must be >= 1 and n_random >= 0")


DEMO = StudySettings(n_contexts=4, resid_contexts=1, resid_layer_step=2, top_k=6, n_random=8)
FULL = StudySettings(
    n_contexts=100, resid_contexts=10, resid_positions="all", top_k=10, n_random=10, max_rows=512
)


def _top_heads(sweep, k: int, position: str) -> list[tuple[int, int, str]]:
    grid = sweep.values["logit_diff"] - sweep.target["logit_diff"]
    flat = torch.topk(grid.reshape(-1), k).indices.tolist()
    n_heads = grid.shape[1]
    return [(i // n_heads, i % n_heads, position) for i in flat]


def run_study(
    pair: ModelPair, settings: StudySettings, out: Path, progress: Callable[[str], None] = log.info
) -> dict:
    """Run the three steps, save their results under ``out``, return the headline numbers."""
    out = Path(out)
    t0 = time.time()
    tok = pair.tokenizer
    clean_ds = et.generate(
        et.EntityTrackingConfig(n_boxes=settings.n_boxes, n_contexts=settings.n_contexts), settings.seed
    )
    corrupt_ds = et.counterfactuals(clean_ds, "query", seed=settings.seed + 1)
    clean, corrupt = clean_ds.encode(tok), corrupt_ds.encode(tok)
    prov = pair_provenance(pair)
    summary: dict[str, Any] = {"settings": asdict(settings), "n_prompts": len(clean)}

    # 1. residual patching in the tuned model
    n_resid = min(len(clean), settings.resid_contexts * settings.n_boxes)
    rc, rk = clean.select(torch.arange(n_resid)), corrupt.select(torch.arange(n_resid))
    progress(f"circuits: residual patching layer × position in the tuned model ({n_resid} prompts)")
    answers = Answers.from_encoded(rc, foil=rk)
    src = trace(pair.tuned, rc.tokens)
    tgt = trace(pair.tuned, rk.tokens)
    positions = None
    if settings.resid_positions == "task":
        names = [f"{w}_{i}" for i in range(settings.n_boxes) for w in ("object", "label")]
        positions = (*names, "query_label", "last")
    layers = tuple(range(0, pair.dims.n_layers, settings.resid_layer_step))
    cfg = SweepConfig(
        kind="resid_pre", by="layer_pos", layers=layers, positions=positions, max_rows=settings.max_rows
    )
    resid = patch_sweep(tgt, src, answers, cfg, data=rc, direction="clean -> corrupt", provenance=prov)
    resid.save(out / "resid_patching")
    summary["resid_patching"] = resid.summary()
    per_prompt = attribute(tgt, src, answers, "resid_pre")[list(layers)]
    pos, _ = resolve_positions(positions, rc)
    est = torch.stack([at_position(per_prompt, p) for p in pos], dim=1)
    att = agreement(
        est, resid.values["logit_diff"] - resid.target["logit_diff"], kind="resid_pre",
        direction="clean -> corrupt", axes=resid.axes, labels=resid.labels, topk=10, provenance=prov,
    )  # fmt: skip
    att.save(out / "attribution_resid")
    summary["attribution_resid"] = att.summary()
    progress(f"  done in {time.time() - t0:.0f} s; attribution r = {att.correlation:.2f}")

    # 2. CMAP sweeps on the selection half, groups evaluated on the other half
    n = len(clean)
    sel = torch.arange(n) < n // 2
    sel_data, eval_data = clean.select(sel), clean.select(~sel)
    progress(f"circuits: CMAP layer × head sweeps (tuned -> base) on {int(sel.sum())} prompts")
    runs_sel = trace_pair(pair, sel_data)
    sweeps = {}
    for position in ("last", "query_label"):
        sweeps[position] = cmap_sweep(
            pair, sel_data, position=position, runs=runs_sel, max_rows=settings.max_rows
        )
        sweeps[position].save(out / f"cmap_sweep_{position}")
    summary["cmap_sweep_last"] = sweeps["last"].summary()
    groups = {f"top{settings.top_k}@{p}": _top_heads(sweeps[p], settings.top_k, p) for p in sweeps}
    groups["both"] = [h for g in list(groups.values()) for h in g]
    progress(f"circuits: CMAP head groups on the other {int((~sel).sum())} prompts, both directions")
    cm = cmap_groups(pair, eval_data, groups, n_random=settings.n_random, seed=settings.seed)
    cm.save(out / "cmap_groups")
    summary["cmap_groups"] = cm.summary()

    # 3. first-order CMAP: base gradient × (tuned − base z) at the last position
    est = at_position(
        attribute(runs_sel.base, runs_sel.tuned, runs_sel.answers, "z"), sel_data.positions["last"]
    )
    exact = sweeps["last"].values["logit_diff"] - sweeps["last"].target["logit_diff"]
    cm_att = agreement(
        est, exact, kind="z", direction="tuned -> base", axes=sweeps["last"].axes,
        labels=sweeps["last"].labels, topk=10, provenance=prov,
    )  # fmt: skip
    cm_att.save(out / "attribution_cmap")
    summary["attribution_cmap"] = cm_att.summary()
    summary["seconds"] = round(time.time() - t0, 1)
    progress(f"circuits: done in {summary['seconds']} s")
    return summary
