"""The job runner on a real (tiny) pair: results, resume, --fresh, refusal, retries, a full disk, status."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tunelens.errors import JobError
from tunelens.faces.jobs import JobSpec, job_status, run_job
from tunelens.faces.jobs.faults import ENOSPC_ENV, FAIL_ENV, TRACE_ENV
from tunelens.results import load_result

from .conftest import assert_same_outputs, hidden_entries, output_files


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pair_dirs):
    """One uninterrupted run of the small probe job (the reference the other tests compare with)."""
    import yaml

    from .conftest import job_dict

    folder = tmp_path_factory.mktemp("reference")
    (folder / "job.yaml").write_text(yaml.safe_dump(job_dict(pair_dirs)))
    spec = JobSpec.from_file(folder / "job.yaml")
    report = run_job(spec)
    return spec, report


def _mtimes(root: Path) -> dict[str, int]:
    return {k: p.stat().st_mtime_ns for k, p in output_files(root).items()}


def test_probe_results_equal_fit_probes_on_directly_captured_activations(finished, pair_dirs):
    """The job's chain (cache unit -> store -> probe unit) gives what a direct capture + fit gives."""
    from probes import ProbeConfig, fit_probes
    from tunelens.cache import CacheConfig, capture_pair
    from tunelens.models.resolve import load_pair
    from tunelens.sites import Site
    from tunelens.tasks import entity_tracking as et

    spec, report = finished
    assert len(report.done) == 5 and report.failed == {}
    pair = load_pair(pair_dirs["base"], pair_dirs["tuned"])
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=20), seed=0)
    acts = capture_pair(pair, ds, CacheConfig(sites=(Site("resid_post", 0), Site("resid_post", 1))))
    x = {r: torch.stack([acts[r][Site("resid_post", i)] for i in (0, 1)]) for r in ("base", "tuned")}
    y = torch.tensor([int(e.meta["query_index"] == 0) for e in ds])
    items = [e.item_id for e in ds]
    for kind in ("logistic", "diff_means"):
        direct = fit_probes(x, y, items, ProbeConfig(kind=kind, seed=1, min_test_items=5), layers=[0, 1])
        saved = load_result(spec.output / "probes" / f"{kind}-resid_post-seed1")
        # Accuracies are step functions of the predictions: equal unless a test row lies within float
        # rounding of the decision boundary.
        for name in ("task", "control", "shuffled"):
            a, b = direct.scores[name], saved.scores[name]
            assert torch.allclose(a, b, atol=1e-6, equal_nan=True), (kind, name)
        # The fitted models, by what they predict and by their weights relative to their norm. The two fits
        # see the same activations but reach them by different routes (store round trip, batching), so they
        # agree to float32 rounding amplified by the fit's conditioning: weights reach ~3e2 here and differ
        # by up to 1e-4 on some MKL code paths (4e-7 of the largest), where the bounds below are 1e-4. A
        # chain that fed another layer, site or label set would miss them by orders of magnitude.
        for r, role in enumerate(direct.roles):
            for li in range(len(direct.layers)):
                w_a, w_b = direct.weight[r, li], saved.weight[r, li]
                assert float((w_a - w_b).norm() / w_a.norm()) < 1e-4, (kind, role, li)
                f_a = x[role][li] @ w_a + direct.bias[r, li]
                f_b = x[role][li] @ w_b + saved.bias[r, li]
                assert float((f_a - f_b).abs().max() / f_a.abs().max()) < 1e-4, (kind, role, li)
        assert saved.pair["base"] == pair.hashes()["base"]


def test_rerun_skips_finished_units_and_redoes_only_a_missing_one(finished, tmp_path):
    spec, _ = finished
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(spec.output, root)
    copy = JobSpec.from_dict({**_spec_dict(spec), "output": str(root)}, source="job.yaml")
    before = _mtimes(root)
    report = run_job(copy)
    assert report.done == [] and len(report.skipped) == 5
    assert _mtimes(root) == before
    shutil.rmtree(root / "probes" / "logistic-resid_post-seed1")
    report = run_job(copy)
    assert report.done == ["probe-logistic-resid_post-seed1"]
    after = _mtimes(root)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.startswith("probes/logistic-resid_post-seed1/") for k in changed)
    assert_same_outputs(spec.output, root)


def _spec_dict(spec: JobSpec) -> dict:
    import yaml

    return yaml.safe_load((spec.output.parent / "job.yaml").read_text())


def test_different_spec_is_refused_and_fresh_starts_over_keeping_unrelated_files(finished, tmp_path):
    spec, _ = finished
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(spec.output, root)
    (root / "my-notes.txt").write_text("keep me")
    (root / "probes" / "mine").mkdir()
    changed = JobSpec.from_dict(
        {**_spec_dict(spec), "output": str(root), "seeds": [0, 1, 2]}, source="b.yaml"
    )
    with pytest.raises(JobError) as e:
        run_job(changed)
    msg = str(e.value)
    assert "different job" in msg and "seeds" in msg and "--fresh" in msg and "b.yaml" in msg
    assert len(list((root / "probes").iterdir())) == 5  # nothing touched
    report = run_job(changed, fresh=True)
    assert len(report.done) == 7 and report.skipped == []
    assert (root / "my-notes.txt").read_text() == "keep me" and (root / "probes" / "mine").is_dir()
    st = job_status(root)
    assert (st["done"], st["pending"], st["failed"]) == (7, 0, 0)


