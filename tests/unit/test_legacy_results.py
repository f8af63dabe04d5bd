"""Results folders saved before the layout moved (types named ``circuits.knob:KnobResult``,
``circuits.faithfulness:CircuitResult`` …, and no ``analysis`` in result.json) keep loading, with the
same numbers, and land on the same pages.

``tests/data/results-before-layout`` holds results written by the demo on SmolLM2 before the move (the
circuit's faithfulness, CMAP groups, residual patching, attribution and the context knob)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelens.faces import catalog
from tunelens.results import MOVED_MODULES, current_type_name, load_result

OLD = Path(__file__).resolve().parents[1] / "data" / "results-before-layout"
FOLDERS = sorted(p.parent for p in OLD.rglob("result.json"))
EXPECTED = {
    "circuit/faithfulness_tuned_all": ("circuits.faithfulness:CircuitResult", "circuit"),
    "circuits/attribution_resid": ("circuits.attribution:AttributionResult", "patching"),
    "circuits/cmap_groups": ("circuits.cmap:CMAPResult", "patching"),
    "circuits/resid_patching": ("circuits.patching_result:PatchingResult", "patching"),
    "knob": ("circuits.knob:KnobResult", "knob"),
}


def test_the_fixture_is_what_it_claims():
    saved = {f.relative_to(OLD).as_posix(): json.loads((f / "result.json").read_text()) for f in FOLDERS}
    assert {name: doc["type"] for name, doc in saved.items()} == {k: v[0] for k, v in EXPECTED.items()}
    assert not any("analysis" in doc for doc in saved.values())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.relative_to(OLD).as_posix())
def test_an_old_folder_loads_with_the_same_numbers(folder):
    doc = json.loads((folder / "result.json").read_text())
    result = load_result(folder)
    module, _, name = current_type_name(doc["type"]).partition(":")
    assert (type(result).__module__, type(result).__name__) == (module, name)
    assert json.loads(json.dumps(result.summary())) == doc["summary"]
    assert result.figure() is not None and len(result.to_frame()) > 0


def test_an_old_folder_lands_on_the_same_pages():
    entries = {e.name: e.analysis for e in catalog.scan(OLD)}
    assert entries == {name: analysis for name, (_, analysis) in EXPECTED.items()}


def test_a_result_saved_now_carries_its_analysis_and_its_new_type(tmp_path):
    result = load_result(OLD / "knob")
    result.save(tmp_path / "knob")
    doc = json.loads((tmp_path / "knob" / "result.json").read_text())
    assert (doc["type"], doc["analysis"]) == ("circuits.knob.analysis:KnobResult", "knob")
    assert load_result(tmp_path / "knob").summary() == result.summary()


def test_every_moved_module_exists_now():
    import importlib

    for new in MOVED_MODULES.values():
        importlib.import_module(new)
