"""Grafting on tiny models: exactness of the end points, masks at the stated sparsity, overlaps and
calibration against independent computations, and clear errors for incomparable pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral.graft import GraftConfig, GraftResult, evaluate, graft, graft_space, top_mask
from tunelens.errors import ConfigError, PairIncompatibleError, TaskError
from tunelens.metrics import ece
from tunelens.readout import answer_accuracy
from tunelens.tasks import entity_tracking as et


def logits(model, params, ids):
    from tunelens.weights import functional_forward

    with model.active() as module:
        return functional_forward(module, params, input_ids=ids).logits


@pytest.fixture(scope="module")
def ids(tiny_tok):
    ds = et.generate(et.EntityTrackingConfig(n_contexts=4), seed=0)
    return ds.encode(tiny_tok).tokens.input_ids


def test_all_ones_is_tuned_and_all_zeros_is_base_exactly(graft_pair, ids):
    space = graft_space(graft_pair.base, graft_pair.tuned)
    assert space.outside_differ == []
    ones = logits(graft_pair.base, space.grafted(space.full_mask(True)), ids)
    zeros = logits(graft_pair.base, space.grafted(space.full_mask(False)), ids)
    with torch.no_grad():
        assert torch.equal(ones, graft_pair.tuned.module(input_ids=ids).logits)
        assert torch.equal(zeros, graft_pair.base.module(input_ids=ids).logits)


def test_lora_pair_end_points(tiny_lora_pair, ids):
    pair = tiny_lora_pair
    space = graft_space(pair.base, pair.tuned)
    # only the adapted matrices differ; norms are shared
    assert {n.split(".")[-2] for n, d in space.delta.items() if d.abs().max() > 0} == {
        "q_proj",
        "v_proj",
        "o_proj",
        "down_proj",
    }
    with torch.no_grad():
        zeros = logits(pair.base, space.grafted(space.full_mask(False)), ids)
        ones = logits(pair.base, space.grafted(space.full_mask(True)), ids)
        with pair.base.active() as m:
            assert torch.equal(zeros, m(input_ids=ids).logits)
        with pair.tuned.active() as m:
            torch.testing.assert_close(ones, m(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_parameter_names_must_match(tiny_model, tiny_gemma_model):
    with pytest.raises(PairIncompatibleError, match="only in the"):
        graft_space(tiny_model, tiny_gemma_model)


def test_top_mask_is_exact_and_global():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(5, 7, generator=gen), "b": torch.randn(11, generator=gen)}
    mask = top_mask(scores, 9)
    flat = np.concatenate([scores["a"].numpy().ravel(), scores["b"].numpy().ravel()])
    expected = np.zeros(flat.size, bool)
    expected[np.argsort(-flat)[:9]] = True
    got = np.concatenate([mask["a"].numpy().ravel(), mask["b"].numpy().ravel()])
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ConfigError):
        top_mask(scores, 100)


def test_evaluate_matches_independent_accuracy_and_ece(graft_pair, tiny_tok):
    enc = et.generate(et.EntityTrackingConfig(n_contexts=10), seed=1).encode(tiny_tok)
    got = evaluate(graft_pair.tuned, None, enc)
    acc, _ = answer_accuracy(graft_pair.tuned.module, enc)
    assert got["accuracy"] == pytest.approx(acc)
    with torch.no_grad():
        last = graft_pair.tuned.module(
            input_ids=enc.tokens.input_ids, attention_mask=enc.tokens.attention_mask
        ).logits[torch.arange(len(enc)), enc.tokens.last]
    cand = last.gather(1, enc.candidate_ids).softmax(-1)
    label = (enc.candidate_ids == enc.answer_ids[:, None]).int().argmax(1)
    assert got["ece"] == pytest.approx(ece(cand, label), abs=1e-6)


def test_two_task_graft_invariants(graft_pair, tmp_path):
    data = {
        "a": et.generate(et.EntityTrackingConfig(n_contexts=12), seed=2).split(
            {"train": 0.6, "test": 0.4}, seed=0
        ),
        "b": et.generate(et.EntityTrackingConfig(n_contexts=12), seed=3).split(
            {"train": 0.6, "test": 0.4}, seed=0
        ),
    }
    cfg = GraftConfig(sparsities=(0.02,), steps=2, max_fit=16, max_dev=8, step_size=20.0)
    res = graft(graft_pair, data, cfg)
    space = graft_space(graft_pair.base, graft_pair.tuned)
    n_keep = round(0.02 * space.n_params)
    curve = res.curve.set_index(["task", "method"])
    assert (curve.xs("random", level="method").n_params == n_keep).all()
    assert (curve.xs("top_abs", level="method").n_params == n_keep).all()
    assert (curve.xs("graft", level="method").n_params <= n_keep).all()
    # overlap and per-layer counts recomputed from the stored masks
    a, b = set(res.masks["a@0.02"].tolist()), set(res.masks["b@0.02"].tolist())
    row = res.overlap.iloc[0]
    assert row.intersection == len(a & b)
    assert row.over_min == pytest.approx(len(a & b) / min(len(a), len(b)))
    assert row.jaccard == pytest.approx(len(a & b) / len(a | b))
    # what each mask learned beyond the shared top-|Δθ| start (recomputed with the same seeded tie-break)
    start_mask = top_mask(
        {n: space.delta[n].abs() for n in space.names}, n_keep, torch.Generator().manual_seed(cfg.seed)
    )
    start = set(torch.cat([start_mask[n].reshape(-1) for n in space.names]).nonzero().flatten().tolist())
    la, lb = a - start, b - start
    assert (row.learned_a, row.learned_b) == (len(la), len(lb))
    assert row.start_share_a == pytest.approx(len(a & start) / len(a))
    assert row.learned_overlap == pytest.approx(len(la & lb) / max(1, min(len(la), len(lb))))
    assert row.learned_random_expected == pytest.approx(max(len(la), len(lb)) / (space.n_params - len(start)))
    lm = res.layer_map
    assert int(lm[lm.task == "a"].n_grafted.sum()) == len(a) == int(curve.loc[("a", "graft"), "n_params"])
    assert len(res.cross) == 4
    # the base/tuned reference rows are the end points of the graft
    ref = res.reference.set_index(["task", "model"])
    assert ref.loc[("a", "tuned"), "accuracy"] == pytest.approx(
        evaluate(graft_pair.tuned, None, data["a"]["test"].encode(graft_pair.tokenizer))["accuracy"]
    )
    loaded = GraftResult.load(res.save(tmp_path / "graft"))
    assert loaded.summary() == res.summary()
    for view in ("curve", "ece", "layers", "overlap"):
        assert res.figure(view).layout.title.text


def test_graft_bad_config_and_data(graft_pair):
    with pytest.raises(ConfigError, match="sparsity"):
        GraftConfig(sparsities=(0.0,))
    with pytest.raises(ConfigError, match="unknown kind"):
        GraftConfig(kinds=("attn",))
    with pytest.raises(ConfigError, match="step_clip"):
        GraftConfig(step_clip=0.0)
    with pytest.raises(TaskError, match="train"):
        graft(graft_pair, {"a": {"test": et.generate(et.EntityTrackingConfig(n_contexts=2), seed=0)}})
    with pytest.raises(ConfigError, match="empty"):
        graft_space(graft_pair.base, graft_pair.tuned, layers=(7,))


def test_differing_embeddings_are_named_outside_the_graft_set_or_grafted_when_asked(graft_pair):
    import copy

    from tunelens.models.loaded import LoadedModel, ModelSource

    module = copy.deepcopy(graft_pair.tuned.module)
    with torch.no_grad():
        module.get_input_embeddings().weight.add_(0.01)
    tuned = LoadedModel(
        module, graft_pair.tokenizer, source=ModelSource(kind="memory", location="e"), name="e"
    )
    space = graft_space(graft_pair.base, tuned)
    emb = [n for n in space.outside_differ if "embed_tokens" in n]
    assert emb and not any("embed_tokens" in n for n in space.names)
    with_emb = graft_space(
        graft_pair.base, tuned, kinds=("q", "k", "v", "o", "gate", "up", "down", "norm", "embedding")
    )
    assert emb[0] in with_emb.names and with_emb.outside_differ == []
