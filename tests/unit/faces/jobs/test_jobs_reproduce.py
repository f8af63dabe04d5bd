"""``tunelens reproduce``: the built-in job list, its dependencies, registered studies only, resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tunelens.errors import JobError
from tunelens.faces import registry
from tunelens.faces.jobs.reproduce import reproduce_plan
from tunelens.faces.jobs.runner import run_plan
from tunelens.faces.jobs.units import Task, Unit, execute
from tunelens.models import zoo


def test_plan_orders_every_unit_after_what_it_needs(tmp_path):
    plan = reproduce_plan(tmp_path)
    ids = [u.id for u in plan.units]
    for u in plan.units:
        assert all(ids.index(a) < ids.index(u.id) for a in u.after), u.id
        for rel in u.outputs:
            assert (tmp_path / rel).resolve().is_relative_to(tmp_path.resolve())
        if u.kind == "zoo" and zoo.entry(u.params["name"]).base:
            assert u.after == (f"zoo-{zoo.entry(u.params['name']).base}",)
    probes = next(u for u in plan.units if u.id == "study-probes")
    assert set(probes.after) == {f"zoo-{m}" for m in zoo.PAIRS["smollm2-et"]}
    assert len({o for u in plan.units for o in u.outputs}) == sum(len(u.outputs) for u in plan.units)
    studies = {u.params["study"] for u in plan.units if u.kind == "study"}
    assert (
        studies <= set(registry.STUDIES)
        and {"environment", "probes", "circuits", "spectral", "knob"} <= studies
    )
    for s in registry.STUDIES.values():  # every study names a zoo pair and zoo models
        assert s.pair is None or s.pair in zoo.PAIRS
        assert all(m in zoo.names() for m in s.models)
    spectral = next(u for u in plan.units if u.id == "study-spectral")
    assert {f"zoo-{m}" for m in registry.study("spectral").models} <= set(spectral.after)


@pytest.mark.parametrize("name", ["os:system", "circuits.knob.analysis:run_knob", "nope", ""])
def test_a_study_unit_runs_only_a_registered_study(tmp_path, name):
    unit = Unit(id="study-x", kind="study", params={"study": name, "pair": None}, outputs=("x",))
    with pytest.raises(JobError, match=r"unknown study .*known: environment, probes"):
        execute(Task(root=str(tmp_path), unit=unit.to_dict()))


def test_only_selects_a_study_and_what_it_needs(tmp_path):
    plan = reproduce_plan(tmp_path, ["probes"])
    assert [u.id for u in plan.units] == ["zoo-smollm2", "zoo-smollm2-et-lora-r8", "study-probes"]
    with pytest.raises(JobError, match=r"no study or unit 'probs'.*probes"):
        reproduce_plan(tmp_path, ["probs"])


def test_reproduce_runs_resumes_and_redoes_a_changed_study(tmp_path, capsys):
    from tunelens.faces.cli import main

    out = tmp_path / "repro"
    assert main(["reproduce", "--only", "environment", "--out", str(out)]) == 0
    assert "1 units run" in capsys.readouterr().out
    env = json.loads((out / "environment" / "environment.json").read_text())
    import torch

    assert env["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert main(["reproduce", "--only", "environment", "--out", str(out)]) == 0
    assert "0 units run, 1 already done" in capsys.readouterr().out
    # A later version changes the study (its parameters): the reproduce folder is not refused, the
    # study is redone.
    plan = reproduce_plan(out, ["environment"])
    unit = replace(plan.units[0], params={**plan.units[0].params, "version": 2})
    report = run_plan(replace(plan, units=(unit,)))
    assert report.done == ["study-environment"]


def test_cli_reproduce_unknown_study_is_one_line(tmp_path, capsys):
    from tunelens.faces.cli import main

    assert main(["reproduce", "--only", "nothing", "--out", str(Path(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunelens: error: reproduce --only: no study") and "\n" not in err


def test_a_zoo_unit_writes_its_record_into_a_fresh_job_folder(tmp_path):
    """The zoo record goes to ``OUT/zoo/NAME.json``; the folder did not exist before the first unit (a
    worker creates the folders of every unit's declared outputs)."""
    unit = Unit(id="zoo-tiny", kind="zoo", params={"name": "tiny"}, outputs=("zoo/tiny.json",))
    summary = execute(Task(root=str(tmp_path / "fresh"), unit=unit.to_dict()))["summary"]
    record = json.loads((tmp_path / "fresh" / "zoo" / "tiny.json").read_text())
    assert record["name"] == summary["name"] == "tiny"