def test_a_failing_unit_is_retried_then_recorded_failed_and_a_rerun_finishes(
    tmp_path, write_job, monkeypatch
):
    path = write_job(seeds=[0], probes=["logistic"], executor={"retries": 2})
    spec = JobSpec.from_file(path)
    unit = "probe-logistic-resid_post-seed0"
    monkeypatch.setenv(FAIL_ENV, f"{unit}:2")  # fails twice, then works: within 2 retries
    report = run_job(spec)
    rec = json.loads((spec.output / "job" / "units" / f"{unit}.json").read_text())
    assert rec["state"] == "done" and rec["attempts"] == 3 and unit in report.done

    spec1 = spec.with_executor(retries=1)
    monkeypatch.setenv(FAIL_ENV, f"{unit}:5")
    with pytest.raises(JobError, match=r"1 of 2 units failed: probe-logistic-resid_post-seed0: RuntimeError"):
        run_job(spec1, fresh=True)
    st = job_status(spec.output)
    assert (st["done"], st["failed"]) == (1, 1)
    assert [r["attempts"] for r in st["units"] if r["state"] == "failed"] == [2]
    monkeypatch.delenv(FAIL_ENV)
    report = run_job(spec1)
    assert report.done == [unit] and report.skipped == ["cache"]


def test_a_user_error_in_a_unit_is_not_retried(tmp_path, write_job):
    spec = JobSpec.from_file(write_job(layers=[0, 5]))  # the tiny pair has layers 0..1
    with pytest.raises(JobError, match=r"cache: SiteError: job layers \[5\] are out of range"):
        run_job(spec)
    st = job_status(spec.output)
    assert st["units"][0]["attempts"] == 1 and st["failed"] == 1 and st["pending"] == 4


def test_full_disk_leaves_previous_results_intact(finished, tmp_path, monkeypatch):
    """ENOSPC during a result write: a clear error, the older results untouched, no temp file left."""
    spec, _ = finished
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(spec.output, root)
    copy = JobSpec.from_dict({**_spec_dict(spec), "output": str(root)}, source="job.yaml")
    # The record of one finished unit is lost (as after a crash): the rerun rewrites its result over the
    # existing folder, and the disk fills up in the middle of that write.
    (root / "job" / "units" / "probe-diff_means-resid_post-seed0.json").unlink()
    trace = tmp_path / "trace.tsv"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    run_job(copy)
    names = [line.split("\t")[2] for line in trace.read_text().splitlines()]
    fsync = names.index("fsync", names.index("unit:fitted:probe-diff_means-resid_post-seed0")) + 1
    (root / "job" / "units" / "probe-diff_means-resid_post-seed0.json").unlink()
    before = {k: p.read_bytes() for k, p in output_files(root).items()}
    monkeypatch.delenv(TRACE_ENV)
    monkeypatch.setenv(ENOSPC_ENV, str(fsync))
    with pytest.raises(JobError, match=r"disk full.*probe-diff_means-resid_post-seed0.*rerun"):
        run_job(copy)
    assert {k: p.read_bytes() for k, p in output_files(root).items()} == before
    assert hidden_entries(root) == []
    load_result(root / "probes" / "diff_means-resid_post-seed0")  # still a complete result
    monkeypatch.delenv(ENOSPC_ENV)
    assert run_job(copy).done == ["probe-diff_means-resid_post-seed0"]
    assert_same_outputs(spec.output, root)


def test_disk_full_while_caching_keeps_finished_shards(tmp_path, write_job, monkeypatch):
    spec = JobSpec.from_file(write_job(seeds=[0], probes=["logistic"]))
    monkeypatch.setenv(ENOSPC_ENV, "12")  # somewhere in the cache unit's shard writes
    with pytest.raises(JobError, match="disk full while unit cache was writing"):
        run_job(spec)
    assert hidden_entries(spec.output) == []
    monkeypatch.delenv(ENOSPC_ENV)
    report = run_job(spec)
    assert report.done == ["cache", "probe-logistic-resid_post-seed0"]


def test_status_of_a_folder_without_a_job_is_a_clear_error(tmp_path):
    with pytest.raises(JobError, match="holds no tunelens job"):
        job_status(tmp_path)


def test_cli_run_and_status(finished, tmp_path, capsys):
    from tunelens.faces.cli import main

    spec, _ = finished
    job = spec.output.parent / "job.yaml"
    assert main(["jobs", "run", str(job)]) == 0
    out = capsys.readouterr().out
    assert "0 units run, 5 already done" in out
    assert main(["jobs", "status", str(job)]) == 0
    out = capsys.readouterr().out
    assert "5 done, 0 pending, 0 failed" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(job.read_text().replace("kind: probe", "kind: probes"))
    assert main(["jobs", "run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("tunelens: error: bad.yaml: kind: expected one of probe, cache")
        and "Traceback" not in err
    )
    assert len(err.strip().splitlines()) == 1
    assert os.environ.get(FAIL_ENV) is None
