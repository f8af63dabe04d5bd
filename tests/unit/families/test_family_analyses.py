"""Every analysis on a tiny pair of every declared family, end to end: the circuits study (activation and
attribution patching, CMAP, head groups, path patching, faithfulness, minimality), DCM recovering a planted
head, the entity-tracking probe study, steering during generation, grafting (or its refusal)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from circuits.circuit.dcm import DCMConfig, dcm
from circuits.studies.runner import TOY, run_pair_study
from probes.config import ProbeConfig
from probes.studies.entity_tracking import entity_tracking_study
from probes.studies.settings import EntityTrackingSettings
from tests.unit.families.names import NAMES
from tunelens.backends.base import TokenBatch
from tunelens.errors import ConfigError
from tunelens.generation import generate_with_edit
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import TinyConfig, tiny_family
from tunelens.sites import Site
from tunelens.weights import MatrixName, read_matrix, replace_matrix

CFG = TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=128)


def _loaded(module, tok, name):
    return LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)


def _pair(name, tok) -> ModelPair:
    module = tiny_family(name, CFG, len(tok.get_vocab()), seed=0, sliding_window=6)
    tuned = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return ModelPair(_loaded(module, tok, f"{name}-base"), _loaded(tuned, tok, f"{name}-tuned"))


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return all(_finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


@pytest.mark.parametrize("name", NAMES)
def test_the_circuits_study_and_the_probe_study_run(name, tiny_tok, tmp_path):
    pair = _pair(name, tiny_tok)
    summary = run_pair_study(pair, tmp_path, TOY, progress=lambda _: None)
    assert {"resid_patching", "cmap_sweep_last", "cmap_groups"} <= set(summary["study"])
    assert _finite(summary["study"])  # (a circuit's faithfulness ratio is 0/0 on a random model: NaN)
    assert {"faithfulness_tuned_positions", "path_circuit"} <= set(summary["circuit"])
    assert len(list(tmp_path.rglob("*.json"))) >= 5  # the saved Results
    settings = EntityTrackingSettings(n_contexts=12, batch_size=12, probe=ProbeConfig(min_test_items=5))
    res = entity_tracking_study(pair, settings)
    assert res.summary()  # probes fitted on every layer of both models


@pytest.mark.parametrize("name", NAMES)
def test_dcm_finds_a_planted_head(name, tiny_tok):
    """Head 2 of layer 1 has its output-projection columns scaled until it decides the last position (and,
    where a norm after attention would undo that scale, Gemma and OLMo-2, that norm's gain too); DCM trained
    to realise the source run's answer must select exactly that head."""
    module = tiny_family(name, CFG, len(tiny_tok.get_vocab()), seed=5)
    model = _loaded(module, tiny_tok, name)
    o = MatrixName(1, "o")
    w = read_matrix(module, o)
    d = CFG.d_model // CFG.n_heads
    w[:, 2 * d : 3 * d] *= 300
    replace_matrix(module, o, w)
    fam = model.family
    if fam.attn_add != fam.attention:
        norm = fam.module(module, 1, fam.attn_add)
        with torch.no_grad():
            norm.weight.copy_(300 * (norm.weight + fam.norm_offset) - fam.norm_offset)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 80, (2, 96, 8), generator=gen)
    mask = torch.ones(96, 8, dtype=torch.long)
    base, source = (TokenBatch(input_ids=i, attention_mask=mask) for i in ids)
    with torch.no_grad():
        want = model.logits(source)[:, -1].argmax(-1)
        keep = model.logits(base)[:, -1].argmax(-1) != want
    heads = [(lay, h) for lay in range(2) for h in range(4)]
    res = dcm(
        model, base.select(keep), source.select(keep), want[keep], heads=heads, position=7,
        config=DCMConfig(epochs=15, batch_size=16, lam=0.05),
    )  # fmt: skip
    assert res.selected == [(1, 2)]


@pytest.mark.parametrize("name", NAMES)
def test_steering_during_generation(name, tiny_tok):
    model = _loaded(tiny_family(name, CFG, len(tiny_tok.get_vocab()), seed=2), tiny_tok, name)
    prompt = "The pen is in Box C. Box C contains the"
    plain = model.generate(prompt, max_new_tokens=6)
    same = generate_with_edit(model, prompt, Site("resid_post", 0), lambda h: h, max_new_tokens=6)
    assert same == plain
    push = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(3)) * 50
    moved = generate_with_edit(model, prompt, Site("resid_pre", 1), lambda h: h + push, max_new_tokens=6)
    assert moved != plain


@pytest.mark.parametrize("name", ["qwen2", "olmo2", "gpt2", "gpt_neox", "phi3"])
def test_grafting_runs_or_is_refused_by_name(name, tiny_tok):
    from spectral.graft import graft_space

    pair = _pair(name, tiny_tok)
    if name in ("gpt2", "gpt_neox", "phi3"):
        with pytest.raises(ConfigError, match=rf"grafting maps parameters to matrices.*{name} stores"):
            graft_space(pair.base, pair.tuned)
        return
    space = graft_space(pair.base, pair.tuned)
    kinds = {n.rsplit(".", 2)[-2] for n in space.names}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= kinds
