"""Intruder dimensions on tiny models: a planted intruder is found, nothing is found for an unchanged model,
LoRA factors give the same answers as the merged weights, and bad input fails clearly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spectral.engine import read_stack, run_pass, select_names
from spectral.intruders import IntruderConfig, intruder_family, intruders, scaled_intruders
from spectral.spectra import spectra
from tests.conftest import make_tiny
from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.tiny import TinyConfig
from tunelens.weights import MatrixName, read_matrix, replace_matrix

PLANT = MatrixName(1, "v")  # 32 x 64 in the tiny model


def planted(base: LoadedModel, strength: float = 3.0) -> tuple[LoadedModel, torch.Tensor]:
    """``base`` plus a rank-1 update in the span of the bottom 16 singular vectors of ``PLANT`` (so it is
    orthogonal to the top ones), ``strength`` times the largest singular value: the top tuned vector."""
    w0 = read_matrix(base.module, PLANT).double()
    u, s, vt = torch.linalg.svd(w0, full_matrices=False)
    x = u[:, -16:].sum(1) / 4.0  # equal weight 1/4 on 16 base vectors: best match 1/4 before the spike
    y = vt[-16:].sum(0) / 4.0
    module = copy.deepcopy(base.module)
    replace_matrix(module, PLANT, (w0 + strength * s[0] * torch.outer(x, y)).float())
    tuned = LoadedModel(
        module, base.tokenizer, source=ModelSource(kind="memory", location="planted"), name="planted"
    )
    return tuned, x.float()


@pytest.fixture(scope="module")
def base(tiny_tok):
    return make_tiny(tiny_tok, name="tiny-base")


def test_planted_intruder_is_found_and_only_it(base):
    tuned, x = planted(base)
    res = intruder_family(base, {"planted": tuned, "same": base}, IntruderConfig(k=10, epsilon=0.5))
    flags = res.is_intruder()
    i = res.variants.index("planted")
    row = res.matrices.index(str(PLANT))
    assert flags[i].sum() == 1 and bool(flags[i, row, 0])  # the top singular vector of L1.v, nothing else
    assert res.counts()["same"] == 0 and res.counts(k=20, epsilon=0.9)["same"] == 0
    # the found vector is x (checked independently with numpy)
    wt = read_matrix(tuned.module, PLANT).double().numpy()
    u_np = np.linalg.svd(wt)[0][:, 0]
    assert abs(float(u_np @ x.double().numpy())) > 0.99
    w0 = read_matrix(base.module, PLANT).double().numpy()
    best_np = np.abs(u_np @ np.linalg.svd(w0, full_matrices=False)[0]).max()
    assert float(res.max_sim[i, row, 0]) == pytest.approx(best_np, abs=1e-3)
    assert best_np < 0.5
    # a weak spike (below the top k) is not an intruder at k = 10
    weak, _ = planted(base, strength=0.01)
    assert intruders_count(base, weak) == 0


def intruders_count(base, tuned) -> int:
    return intruder_family(base, {"t": tuned}, IntruderConfig(baselines=())).counts()["t"]


def test_max_similarity_matches_numpy_for_every_matrix(base):
    tuned, _ = planted(base)
    res = intruder_family(base, {"planted": tuned}, IntruderConfig(baselines=(), k=5, k_max=5))
    for row, name in enumerate(res.matrices):
        mn = MatrixName.parse(name)
        u0 = np.linalg.svd(read_matrix(base.module, mn).double().numpy(), full_matrices=False)[0]
        ut = np.linalg.svd(read_matrix(tuned.module, mn).double().numpy(), full_matrices=False)[0][:, :5]
        expected = np.abs(ut.T @ u0).max(1)
        np.testing.assert_allclose(res.max_sim[0, row].numpy(), expected, atol=5e-3, err_msg=name)


def test_baselines_and_sweeps(base):
    tuned, _ = planted(base)
    res = intruder_family(base, {"planted": tuned}, IntruderConfig())
    assert set(res.variants) == {"planted", "rotated:planted", "rank1:planted"}
    counts = res.counts()
    # random updates with the same spectrum displace the top direction too (in 32 dimensions a random unit
    # vector's best match with an orthonormal basis is about 0.5, so count at a looser threshold)
    row = res.matrices.index(str(PLANT))
    for v in ("rotated:planted", "rank1:planted"):
        assert float(res.max_sim[res.variants.index(v), row, 0]) < 0.6
        assert res.counts(epsilon=0.7)[v] >= 1
    sweep = res.sweep()
    mono = sweep[sweep.variant == "planted"].pivot(index="k", columns="epsilon", values="intruders")
    assert (np.diff(mono.values, axis=1) >= 0).all() and (np.diff(mono.values, axis=0) >= 0).all()
    frame = res.to_frame()
    assert int(frame[(frame.variant == "planted")].intruder.sum()) == counts["planted"]
    assert res.heatmap_matrix == str(PLANT)
    for view in ("epsilon", "heatmap", "layer", "rank"):
        assert res.figure(view).layout.title.text


def test_scaling_intruders_removes_the_spike_and_restores(base):
    tuned, x = planted(base)
    w0 = read_matrix(base.module, PLANT)
    wt = read_matrix(tuned.module, PLANT)
    with scaled_intruders(tuned, {PLANT: x[:, None]}, 0.0):
        w_mid = read_matrix(tuned.module, PLANT)
    # the same projection summed in another order; entries are O(0.1), float32 rounding ~1e-8
    torch.testing.assert_close(w_mid, wt - torch.outer(x, x @ wt), atol=1e-6, rtol=0)
    # the spike is gone: what is left of the update is W0's own (small) component along x
    assert float((w_mid - w0).norm()) < 0.2 * float((wt - w0).norm())
    with scaled_intruders(tuned, {PLANT: x[:, None]}, 1.0):
        torch.testing.assert_close(read_matrix(tuned.module, PLANT), wt)
    assert torch.equal(read_matrix(tuned.module, PLANT), wt)


def test_lora_factors_agree_with_merged_weights(tiny_lora_pair):
    pair = tiny_lora_pair
    merged = copy.deepcopy(pair.tuned.module).merge_and_unload()
    merged_view = LoadedModel(
        merged, pair.tokenizer, source=ModelSource(kind="memory", location="m"), name="m"
    )
    names = select_names(pair.dims.n_layers, ("v", "down"))
    via_factors = run_pass(pair.base, {"t": pair.tuned}, names, k_max=3)
    via_dense = run_pass(pair.base, {"t": merged_view}, names, k_max=3)
    np.testing.assert_allclose(via_factors.delta_sigma["t"], via_dense.delta_sigma["t"], atol=1e-4)
    np.testing.assert_allclose(via_factors.max_sim["t"], via_dense.max_sim["t"], atol=1e-3)
    delta = read_stack(merged_view, names[:1]) - read_stack(pair.base, names[:1])
    s_np = np.linalg.svd(delta[0].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(via_factors.delta_sigma["t"][0, : len(s_np)], s_np, atol=1e-5)
    res = spectra(pair.base, {"t": pair.tuned})
    er = res.to_frame().set_index("matrix").effective_rank
    assert er["L0.k"] == 0.0  # not adapted
    assert 1.0 <= er["L0.v"] <= 4.0  # rank-4 adapter
    assert res.figure().layout.title.text and res.figure("spectrum", "L0.v").layout.title.text


def test_result_round_trip(base, tmp_path):
    tuned, _ = planted(base)
    res = intruder_family(base, {"planted": tuned}, IntruderConfig(baselines=()))
    loaded = type(res).load(res.save(tmp_path / "intr"))
    assert loaded.counts() == res.counts() and loaded.matrices == res.matrices


def test_bad_input(base, tiny_tok):
    with pytest.raises(ConfigError, match="epsilon"):
        IntruderConfig(epsilon=0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        IntruderConfig(epsilon=1.5)
    with pytest.raises(ConfigError, match="k must be"):
        IntruderConfig(k=0)
    with pytest.raises(ConfigError, match="larger than the rank"):
        intruder_family(base, {"same": base}, IntruderConfig(k=40))  # k/v matrices are 32 x 64
    other = make_tiny(tiny_tok, cfg=TinyConfig(n_layers=2, d_mlp=96), name="wider-mlp")
    with pytest.raises(PairIncompatibleError, match="shape"):
        intruder_family(base, {"other": other}, IntruderConfig(kinds=("gate",)))
    res = intruder_family(base, {"same": base}, IntruderConfig(baselines=()))
    with pytest.raises(ConfigError, match="k_max"):
        res.counts(k=50)


def test_pair_entry_point(tiny_pair):
    res = intruders(tiny_pair, IntruderConfig(baselines=("rank1",)))
    assert res.variants == (tiny_pair.tuned.name, f"rank1:{tiny_pair.tuned.name}")
    assert res.summary()["k"] == 10


def test_tradeoff_rows_against_direct_evaluation(base, tiny_tok):
    from spectral.drift import GeneralTextConfig, base_samples, continuation_loss
    from spectral.intruders import intruder_tradeoff
    from tunelens.readout import answer_accuracy
    from tunelens.tasks import entity_tracking as et

    tuned, _ = planted(base)
    res, out = intruder_family(base, {"p": tuned}, IntruderConfig(baselines=()), keep_vectors=True)
    task = et.generate(et.EntityTrackingConfig(n_contexts=6), seed=0).encode(tiny_tok)
    general = base_samples(base, GeneralTextConfig(n_prompts=3, new_tokens=8))
    assert 0 < int(general.score_mask.sum()) <= 3 * 8  # sampling may stop early at the end-of-text token
    res = intruder_tradeoff(res, out, {"p": tuned}, task, general, lambdas=(0.0, 1.0), epsilons=(0.5, 0.01))
    df = res.tradeoff.set_index(["epsilon", "lambda"])
    plain = (answer_accuracy(tuned.module, task)[0], continuation_loss(tuned.module, general))
    assert (df.loc[(0.5, 1.0), "accuracy"], df.loc[(0.5, 1.0), "general_loss"]) == pytest.approx(plain)
    assert df.loc[(0.01, 0.0), "n_directions"] == 0  # nothing is that dissimilar: the unmodified model
    assert df.loc[(0.01, 0.0), "general_loss"] == pytest.approx(plain[1])
    assert df.loc[(0.5, 0.0), "n_directions"] == 1
    assert df.loc[(0.5, 0.0), "general_loss"] != pytest.approx(plain[1])
    # the loss is the mean cross-entropy of the sampled tokens, recomputed by hand
    with torch.no_grad():
        logits = tuned.module(input_ids=general.input_ids, attention_mask=general.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(2, general.input_ids[:, 1:, None])[..., 0]
    m = general.score_mask[:, 1:].bool()
    assert float(-logp[m].mean()) == pytest.approx(plain[1], rel=1e-5)
    assert res.figure("tradeoff").layout.title.text
