"""Weight-space analyses on the real SmolLM2 pairs (small selections of matrices and parameters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral.graft import GraftConfig, graft, graft_space
from spectral.intruders import IntruderConfig, intruders
from tunelens.models import zoo
from tunelens.weights import MatrixName, read_matrix

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lora_pair():
    return zoo.load_pair("smollm2-et")


def test_intruders_on_smollm2_match_numpy(lora_pair):
    cfg = IntruderConfig(kinds=("v", "down"), layers=(5, 20), baselines=("rank1",))
    res = intruders(lora_pair, cfg)
    assert res.matrices == ("L5.v", "L20.v", "L5.down", "L20.down")
    for row, name in enumerate(res.matrices):
        mn = MatrixName.parse(name)
        with lora_pair.base.active() as m:
            w0 = read_matrix(m, mn).double().numpy()
        with lora_pair.tuned.active() as m:
            wt = read_matrix(m, mn).double().numpy()
        u0 = np.linalg.svd(w0, full_matrices=False)[0]
        ut = np.linalg.svd(wt, full_matrices=False)[0][:, :10]
        np.testing.assert_allclose(res.max_sim[0, row, :10].numpy(), np.abs(ut.T @ u0).max(1), atol=2e-3)
    # a random rank-1 update of the LoRA update's norm lands below the top 10 in SmolLM2's matrices
    assert float(res.update_ratio[1].max()) < 1.0


def test_graft_end_points_and_a_short_graft_on_smollm2():
    pair = zoo.load_pair("smollm2-et-full")
    space = graft_space(pair.base, pair.tuned, kinds=("down",), layers=(29,))
    ids = pair.base.encode(["The apple is in Box F. The cup is in Box Q. Box Q contains the"]).input_ids
    from tunelens.weights import functional_forward

    with torch.no_grad():
        zeros = functional_forward(
            pair.base.module, space.grafted(space.full_mask(False)), input_ids=ids
        ).logits
        assert torch.equal(zeros, pair.base.module(input_ids=ids).logits)
    data = zoo.recipe_data(zoo.entry("smollm2-et-full").recipe, pair.base)
    data = {"train": data["train"], "test": data["test"].subset(range(24))}
    cfg = GraftConfig(sparsities=(1e-2,), steps=1, max_fit=16, max_dev=8, kinds=("down",), layers=(28, 29))
    res = graft(pair, {"entity_tracking": data}, cfg)
    curve = res.curve.set_index("method")
    assert curve.loc["graft", "n_params"] <= curve.loc["top_abs", "n_params"]
    ref = res.reference.set_index("model")
    assert ref.loc["tuned", "accuracy"] > ref.loc["base", "accuracy"]
