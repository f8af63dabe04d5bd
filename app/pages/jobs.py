"""Jobs: the batch jobs in the results folder, their progress and results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import streamlit as st

from app import common, live
from tunelens.errors import TunelensError
from tunelens.faces.jobs import job_status
from tunelens.faces.jobs.runner import read_json, record_path

STATES = ("done", "failed", "pending", "running")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def _summary(rec: dict[str, Any]) -> str:
    """A unit's summary (done) as one line of ``key: value``."""
    summary = rec.get("summary")
    if isinstance(summary, dict):
        text = "; ".join(f"{k}: {_value(v)}" for k, v in summary.items())
    else:
        text = "" if summary is None else _value(summary)
    return text if len(text) <= 300 else text[:299] + "…"


def show_job(folder: Path, root: Path) -> None:
    """One job folder: its units done / failed / pending / running, a progress bar and a table of units."""
    name = str(folder.relative_to(root))
    try:
        status = job_status(folder)
    except TunelensError as exc:
        st.error(f"Job folder `{name}`: {exc}")
        return
    rows = status["units"]
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    total = len(rows)
    where = "this results folder" if name == "." else f"`{name}`"
    st.subheader(f"{status['kind']} job in {where}")
    st.caption(f"{folder} · spec {status['spec_hash']} from {status['source'] or 'an unknown source'}")
    for col, state in zip(st.columns(len(STATES)), STATES, strict=True):
        col.metric(f"units {state}", counts[state])
    failed = f", {counts['failed']} failed" if counts["failed"] else ""
    text = f"{counts['done']} of {total} units done{failed}"
    st.progress(counts["done"] / total if total else 0.0, text=text)
    shown = []
    for r in rows:
        rec = read_json(record_path(folder, r["unit"])) or {}
        if r["state"] == "done":
            outcome = _summary(rec)
        elif r["state"] == "failed":
            outcome = r["error"] or str(rec.get("error", ""))
        else:
            outcome = ""
        shown.append((r, outcome))
    st.dataframe(
        {
            "unit": [r["unit"] for r, _ in shown],
            "label": [r["label"] for r, _ in shown],
            "state": [r["state"] for r, _ in shown],
            "attempts": [r["attempts"] for r, _ in shown],
            "seconds": [r["seconds"] for r, _ in shown],
            "summary or error": [o for _, o in shown],
        },
        width="stretch",
        hide_index=True,
    )
    if counts["failed"]:
        st.warning(
            f"{counts['failed']} unit(s) failed; units that wait for them stay pending. Rerun the same "
            "command (`tunelens jobs run JOB.yaml` or `tunelens reproduce`) to retry them; finished "
            "units are kept."
        )


st.title("Jobs")
st.caption(
    "Batch jobs (`tunelens jobs run JOB.yaml`, `tunelens reproduce`) write their progress and results into "
    "a results folder: the folder itself or one of its subfolders."
)
entries = common.scan()
if entries is None:
    st.stop()
ray_note = live.missing_extra("ray", "The Ray executor (`tunelens jobs run JOB.yaml --executor ray`)")
if ray_note:
    st.info(ray_note)
root = Path(common.results_dir())
folders = common.job_folders(root)
if folders:
    st.caption(
        "A unit's record is written when it finishes, so a unit running now counts as pending until then."
    )
    for folder in folders:
        show_job(folder, root)
else:
    st.info(
        f"No batch job in `{root}`: neither it nor its subfolders hold a job's records "
        "(`job/manifest.json`). Run one with `tunelens jobs run JOB.yaml` (its `output` is the job "
        f"folder) or `tunelens reproduce --out {root}`, then choose that folder in the sidebar."
    )
st.subheader("Results in the folder")
if entries:
    st.dataframe(
        {
            "result": [e.name for e in entries],
            "analysis": [e.analysis for e in entries],
            "type": [e.class_name for e in entries],
            "pair": [e.pair.get("name", "") for e in entries],
        },
        width="stretch",
    )
else:
    st.info(
        f"No results in `{common.results_dir()}` yet. Produce them with "
        f"`tunelens demo --out {common.results_dir()}`."
    )
