"""Faithfulness by mean ablation against an independent implementation (HF forward pre-hooks on o_proj,
numpy means), and the bookkeeping of the chance correction and the random control."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from circuits.circuit.faithfulness import chance_level, faithfulness, mean_z, random_circuit
from circuits.circuit.result import CircuitResult
from circuits.patching.metrics import Answers
from tests.unit.circuits.conftest import induction_data
from tunelens.errors import ConfigError, SiteError
from tunelens.results import load_result


@pytest.fixture(scope="module")
def data(tiny_tok):
    clean, _ = induction_data(tiny_tok, n=6, seed=0)
    reference, _ = induction_data(tiny_tok, n=8, seed=1)
    return clean, reference


def _o_proj_inputs(model, ids) -> list[np.ndarray]:
    """Per layer, the o_proj input (batch pos head*d_head) from plain HF forward hooks."""
    got: list[np.ndarray] = []
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a: got.append(a[0].detach().numpy().copy())
        )
        for layer in model.hf.model.layers
    ]
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


def _reference_logits(model, data, reference, keep) -> torch.Tensor:
    """Last-position logits with every o_proj input replaced by the numpy mean except the kept heads."""
    means = [z.mean(axis=0) for z in _o_proj_inputs(model, reference.tokens.input_ids)]  # pos (head d)
    dh = model.dims.d_head

    def make(layer):
        def pre(_m, args):
            x = args[0].clone()
            out = torch.tensor(means[layer])[None].expand_as(x).clone()
            for lay, head, pos in keep:
                if lay == layer:
                    sl = slice(head * dh, (head + 1) * dh)
                    out[:, pos, sl] = x[:, pos, sl]
            return (out,)

        return pre

    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(make(i))
        for i, layer in enumerate(model.hf.model.layers)
    ]
    try:
        with torch.no_grad():
            return model.hf(input_ids=data.tokens.input_ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


def test_mean_z_is_the_numpy_mean(induction_model, data):
    _, reference = data
    got = mean_z(induction_model, reference)
    ref = _o_proj_inputs(induction_model, reference.tokens.input_ids)
    for layer, z in enumerate(ref):
        want = z.mean(axis=0).reshape(z.shape[1], 4, -1)
        np.testing.assert_allclose(got.per_pos[layer].numpy(), want, atol=1e-5)


def test_circuit_accuracy_equals_an_independent_ablation(induction_model, data):
    clean, reference = data
    keep = [(1, 0, 30), (1, 3, 30), (0, 2, 29)]
    res = faithfulness(
        induction_model, clean, {"a": keep[:2], "b": keep[2:]}, reference=reference, n_random=3
    )
    logits = _reference_logits(induction_model, clean, reference, keep)
    answers = Answers.from_encoded(clean)
    cand = logits.gather(1, answers.candidates)
    acc = (cand.argmax(1) == 0).float().mean()  # the answer is the first candidate
    ld = (cand[:, 0] - cand[:, 1]).mean()
    assert res.acc_circuit == pytest.approx(float(acc))
    assert res.logit_diff_circuit == pytest.approx(float(ld), abs=1e-4)
    assert res.logit_diff_circuit != pytest.approx(res.logit_diff_full, abs=1e-2)  # ablation did something
    assert res.chance == 0.5
    f = (res.acc_circuit - 0.5) / (res.acc_full - 0.5)
    assert res.faithfulness == pytest.approx(f)
    assert len(res.acc_random) == 3


def test_the_whole_model_as_circuit_is_fully_faithful(induction_model, data):
    clean, reference = data
    every = [(lay, h, "all") for lay in range(2) for h in range(4)]
    res = faithfulness(induction_model, clean, {"all": every}, reference=reference, n_random=0)
    assert res.acc_full > 0.5
    assert res.acc_circuit == res.acc_full and res.faithfulness == 1.0
    assert res.logit_diff_circuit == pytest.approx(res.logit_diff_full, abs=1e-5)


def test_random_circuits_match_the_shape_and_avoid_the_circuit():
    groups = {"a": [(0, 1, "last"), (1, 2, "last")], "b": [(1, 0, 3)]}
    rng = random.Random(0)
    for _ in range(20):
        rc = random_circuit(groups, 2, 4, rng)
        assert [len(v) for v in rc.values()] == [2, 1]
        assert [p for _, _, p in rc["a"]] == ["last", "last"] and rc["b"][0][2] == 3
        heads = {(lay, h) for g in rc.values() for lay, h, _ in g}
        assert len(heads) == 3 and not heads & {(0, 1), (1, 2), (1, 0)}
    with pytest.raises(ConfigError, match="no random control"):
        random_circuit({"x": [(0, h, 0) for h in range(5)]}, 2, 4, rng)


def test_result_roundtrip_and_errors(induction_model, data, tmp_path):
    clean, reference = data
    res = faithfulness(induction_model, clean, {"a": [(1, 0, "last")]}, reference=reference, n_random=2)
    back = load_result(res.save(tmp_path / "c"), expect=CircuitResult)
    assert back.faithfulness == pytest.approx(res.faithfulness, nan_ok=True)
    assert res.figure().data[0].type == "bar" and len(res.to_frame()) == 1
    with pytest.raises(ConfigError, match="at least one head"):
        faithfulness(induction_model, clean, {}, reference=reference)
    with pytest.raises(SiteError, match="does not exist"):
        faithfulness(induction_model, clean, {"a": [(5, 0, "last")]}, reference=reference)
    with pytest.raises(ConfigError, match="unknown position"):
        faithfulness(induction_model, clean, {"a": [(1, 0, "nowhere")]}, reference=reference)
    with pytest.raises(ConfigError, match="candidate answers"):
        chance_level(Answers(answer=torch.tensor([1])))


def test_positions_scope_ablates_only_the_circuit_positions(induction_model, data):
    clean, reference = data
    keep = [(1, 0, 30)]
    res = faithfulness(
        induction_model, clean, {"a": keep}, reference=reference, n_random=0, scope="positions"
    )
    # independent: every position except 30 keeps all heads; at 30 only head (1, 0)
    every = [(lay, h, p) for lay in range(2) for h in range(4) for p in range(30)] + keep
    ref = faithfulness(induction_model, clean, {"a": every}, reference=reference, n_random=0)
    assert res.logit_diff_circuit == pytest.approx(ref.logit_diff_circuit, abs=1e-5)
    with pytest.raises(ConfigError, match="scope"):
        faithfulness(induction_model, clean, {"a": keep}, reference=reference, scope="some")
