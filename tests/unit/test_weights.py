"""Tests of tunelens.weights on a tiny random Llama and a LoRA-wrapped copy of it."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tunelens.dims import ModelDims
from tunelens.errors import ConfigError, PairIncompatibleError, ShapeError
from tunelens.models.tiny import TinyConfig, tiny_llama
from tunelens.weights import (
    MATRIX_KINDS,
    LoraFactors,
    MatrixName,
    content_hash,
    functional_forward,
    hf_param_name,
    lora_factors,
    matrix_name_of,
    matrix_names,
    read_all,
    read_matrix,
    replace_matrix,
    swapped_matrices,
    trainable_params,
    weight_delta,
)

LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    cfg = TinyConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, n_ctx=64)
    return tiny_llama(cfg, vocab_size=64, seed=0)


@pytest.fixture(scope="module")
def peft_model(model):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _linear(model, name: MatrixName) -> torch.nn.Linear:
    layer = model.model.layers[name.layer]
    block = layer.self_attn if name.kind in ("q", "k", "v", "o") else layer.mlp
    return getattr(block, f"{name.kind}_proj")


# ------------------------------------------------------------------------------------------------ names


def test_matrix_names_cover_every_layer_and_kind(model):
    names = matrix_names(model)
    assert len(names) == 2 * 7
    assert names == matrix_names(ModelDims.from_hf_config(model.config))
    assert names[:7] == [MatrixName(0, k) for k in MATRIX_KINDS]
    assert sorted(reversed(names)) == names


def test_str_parse_and_param_names_round_trip(model):
    param_names = {n for n, _ in model.named_parameters()}
    for name in matrix_names(model):
        assert MatrixName.parse(str(name)) == name
        assert hf_param_name(name) in param_names
        assert matrix_name_of(hf_param_name(name)) == name
    assert str(MatrixName(5, "q")) == "L5.q"
    assert hf_param_name(MatrixName(5, "down")) == "model.layers.5.mlp.down_proj.weight"
    peft_name = "base_model.model.model.layers.5.self_attn.q_proj.base_layer.weight"
    assert matrix_name_of(peft_name) == MatrixName(5, "q")
    assert matrix_name_of("base_model.model.model.layers.5.self_attn.q_proj.lora_A.default.weight") is None
    assert matrix_name_of("model.embed_tokens.weight") is None
    assert matrix_name_of("model.layers.1.mlp.q_proj.weight") is None


@pytest.mark.parametrize("text", ["L5.x", "L1.query"])
def test_unknown_kind_lists_valid_kinds(text):
    with pytest.raises(ConfigError, match="gate, up, down"):
        MatrixName.parse(text)


@pytest.mark.parametrize("text", ["5.q", "Lq", ""])
def test_unparseable_name(text):
    with pytest.raises(ConfigError, match="L<layer>"):
        MatrixName.parse(text)


def test_negative_layer_rejected():
    with pytest.raises(ConfigError, match="layer >= 0"):
        MatrixName(-1, "q")


# ------------------------------------------------------------------------------------------------ reading


def test_read_matrix_equals_module_weight(model):
    for name in matrix_names(model):
        got = read_matrix(model, name)
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, _linear(model, name).weight)
    assert read_matrix(model, MatrixName(1, "q")).shape == (32, 32)
    assert read_matrix(model, MatrixName(1, "k")).shape == (16, 32)  # 2 kv heads × d_head 8
    assert read_matrix(model, MatrixName(1, "down")).shape == (32, 64)


def test_read_matrix_is_a_copy(model):
    name = MatrixName(0, "q")
    read_matrix(model, name).zero_()
    assert _linear(model, name).weight.abs().sum() > 0


def test_layer_out_of_range_names_valid_range(model):
    with pytest.raises(ConfigError, match=r"0\.\.1"):
        read_matrix(model, MatrixName(2, "q"))


def test_read_all(model):
    everything = read_all(model)
    assert list(everything) == matrix_names(model)
    some = read_all(model, [MatrixName(1, "up")])
    assert list(some) == [MatrixName(1, "up")]
    assert read_all(model, []) == {}


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_read_matrix_matches_merge_and_unload(model, peft_model):
    merged = copy.deepcopy(peft_model).merge_and_unload()
    adapted = {MatrixName(layer, k) for layer in range(2) for k in ("q", "v", "o", "down")}
    for name in matrix_names(model):
        effective = read_matrix(peft_model, name)
        # PEFT's merge and our W + s·BA sum in different orders; the weights are <= 0.5, so float32
        # rounding is ~3e-8 and 1e-6 is a bound with room, here and in the merge tests below
        torch.testing.assert_close(effective, _linear(merged, name).weight, atol=1e-6, rtol=0)
        assert torch.equal(read_matrix(peft_model, name, adapter=False), _linear(model, name).weight)
        if name in adapted:
            assert not torch.allclose(effective, _linear(model, name).weight)
    # the model itself is untouched and the inner injected model reads the same
    inner = peft_model.base_model.model
    assert torch.equal(read_matrix(inner, MatrixName(0, "q")), read_matrix(peft_model, MatrixName(0, "q")))


def test_lora_disabled_reads_base(model, peft_model):
    name = MatrixName(1, "o")
    with peft_model.disable_adapter():
        assert torch.equal(read_matrix(peft_model, name), _linear(model, name).weight)


def test_lora_merged_in_place_reads_the_same(model, peft_model):
    merged = copy.deepcopy(peft_model)
    merged.merge_adapter()
    for name in (MatrixName(0, "q"), MatrixName(1, "down"), MatrixName(1, "k")):
        torch.testing.assert_close(
            read_matrix(merged, name), read_matrix(peft_model, name), atol=1e-6, rtol=0
        )
        expected = _linear(model, name).weight
        torch.testing.assert_close(read_matrix(merged, name, adapter=False), expected, atol=1e-6, rtol=0)


def test_lora_factors(model, peft_model):
    factors = lora_factors(peft_model, MatrixName(0, "down"))
    assert isinstance(factors, LoraFactors)
    assert factors.A.shape == (4, 64) and factors.B.shape == (32, 4)
    assert factors.rank == 4 and factors.scaling == pytest.approx(2.0)
    module = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert torch.equal(factors.A, module.lora_A["default"].weight)
    assert torch.equal(factors.B, module.lora_B["default"].weight)
    assert factors.B.abs().sum() > 0
    torch.testing.assert_close(
        factors.delta(), weight_delta(model, peft_model, MatrixName(0, "down")), atol=1e-6, rtol=0
    )
    assert lora_factors(peft_model, MatrixName(0, "k")) is None
    assert lora_factors(model, MatrixName(0, "q")) is None
    assert lora_factors(peft_model, MatrixName(0, "q"), adapter_name="default") is not None
    with pytest.raises(ConfigError, match="unknown adapter"):
        lora_factors(peft_model, MatrixName(0, "q"), adapter_name="nope")


# ------------------------------------------------------------------------------------------------ deltas


def test_weight_delta_matches_manual(model):
    tuned = copy.deepcopy(model)
    name = MatrixName(1, "gate")
    with torch.no_grad():
        _linear(tuned, name).weight.add_(0.5)
    delta = weight_delta(model, tuned, name)
    torch.testing.assert_close(delta, _linear(tuned, name).weight - _linear(model, name).weight)
    assert torch.equal(weight_delta(model, tuned, MatrixName(0, "q")), torch.zeros(32, 32))


def test_weight_delta_shape_mismatch(model):
    other_config = copy.deepcopy(model.config)
    other_config.intermediate_size = 48
    other = transformers.LlamaForCausalLM(other_config)
    with pytest.raises(PairIncompatibleError, match=r"L0\.up.*\(64, 32\).*\(48, 32\)"):
        weight_delta(model, other, MatrixName(0, "up"))


# ------------------------------------------------------------------------------------------------ writing


def test_replace_matrix_in_place(model):
    m = copy.deepcopy(model)
    name = MatrixName(0, "v")
    value = torch.randn(16, 32)
    replace_matrix(m, name, value)
    assert torch.equal(read_matrix(m, name), value)
    assert not _linear(m, name).weight.requires_grad or _linear(m, name).weight.grad_fn is None


def test_replace_matrix_rejects_bad_values(model):
    name = MatrixName(0, "v")
    with pytest.raises(ShapeError, match=r"expected shape \(16, 32\), got \(32, 32\)"):
        replace_matrix(model, name, torch.zeros(32, 32))
    with pytest.raises(ShapeError, match="NaN or inf"):
        replace_matrix(model, name, torch.full((16, 32), float("nan")))


def test_swapped_matrices_restores_even_on_error(model, ids):
    name = MatrixName(1, "o")
    before = read_matrix(model, name)
    with torch.no_grad():
        logits = model(ids).logits
    with swapped_matrices(model, {name: torch.zeros(32, 32)}):
        assert torch.equal(read_matrix(model, name), torch.zeros(32, 32))
    assert torch.equal(read_matrix(model, name), before)
    with pytest.raises(RuntimeError, match="boom"), swapped_matrices(model, {name: torch.ones(32, 32)}):
        raise RuntimeError("boom")
    assert torch.equal(read_matrix(model, name), before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_swapped_matrices_validates_before_writing(model):
    good, bad = MatrixName(0, "q"), MatrixName(0, "k")
    before = read_matrix(model, good)
    with (
        pytest.raises(ShapeError),
        swapped_matrices(model, {good: torch.zeros(32, 32), bad: torch.zeros(3, 3)}),
    ):
        pass
    assert torch.equal(read_matrix(model, good), before)


# ------------------------------------------------------------------------------------------------ grafting


def test_trainable_params(model):
    linear = trainable_params(model)
    assert set(linear) == {hf_param_name(n) for n in matrix_names(model)}
    assert all(not t.requires_grad for t in linear.values())
    full = trainable_params(model, include_embeddings=True, include_norms=True)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(full)
    assert "model.layers.0.input_layernorm.weight" in full
    assert set(full) == {n for n, _ in model.named_parameters()}


def test_trainable_params_of_peft_model_use_canonical_names(model, peft_model):
    got = trainable_params(peft_model)
    assert set(got) == set(trainable_params(model))
    for name, tensor in got.items():
        assert torch.equal(tensor, dict(model.named_parameters())[name])


def test_functional_forward_own_params_identical(model, ids):
    with torch.no_grad():
        expected = model(ids).logits
        got = functional_forward(model, trainable_params(model), ids).logits
    assert torch.equal(got, expected)


def test_functional_forward_matches_in_place_replacement(model, ids):
    name = MatrixName(0, "up")
    value = torch.randn(64, 32)
    with torch.no_grad():
        got = functional_forward(model, {hf_param_name(name): value}, input_ids=ids).logits
        with swapped_matrices(model, {name: value}):
            expected = model(input_ids=ids).logits
    # bit-identical on purpose: the same modules and kernels on the same tensors, only passed differently
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_functional_forward_gradients_reach_the_mask(model, ids):
    tuned = copy.deepcopy(model)
    name = MatrixName(1, "down")
    with torch.no_grad():
        _linear(tuned, name).weight.add_(torch.randn(32, 64) * 0.1)
    w0 = read_matrix(model, name)
    delta = weight_delta(model, tuned, name)
    m = torch.full_like(w0, 0.5, requires_grad=True)
    base, tuned_params = trainable_params(model), trainable_params(tuned)
    params = {n: base[n] + 0.5 * (tuned_params[n] - base[n]) for n in base}  # a full graft at γ = 0.5
    params[hf_param_name(name)] = w0 + m * delta
    try:
        logits = functional_forward(model, params, ids).logits
        logits.sum().backward()
        assert m.grad is not None and m.grad.abs().sum() > 0
        assert all(model.get_parameter(n).grad is None for n in params)  # overridden: no gradient
    finally:
        model.zero_grad(set_to_none=True)


def test_functional_forward_on_peft_model(peft_model, ids):
    params = trainable_params(peft_model)
    with torch.no_grad():  # the same modules, kernels and tensors: bit-identical
        torch.testing.assert_close(
            functional_forward(peft_model, params, ids).logits, peft_model(ids).logits, atol=0, rtol=0
        )


def test_functional_forward_rejects_unknown_and_misshapen(model, ids):
    with pytest.raises(PairIncompatibleError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        functional_forward(model, {"model.layers.9.mlp.up_proj.weight": torch.zeros(64, 32)}, ids)
    with pytest.raises(ShapeError, match=r"expected shape \(64, 32\), got \(2, 2\)"):
        functional_forward(model, {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, ids)


# ------------------------------------------------------------------------------------------------ hashing


def test_content_hash(model, peft_model):
    h = content_hash(model)
    assert len(h) == 16 and int(h, 16) >= 0
    clone = copy.deepcopy(model)
    assert content_hash(clone) == h
    with torch.no_grad():
        _linear(clone, MatrixName(1, "k")).weight[0, 0] += 1e-3
    assert content_hash(clone) != h
    assert content_hash(peft_model) not in (h, content_hash(clone))
    assert content_hash(peft_model) == content_hash(peft_model.base_model.model)
    assert content_hash(copy.deepcopy(peft_model)) == content_hash(peft_model)


def test_content_hash_sees_lora_scaling(peft_model):
    other = copy.deepcopy(peft_model)
    module = other.base_model.model.model.layers[0].self_attn.q_proj
    module.scaling["default"] = 3.0
    assert content_hash(other) != content_hash(peft_model)


def test_content_hash_handles_bfloat16(model):
    assert content_hash(copy.deepcopy(model).to(torch.bfloat16)) != content_hash(model)
