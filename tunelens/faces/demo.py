"""``tunelens demo``: the main job, on the real SmolLM2 pair at reduced, stated settings.

Steps run in order and each writes its part of the results folder: the core steps (:data:`STEPS`,
settings in :data:`SETTINGS`), then every study of :mod:`tunelens.faces.registry` that has demo settings,
each in ``out/<key>`` on its own zoo pair (built first if needed). A step that fails is recorded in the
summary and the demo goes on with the next, so one failure never loses the other results (the command
still exits non-zero). At the end the demo writes the HTML report and says how to open the app on the results.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelens.errors import ConfigError, JobError
from tunelens.io import atomic_write_json
from tunelens.models import zoo
from tunelens.models.pair import ModelPair
from tunelens.studies import Study

log = logging.getLogger(__name__)


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


def _study_step(study: Study) -> Callable[[DemoContext], dict[str, Any]]:
    """The demo step of ``study``: its demo settings on its pair (the demo's pair when it is the same)."""

    def step(ctx: DemoContext) -> dict[str, Any]:
        if (missing := study.missing_extra()) is not None:
            return {"skipped": missing}
        pair = None
        if study.pair is not None:
            same = study.pair == SETTINGS["pair"]
            pair = ctx.pair if same else zoo.load_pair(study.pair, progress=ctx.progress)
        return study(pair, ctx.out / study.key, "demo", progress=ctx.progress)

    return step


def steps() -> list[tuple[str, Callable[[DemoContext], dict[str, Any]]]]:
    """The core steps, then one step per study with demo settings."""
    from tunelens.faces import registry  # imports every analysis package: only when the demo runs

    return [*STEPS, *((s.key, _study_step(s)) for s in registry.sized("demo"))]


def run_demo(out: Path, *, progress: Progress = print, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the SmolLM2 pair if needed, run every step, write ``out/summary.json``; returns the summary.

    ``only`` runs the core steps and the named analysis steps (e.g. ``["probes"]``), keeping the other
    steps' entries of an earlier ``summary.json`` in the same folder.
    """
    core = {n for n, _ in STEPS}
    all_steps = steps()
    names = [n for n, _ in all_steps if n not in core]
    if only is not None and (unknown := sorted(set(only) - set(names))):
        raise ConfigError(f"unknown demo step(s) {unknown}; the analysis steps are {names}")

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    progress(f"tunelens demo -> {out.resolve()}")
    progress(f"settings: {json.dumps(SETTINGS)}")
    pair = zoo.load_pair(SETTINGS["pair"], progress=progress)
    summary: dict[str, Any] = {"settings": SETTINGS, "steps": {}}
    if only is not None and (out / "summary.json").exists():
        summary["steps"] = json.loads((out / "summary.json").read_text()).get("steps", {})
    ctx = DemoContext(out=out, pair=pair, progress=progress, summary=summary)
    failed = []
    for name, step in all_steps:
        if only is not None and name in names and name not in only:
            continue
        t = time.time()
        progress(f"[{name}] ...")
        try:
            summary["steps"][name] = step(ctx)
        except Exception as exc:  # one failed analysis must not lose the others' results
            if name in ("models", "check"):
                raise
            log.exception("demo step %s failed", name)
            summary["steps"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
            progress(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
        summary["steps"][name]["seconds"] = round(time.time() - t, 1)
        atomic_write_json(out / "summary.json", summary)
        progress(f"[{name}] done in {time.time() - t:.0f} s")
    summary["seconds"] = round(time.time() - t0, 1)
    summary["failed"] = failed
    atomic_write_json(out / "summary.json", summary)
    _report(out, summary, progress)
    tuned = summary["steps"]["models"]["tuned"]
    for split, acc in tuned.get("tuned_accuracy", {}).items():
        before = tuned["base_accuracy"][split]["accuracy"]
        progress(
            f"entity tracking ({split}): base {before:.2f} -> tuned {acc['accuracy']:.2f} "
            f"({acc['n']} held-out prompts)"
        )
    progress(f"demo finished in {summary['seconds']:.0f} s; results in {out.resolve()}/summary.json")
    progress(f"open the app on these results: .venv/bin/tunelens app {out}")
    if failed:
        raise JobError(f"demo steps failed: {', '.join(failed)} (the other results are in {out})")
    return summary


def _report(out: Path, summary: dict[str, Any], progress: Progress) -> None:
    from tunelens.faces.report import write_report

    path = write_report(out)
    summary["report"] = str(path)
    atomic_write_json(out / "summary.json", summary)
    progress(f"report: {path.resolve()}")
