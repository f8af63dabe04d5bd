"""Job files: every key is checked, errors name the file, the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunelens.errors import JobError
from tunelens.faces.jobs import JobSpec, plan_job

from .conftest import job_dict

EXAMPLES = Path(__file__).resolve().parents[4] / "examples"


def _load(tmp_path: Path, data, name: str = "bad-job.yaml") -> JobSpec:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return JobSpec.from_file(path)


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"colour": "red"}, ["unknown key 'colour'", "top level", "kind", "executor"]),
        (
            {"task": {"name": "entity_tracking", "n": 6, "boxes": 3}},
            ["unknown key 'boxes'", "in task", "n_boxes"],
        ),
        ({"kind": "train"}, ["kind", "'train'", "probe, cache"]),
        ({"task": {"name": "entity_tracking", "n": 0}}, ["task.n", "integer >= 1", "0"]),
        ({"task": {"name": "entity_tracking", "n": "many"}}, ["task.n", "'many'"]),
        ({"task": {"name": "poetry", "n": 6}}, ["task.name", "'poetry'", "entity_tracking"]),
        ({"task": {"name": "entity_tracking", "n": 6, "label": "colour"}}, ["task.label", "query_is_first"]),
        ({"sites": ["resid_psot"]}, ["sites", "'resid_psot'", "resid_post"]),
        ({"sites": ["z"]}, ["sites", "'z'", "resid_pre"]),  # probes read d_model vectors
        ({"layers": [0, -1]}, ["layers", "-1", "integer >= 0"]),
        ({"layers": "some"}, ["layers", "'some'"]),
        ({"seeds": [0, 0]}, ["seeds", "distinct"]),
        ({"probes": ["svm"]}, ["probe", "svm", "logistic"]),
        ({"probe": {"C": -1.0}}, ["probe", "C", "-1"]),
        ({"probe": {"kernel": "rbf"}}, ["probe", "kernel"]),
        ({"probe": {"kind": "ridge"}}, ["probe.kind", "probes"]),
        ({"executor": {"kind": "slurm"}}, ["executor.kind", "'slurm'", "local, process, ray"]),
        ({"executor": {"workers": 0}}, ["executor.workers", "0"]),
        ({"executor": {"retries": True}}, ["executor.retries", "True"]),
        ({"cache": {"dtype": "int8"}}, ["cache.dtype", "'int8'", "float32"]),
        ({"pair": {"base": "tiny"}}, ["pair.tuned", "missing"]),
        ({"pair": 42}, ["pair", "42"]),
    ],
)
def test_bad_key_or_value_names_file_key_value_and_allowed(tmp_path, pair_dirs, change, needles):
    with pytest.raises(JobError) as e:
        _load(tmp_path, job_dict(pair_dirs, **change))
    msg = str(e.value)
    assert msg.startswith("bad-job.yaml:"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"cache": {"store": "../elsewhere"}}, "cache.store"),
        ({"cache": {"store": "acts/../../x"}}, "cache.store"),
        ({"cache": {"store": "/etc/tunelens"}}, "cache.store"),
        ({"cache": {"store": "~/acts"}}, "cache.store"),
        ({"results": "../../probes"}, "results"),
        ({"results": "probes/../../.."}, "results"),
        ({"results": ".hidden"}, "results"),
    ],
)
def test_paths_cannot_escape_the_output_folder(tmp_path, pair_dirs, change, key):
    with pytest.raises(JobError, match=rf"bad-job\.yaml: {key}: expected a (relative path|path without)"):
        _load(tmp_path, job_dict(pair_dirs, **change))


def test_missing_required_key_and_not_yaml(tmp_path, pair_dirs):
    d = job_dict(pair_dirs)
    del d["task"]
    with pytest.raises(JobError, match="missing required key 'task'"):
        _load(tmp_path, d)
    with pytest.raises(JobError, match="not valid YAML"):
        _load(tmp_path, "kind: [probe\n")
    with pytest.raises(JobError, match="does not exist"):
        JobSpec.from_file(tmp_path / "nope.yaml")
    with pytest.raises(JobError, match="expected a mapping"):
        _load(tmp_path, "- just\n- a list\n")


def test_yaml_is_read_safely(tmp_path):
    """A python-object tag is a YAML error (safe_load), never an object constructed."""
    text = "kind: !!python/object/apply:os.system ['echo pwned']\noutput: out\n"
    with pytest.raises(JobError, match="not valid YAML"):
        _load(tmp_path, text)


def test_output_is_relative_to_the_job_file_and_identity_ignores_how_it_runs(tmp_path, pair_dirs):
    a = _load(tmp_path / "", job_dict(pair_dirs), "a.yaml")
    assert a.output == tmp_path / "out"
    b = _load(tmp_path, job_dict(pair_dirs, output="/tmp/x", executor={"kind": "process", "workers": 2}))
    assert a.identity_hash() == b.identity_hash()
    c = _load(tmp_path, job_dict(pair_dirs, seeds=[0, 1, 2]))
    assert c.identity_hash() != a.identity_hash()
    assert a.with_executor(kind="ray", workers=3).executor.workers == 3
    with pytest.raises(JobError, match="--executor"):
        a.with_executor(kind="cluster")


def test_plan_has_one_cache_unit_then_one_probe_unit_per_kind_site_and_seed(tmp_path, pair_dirs):
    spec = _load(tmp_path, job_dict(pair_dirs, sites=["resid_post", "mlp_out"]))
    units = plan_job(spec).units
    assert units[0].kind == "cache" and units[0].after == ()
    probes = [u for u in units if u.kind == "probe"]
    assert len(probes) == 2 * 2 * 2  # probe kinds x site kinds x seeds
    assert {(u.params["probe"], u.params["site"], u.seed) for u in probes} == {
        (p, s, k) for p in ("logistic", "diff_means") for s in ("resid_post", "mlp_out") for k in (0, 1)
    }
    assert all(u.after == ("cache",) for u in probes)
    assert len({u.outputs for u in units}) == len(units)


@pytest.mark.parametrize("name", ["probe-job.yaml", "tiny-probe-job.yaml"])
def test_example_job_files_are_valid(name):
    spec = JobSpec.from_file(EXAMPLES / name)
    assert spec.kind == "probe" and spec.probes == ("logistic", "diff_means")
    assert spec.output.is_absolute()
