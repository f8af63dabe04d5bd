"""Every analysis on a tiny pair of every declared family, end to end: the circuits study (activation and
attribution patching, CMAP, head groups, path patching, faithfulness, minimality), DCM recovering a planted
head, the entity-tracking probe study, steering during generation, grafting over fused projections."""

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
from tests.unit.families.helpers import perturbed_copy
from tests.unit.families.names import NAMES
from tunelens.backends.base import TokenBatch
from tunelens.generation import generate_with_edit
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import TinyConfig, tiny_family
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et
from tunelens.weights import MatrixName, read_matrix, replace_matrix

CFG = TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=128)


def _loaded(module, tok, name):
    return LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)


def _pair(name, tok) -> ModelPair:
    module = tiny_family(name, CFG, len(tok.get_vocab()), seed=0, sliding_window=6)
    tuned = perturbed_copy(module, 0.05)
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


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "gpt_neox", "phi3"])
def test_grafting_splits_fused_projections_and_its_end_points_are_the_two_models(name, tiny_tok):
    """The graft set holds every matrix of the family (a fused q/k/v or gate/up as one entry per matrix) and
    the norms; the all-ones graft is the tuned model (with what differs outside the graft set, biases and
    embeddings here, left at base) and the all-zeros graft the base, exactly; grafting only the q blocks
    equals writing the tuned q matrices into the base."""
    from spectral.graft import GraftConfig, graft, graft_space
    from tunelens.weights import functional_forward, replace_matrix

    pair = _pair(name, tiny_tok)
    space = graft_space(pair.base, pair.tuned)
    kinds = {kind for _, kind in space.where.values()}
    assert set(pair.base.family.matrix_kinds) | {"norm"} == kinds
    ids = pair.base.encode(["The pen is in Box C. Box C contains the"]).input_ids
    expected = copy.deepcopy(pair.tuned.module)
    base_params = dict(pair.base.module.named_parameters())
    assert space.outside_differ  # the perturbation moved biases and embeddings too
    with torch.no_grad():
        for n, p in expected.named_parameters():
            if n in space.outside_differ:
                p.copy_(base_params[n])
        want_tuned = expected(input_ids=ids).logits
        want_base = pair.base.module(input_ids=ids).logits
        ones = functional_forward(
            pair.base.module, space.grafted(space.full_mask(True)), input_ids=ids
        ).logits
        zeros = functional_forward(
            pair.base.module, space.grafted(space.full_mask(False)), input_ids=ids
        ).logits
    assert torch.equal(ones, want_tuned) and torch.equal(zeros, want_base)
    only_q = {
        n: torch.full_like(space.base[n], space.where[n][1] == "q", dtype=torch.bool) for n in space.names
    }
    by_hand = copy.deepcopy(pair.base.module)
    for layer in range(CFG.n_layers):
        replace_matrix(
            by_hand, MatrixName(layer, "q"), read_matrix(pair.tuned.module, MatrixName(layer, "q"))
        )
    with torch.no_grad():
        got = functional_forward(pair.base.module, space.grafted(only_q), input_ids=ids).logits
        assert torch.allclose(got, by_hand(input_ids=ids).logits, atol=1e-5)
    data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=10), seed=0)
    splits = data.split({"train": 0.6, "test": 0.4}, seed=0)
    res = graft(
        pair, {"entity_tracking": splits}, GraftConfig(sparsities=(1e-2,), steps=2, max_fit=12, max_dev=6)
    )
    assert set(res.curve["method"]) == {"graft", "top_abs", "random"}


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "gemma2", "phi3"])
def test_the_knob_runs_on_a_toy_of_the_family_trained_to_follow_the_intent(name, tiny_tok):
    """The whole knob study (layer sweep, DAS, steering, transfer to the base) on a toy of the family trained
    from scratch to follow "use the context" / "ignore it", against an untrained model of the family."""
    from circuits.knob.analysis import KnobConfig, run_knob
    from circuits.knob.das import DASConfig
    from circuits.knob.steering import steered_choices
    from tests.unit.circuits.knob_toy import toy_items, train_toy
    from tunelens.threads import one_thread

    with one_thread():  # the toy's training depends on float summation order
        toy = train_toy(tiny_tok, family=name)
        base = _loaded(
            tiny_family(name, TinyConfig(n_layers=3), len(tiny_tok.get_vocab()), seed=5), tiny_tok, name
        )
        items = toy_items(40, 11, tiny_tok).split({"knob": 0.5, "test": 0.5}, seed=0)
        cfg = KnobConfig(
            das=DASConfig(epochs=4, lr=0.05),
            dose_ts=(-1.0, 2.0),
            transfer_step=2,
            n_generate=1,
            max_new_tokens=2,
        )
        result = run_knob(ModelPair(base, toy), cfg, items=items)
    s = result.summary()
    assert s["tuned_pair_accuracy"] > s["base_pair_accuracy"]
    assert 0 <= s["knob_layer"] < 3
    assert result.direction.vector.shape == (CFG.d_model,)
    flips = steered_choices(toy, result.direction, items["test"], "prior", 4.0)
    assert flips.shape == (len(items["test"]),)


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "gemma2", "olmo2", "phi3"])
def test_the_atlas_finds_a_planted_write_direction(name, tiny_tok):
    """A rank-1 write ``5·d·vᵀ`` added to layer 1's out-projection: the delta's top write direction in
    residual space is ``G·d`` (``G``: the gain of the norm after attention, Gemma and OLMo-2; else none)."""
    import numpy as np

    from tunelens.directions import Direction
    from tunelens.faces.atlas import AtlasConfig, compute_atlas

    module = tiny_family(name, CFG, len(tiny_tok.get_vocab()), seed=3)
    base = _loaded(module, tiny_tok, f"{name}-base")
    tuned_module = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(4)
    d = torch.nn.functional.normalize(torch.randn(CFG.d_model, generator=gen), dim=0)
    v = torch.nn.functional.normalize(torch.randn(CFG.d_model, generator=gen), dim=0)
    o = MatrixName(1, "o")
    replace_matrix(tuned_module, o, read_matrix(tuned_module, o) + 5 * torch.outer(d, v))
    pair = ModelPair(base, _loaded(tuned_module, tiny_tok, f"{name}-tuned"))
    gain = base.family.norm_gain(module, 1, "o")
    want = d if gain is None else torch.nn.functional.normalize(gain * d, dim=0)
    probe = Direction(site=Site("attn_out", 1), vector=want, name="p")
    res = compute_atlas(pair, AtlasConfig(layer=1, k=2, kinds=("o",)), directions=[probe])
    g = res.geometry
    top = g[(g.matrix == "L1.o") & (g.model == "delta") & (g.direction == "p") & (g["index"] == 1)]
    assert top.abs_cos.iloc[0] > 0.99
    assert np.isfinite(g.abs_cos).all()


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "gemma3_text", "phi3"])
def test_the_live_sweep_runs_and_its_exact_effects_are_patches(name, tiny_tok):
    from circuits.patching.live import live_sweep

    model = _loaded(tiny_family(name, CFG, len(tiny_tok.get_vocab()), seed=6), tiny_tok, name)
    clean = "The pen is in Box C. The cup is in Box D. Box C contains the"
    counter = "The pen is in Box D. The cup is in Box C. Box C contains the"
    res = live_sweep(model, clean, counter, top_k=4)
    assert len(res.sites) == 4 and res.n_sites > 4
    assert torch.isfinite(res.exact).all() and torch.isfinite(res.estimate).all()
