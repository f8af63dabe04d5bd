"""The three seed probe studies on a real pair, at demo and full size.

- :func:`entity_tracking_study` — which object is in the queried box (last token);
- :func:`pik_study` — P(IK)-style "does this model know the fact" (last token of the question);
- :func:`wack_study` — WACK-style unknown / known / known-but-wrong under a misleading context.

:data:`STUDIES` runs all three: at :data:`DEMO_SETTINGS` for ``tunelens demo``, at
:data:`REPRODUCE_SETTINGS` for ``tunelens reproduce``. Each saves one
:class:`~probes.result.ProbeResult` folder per study.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from probes.result import ProbeResult
from probes.studies.entity_tracking import entity_tracking_study
from probes.studies.knowledge import pik_study, wack_study
from probes.studies.settings import (
    DEMO_SETTINGS,
    REPRODUCE_SETTINGS,
    EntityTrackingSettings,
    FactSettings,
)
from tunelens.studies import Study

__all__ = [
    "DEMO_SETTINGS",
    "PROBE_STUDIES",
    "REPRODUCE_SETTINGS",
    "STUDIES",
    "EntityTrackingSettings",
    "FactSettings",
    "entity_tracking_study",
    "pik_study",
    "run_studies",
    "wack_study",
]

PROBE_STUDIES: dict[str, Callable[..., ProbeResult]] = {
    "entity_tracking": entity_tracking_study,
    "pik": pik_study,
    "wack": wack_study,
}


def _headline(res: ProbeResult) -> dict[str, Any]:
    s = res.summary()
    keep = [
        k
        for k in s
        if k.endswith(("best_layer", "best_accuracy", "best_selectivity"))
        or k.startswith(("transfer_", "cosine", "majority", "n_test"))
    ]
    return {k: s[k] for k in keep}


def run_studies(
    pair, out: Path, settings: Mapping[str, Any], *, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the studies named in ``settings`` (name -> settings), save each to ``out/<name>``."""
    out = Path(out)
    summary: dict[str, Any] = {}
    results: dict[str, ProbeResult] = {}
    for name, s in settings.items():
        t0 = time.time()
        progress(f"probe study {name} …")
        if name == "wack" and "pik" in results and results["pik"].notes.get("items") is not None:
            pik = results["pik"]
            same = settings.get("pik") is not None and _same_facts(settings["pik"], s)
            kw = {"known": pik.notes["known"], "known_items": pik.notes["items"]} if same else {}
            res = wack_study(pair, s, progress=progress, **kw)
        else:
            res = PROBE_STUDIES[name](pair, s, progress=progress)
        results[name] = res
        res.save(out / name)
        summary[name] = {**_headline(res), "seconds": round(time.time() - t0, 1), "path": str(out / name)}
        progress(f"  {name}: {summary[name]}")
    return summary


def _same_facts(a: FactSettings, b: FactSettings) -> bool:
    return (a.n_facts, a.relations, a.seed) == (b.n_facts, b.relations, b.seed)


STUDIES: tuple[Study, ...] = (
    Study(
        key="probes",
        title="Probes: entity tracking, P(IK) and WACK on base and tuned, with controls and transfer",
        pair="smollm2-et",
        run=run_studies,
        demo=DEMO_SETTINGS,
        full=REPRODUCE_SETTINGS,
    ),
)
