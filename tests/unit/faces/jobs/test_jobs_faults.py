"""Fault injection: a job killed with SIGKILL at 10 points and rerun equals an uninterrupted run.

The kill points come from the runner's test hook (:mod:`tunelens.faces.jobs.faults`): an uninterrupted run
with ``TUNELENS_FAULT_TRACE`` lists every checkpoint it reaches (units starting, cache shards, probe fits,
and every ``fsync``/``os.replace`` of every atomic write); a subprocess running ``tunelens jobs run`` with
``TUNELENS_FAULT_KILL_AT=N`` then SIGKILLs itself at checkpoint ``N``. Points are chosen by name:
during a unit, in the middle of a write (temp file written, not yet renamed) and between units.

Each point costs a fresh Python process, so the test is marked ``slow`` (CI runs it; ``-m "not slow"``
skips it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelens.faces.jobs import JobSpec, job_status, run_job
from tunelens.faces.jobs.faults import KILL_ENV, TRACE_ENV

from .conftest import assert_same_outputs, hidden_entries, job_dict

PROBE = "probe-logistic-resid_post-seed0"


def _job(folder: Path, pair_dirs) -> JobSpec:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(job_dict(pair_dirs, seeds=[0])))
    return JobSpec.from_file(folder / "job.yaml")


def _traced_run(spec: JobSpec, trace: Path, monkeypatch) -> list[str]:
    monkeypatch.setenv(TRACE_ENV, str(trace))
    run_job(spec)
    monkeypatch.delenv(TRACE_ENV)
    return [line.split("\t")[2] for line in trace.read_text().splitlines()]


def _after(names: list[str], what: str, start: str, nth: int = 1) -> int:
    """The checkpoint number (1-based) of the ``nth`` name starting with ``what`` after ``start``."""
    i = next(i for i, n in enumerate(names) if n.startswith(start))
    hits = [j for j in range(i, len(names)) if names[j].startswith(what)]
    return hits[nth - 1] + 1


def _cache_done_state(ref: Path, dest: Path) -> None:
    """A job folder where only the cache unit has finished (as a job killed after it would leave)."""
    shutil.copytree(ref / "acts", dest / "acts")
    (dest / "job" / "units").mkdir(parents=True)
    shutil.copy(ref / "job" / "manifest.json", dest / "job" / "manifest.json")
    shutil.copy(ref / "job" / "units" / "cache.json", dest / "job" / "units" / "cache.json")


@pytest.mark.slow
def test_sigkill_at_ten_points_then_rerun_equals_an_uninterrupted_run(tmp_path, pair_dirs, monkeypatch):
    ref = _job(tmp_path / "ref", pair_dirs)
    full = _traced_run(ref, tmp_path / "trace-full.tsv", monkeypatch)
    probe_state = tmp_path / "probe-state"
    _cache_done_state(ref.output, probe_state / "out")
    probe_trace = _traced_run(_job(probe_state, pair_dirs), tmp_path / "trace-probe.tsv", monkeypatch)

    points = {  # name -> (start state, checkpoint number)
        "cache unit starts": ("empty", _after(full, "unit:start:cache", "unit:start:cache")),
        "between two cache shards": ("empty", _after(full, "unit:shard:cache", "unit:start:cache")),
        "mid shard write (temp file, before rename)": ("empty", _after(full, "fsync", "unit:shard:cache", 1)),
        "store manifest rename": ("empty", _after(full, "replace:manifest.json", "unit:shard:cache", 3)),
        "data.json write": ("empty", _after(full, "fsync", "unit:shard:cache:8/8")),
        "cache unit's record rename": ("empty", _after(full, "replace:cache.json", "unit:start:cache")),
        "probe fitted, result not saved": (
            "cache-done",
            _after(probe_trace, f"unit:fitted:{PROBE}", "unit:"),
        ),
        "mid result save (temp folder)": ("cache-done", _after(probe_trace, "fsync", f"unit:fitted:{PROBE}")),
        "result folder rename": (
            "cache-done",
            _after(probe_trace, "replace:logistic", f"unit:fitted:{PROBE}"),
        ),
        "between units": ("cache-done", _after(probe_trace, f"unit:done:{PROBE}", "unit:")),
    }
    assert len({(s, n) for s, n in points.values()}) == 10, points

    runs = []
    for i, (name, (state, n)) in enumerate(points.items()):
        folder = tmp_path / f"kill-{i}"
        if state == "cache-done":
            _cache_done_state(ref.output, folder / "out")
        spec = _job(folder, pair_dirs)
        env = {**os.environ, KILL_ENV: str(n), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        env.pop(TRACE_ENV, None)
        cmd = [sys.executable, "-m", "tunelens.faces.cli", "jobs", "run", str(folder / "job.yaml")]
        runs.append(
            (name, n, spec, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        )
        if len(runs) % 2 == 0 or i == len(points) - 1:  # two at a time on two cores
            for *_, p in runs[-2:]:
                p.wait(timeout=300)

    for name, n, spec, proc in runs:
        err = proc.stderr.read().decode()
        assert proc.returncode == -signal.SIGKILL, (
            f"{name} (checkpoint {n}): rc {proc.returncode}\n{err[-2000:]}"
        )
        st = job_status(spec.output)
        assert st["done"] < 3, f"{name}: the kill came after the job finished"
        report = run_job(spec)
        assert report.failed == {} and len(report.done) + len(report.skipped) == 3, name
        assert_same_outputs(ref.output, spec.output, atol=1e-6)
        assert hidden_entries(spec.output) == [], f"{name}: temp files left: {hidden_entries(spec.output)}"
