"""``tunelens demo``: the main job, on the real SmolLM2 pair at reduced, stated settings.

Steps run in order and each writes its part of the results folder; every step's settings are in
:data:`SETTINGS` and printed. Analysis packages add their steps here as they land.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelens.models.pair import ModelPair

Progress = Callable[[str], None]

SETTINGS: dict[str, Any] = {
    "pair": "smollm2-et",
    "cache": {"task": "entity_tracking", "n_boxes": 3, "n_contexts": 20, "sites": "resid_post, all layers",
              "positions": "last", "seed": 0},
}  # fmt: skip


@dataclass
class DemoContext:
    out: Path
    pair: ModelPair
    progress: Progress
    summary: dict[str, Any]


def _step_models(ctx: DemoContext) -> dict[str, Any]:
    from tunelens.models import zoo

    base, tuned = zoo.PAIRS[SETTINGS["pair"]]
    return {"base": zoo.report(base), "tuned": zoo.report(tuned), "pair": ctx.pair.describe()}


def _step_check(ctx: DemoContext) -> dict[str, Any]:
    from tunelens.checks import check_pair

    results = check_pair(ctx.pair)
    for r in results:
        ctx.progress("  " + r.line())
    return {"passed": all(r.passed for r in results), "results": [r.__dict__ for r in results]}


def _step_cache(ctx: DemoContext) -> dict[str, Any]:
    from tunelens.cache import CacheConfig, cache_to_store
    from tunelens.sites import all_layers
    from tunelens.tasks import entity_tracking as et

    s = SETTINGS["cache"]
    data = et.generate(
        et.EntityTrackingConfig(n_boxes=s["n_boxes"], n_contexts=s["n_contexts"]), seed=s["seed"]
    )
    cfg = CacheConfig(sites=tuple(all_layers(ctx.pair.dims, "resid_post")), positions=s["positions"])
    stores = cache_to_store(ctx.pair, data, cfg, ctx.out / "activations" / "entity_tracking", shard_size=32)
    return {role: {"path": str(st.path), "items": st.spec.n_items, "complete": st.is_complete}
            for role, st in stores.items()}  # fmt: skip


STEPS: list[tuple[str, Callable[[DemoContext], dict[str, Any]]]] = [
    ("models", _step_models),
    ("check", _step_check),
    ("cache", _step_cache),
]


def run_demo(out: Path, *, progress: Progress = print) -> dict[str, Any]:
    """Build the SmolLM2 pair if needed, run every step, write ``out/summary.json``; returns the summary."""
    from tunelens.models import zoo

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    progress(f"tunelens demo -> {out.resolve()}")
    progress(f"settings: {json.dumps(SETTINGS)}")
    for name in zoo.PAIRS[SETTINGS["pair"]]:
        if not zoo.is_built(name):
            progress(f"building zoo model {name} (once; cached under {zoo.zoo_dir()})")
        zoo.build(name, progress=lambda msg: progress("  " + msg))
    pair = zoo.load_pair(SETTINGS["pair"])
    summary: dict[str, Any] = {"settings": SETTINGS, "steps": {}}
    ctx = DemoContext(out=out, pair=pair, progress=progress, summary=summary)
    for name, step in STEPS:
        t = time.time()
        progress(f"[{name}] ...")
        summary["steps"][name] = step(ctx)
        summary["steps"][name]["seconds"] = round(time.time() - t, 1)
        progress(f"[{name}] done in {time.time() - t:.0f} s")
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    tuned = summary["steps"]["models"]["tuned"]
    for split, acc in tuned.get("tuned_accuracy", {}).items():
        before = tuned["base_accuracy"][split]["accuracy"]
        progress(
            f"entity tracking ({split}): base {before:.2f} -> tuned {acc['accuracy']:.2f} "
            f"({acc['n']} held-out prompts)"
        )
    progress(f"demo finished in {summary['seconds']:.0f} s; results in {out.resolve()}/summary.json")
    return summary
