"""The circuit study runner end to end on a tiny Gemma-3 pair (BOS, 1 KV head, soft-capping)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from circuits.circuit.groups import GroupSearchConfig
from circuits.studies.entity_tracking import StudySettings
from circuits.studies.runner import PairStudySettings, run_pair_study
from tests.unit.circuits import gemma_toy as toy
from tunelens.errors import ConfigError
from tunelens.results import load_result
from tunelens.tasks import entity_tracking as et


@pytest.fixture(scope="module")
def pair():
    tok = toy.bos_tokenizer()
    base = toy.loaded(toy.gemma_module(len(tok.get_vocab()), seed=0), tok, "gemma-toy-base")
    return toy.perturbed_pair(base, lambda name: "layers" in name, "gemma-toy")


SETTINGS = PairStudySettings(
    study=StudySettings(n_contexts=2, resid_contexts=1, resid_layer_step=1, top_k=2, n_random=2),
    circuit_contexts=2,
    circuit_reference=2,
    circuit_top_k=2,
    circuit_random=1,
    path_contexts=1,
    path_eval_contexts=1,
    search=GroupSearchConfig(top_k=(2, 1, 1, 1), n_candidates=(4, 2, 2, 2)),
)


@pytest.fixture(scope="module")
def run(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-study")
    return out, run_pair_study(pair, out, SETTINGS, progress=lambda _: None)


def test_summary_is_saved_and_json(run):
    out, summary = run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["pair"] == "gemma-toy"
    assert summary["settings"]["study"]["top_k"] == 2


def test_cmap_accuracies_are_those_of_the_hf_forward(pair, run):
    _, summary = run
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=2), seed=0)
    data = ds.encode(pair.tokenizer)
    held_out = torch.arange(len(data.answer_ids)) >= len(data.answer_ids) // 2  # the evaluation half
    for role in ("base", "tuned"):
        logits = toy.hf_logits(pair[role], data.tokens.input_ids)
        rows = torch.arange(len(data.answer_ids))
        last = logits[rows, data.tokens.last]
        win = (last.gather(1, data.candidate_ids).amax(1) <= last[rows, data.answer_ids]).float()
        assert summary["study"]["cmap_groups"][f"{role}_accuracy"] == round(float(win[held_out].mean()), 3)


def test_every_result_reloads(run):
    out, _ = run
    saved = sorted(p.parent for p in out.rglob("result.json"))
    names = {p.name for p in saved}
    assert {"cmap_groups", "cmap_sweep_last", "cmap_sweep_query_label", "resid_patching"} <= names
    assert {"faithfulness_tuned_all", "faithfulness_base_positions"} <= names
    # the paper's circuit pruned at both scopes
    assert {"groups", "minimality", "minimality_positions"} <= names
    assert load_result(out / "circuit" / "minimality_positions").scope == "positions"
    for folder in saved:
        assert load_result(folder).summary()


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="circuit_top_k"):
        PairStudySettings(circuit_top_k=0)
    with pytest.raises(ConfigError, match="path_contexts"):
        PairStudySettings(path_contexts=0)


def test_the_registered_circuits_studies_run_through_the_runner(pair, tmp_path):
    """The SmolLM2 and Gemma studies of the registry are the one runner at their presets; the SmolLM2
    study, at the toy size, runs the patching study and the circuit study."""
    from dataclasses import replace as with_

    from circuits.studies import STUDIES
    from circuits.studies.runner import GEMMA_FULL, SMOLLM2_DEMO, SMOLLM2_FULL

    by_key = {s.key: s for s in STUDIES}
    assert by_key["circuits"].run is by_key["circuits-gemma"].run is run_pair_study
    assert by_key["circuits"].full == SMOLLM2_FULL and by_key["circuits-gemma"].full == GEMMA_FULL
    assert SMOLLM2_FULL.search == GEMMA_FULL.search and SMOLLM2_DEMO.search != GEMMA_FULL.search
    toy_study = with_(by_key["circuits"], full=SETTINGS)
    summary = toy_study(pair, tmp_path, "full", progress=lambda _: None)
    assert set(summary) == {"pair", "settings", "zoo_accuracy", "study", "circuit", "seconds"}
    assert summary["settings"]["study"] == asdict(SETTINGS.study)
    names = {p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("result.json")}
    assert {"circuits/cmap_sweep_last", "circuit/groups", "circuit/minimality_positions"} <= names
