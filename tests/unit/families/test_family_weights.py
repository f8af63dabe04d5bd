"""Weight access on every declared family: fused projections split into q/k/v (and Phi-3's gate/up), GPT-2's
Conv1D transposed, checked by recomputing each module's own output from the matrices tunelens reads."""

from __future__ import annotations

import pytest
import torch

from tests.unit.families.names import NAMES
from tunelens.families import FAMILIES
from tunelens.models.tiny import TinyConfig, tiny_family
from tunelens.weights import (
    MatrixName,
    lora_factors,
    matrix_names,
    read_matrix,
    replace_matrix,
    swapped_matrices,
)

CFG = TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=64)


def _close(a, b, what=""):
    err = float((a - b).abs().max())
    assert err <= 1e-5 * (float(b.abs().max()) + 1.0), (what, err)


def _bias(module, rows):
    bias = getattr(getattr(module, "base_layer", module), "bias", None)
    if bias is None:
        return 0.0
    return bias.detach() if rows is None else bias.detach()[rows]


def _dims(model):
    from tunelens.dims import ModelDims

    return ModelDims.from_hf_config(model.config)


@pytest.mark.parametrize("name", NAMES)
def test_every_matrix_reproduces_its_projections_output(name):
    """x @ W.T (+ the bias block) equals the block of the projection's own output that the matrix names."""
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=1)
    dims = _dims(model)
    names = matrix_names(model)
    assert {n.kind for n in names} == set(fam.matrix_kinds)
    assert ("gate" in fam.matrix_kinds) == (name not in ("gpt2", "gpt_neox"))
    x = torch.randn(5, dims.d_model, generator=torch.Generator().manual_seed(1))
    for mat in names[: len(fam.matrix_kinds)]:  # layer 0
        path, rows = fam.matrix(mat.kind, dims)
        module = fam.module(model, 0, path)
        w = read_matrix(model, mat)
        inp = x if w.shape[1] == dims.d_model else torch.randn(5, w.shape[1], generator=torch.Generator())
        with torch.no_grad():
            out = module(inp)
        want = out if rows is None else out[:, rows]
        _close(inp @ w.T + _bias(module, rows), want, str(mat))


@pytest.mark.parametrize("name", NAMES)
def test_the_mlp_is_rebuilt_from_its_matrices(name):
    """gate / up / down as read, composed with the family's activation, give the MLP module's output: a wrong
    half of Phi-3's gate_up or a missed Conv1D transpose breaks this."""
    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=2)
    mlp = fam.module(model, 0, fam.mlp)
    act = next(getattr(mlp, a) for a in ("act_fn", "act", "activation_fn") if hasattr(mlp, a))
    x = torch.randn(5, CFG.d_model, generator=torch.Generator().manual_seed(2))
    read = {k: read_matrix(model, MatrixName(0, k)) for k in fam.matrix_kinds}
    up_bias = _bias(fam.module(model, 0, fam.up), None)  # plain MLPs only (gated ones have no bias here)
    down_bias = _bias(fam.module(model, 0, fam.mlp_out_proj), None)
    if "gate" in read:
        hidden = act(x @ read["gate"].T) * (x @ read["up"].T)
    else:
        hidden = act(x @ read["up"].T + up_bias)
    with torch.no_grad():
        _close(hidden @ read["down"].T + down_bias, mlp(x), "mlp")


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "qwen2"])
def test_writing_a_block_of_a_fused_projection_touches_only_that_block(name):
    model = tiny_family(name, CFG, seed=3)
    q, k, v = (MatrixName(1, kind) for kind in "qkv")
    before = {m: read_matrix(model, m) for m in (q, k, v)}
    with swapped_matrices(model, {k: torch.zeros_like(before[k])}):
        assert float(read_matrix(model, k).abs().max()) == 0.0
        _close(read_matrix(model, q), before[q], "q untouched")
        _close(read_matrix(model, v), before[v], "v untouched")
    _close(read_matrix(model, k), before[k], "k restored")
    replace_matrix(model, v, 2 * before[v])
    _close(read_matrix(model, v), 2 * before[v], "v replaced")
    _close(read_matrix(model, q), before[q], "q still untouched")


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "llama"])
def test_a_lora_on_a_fused_projection_reads_as_each_blocks_effective_weight(name):
    """The effective matrix (adapter on) reproduces the peft module's output block; its difference from the
    base matrix is the block's rows of B, times A, times the scaling."""
    from peft import LoraConfig, get_peft_model

    fam = FAMILIES[name]
    model = tiny_family(name, CFG, seed=4)
    dims = _dims(model)
    targets = sorted({p.split(".")[-1] for p in (*fam.qkv, fam.up)})
    peft_model = get_peft_model(
        model, LoraConfig(r=3, target_modules=targets, fan_in_fan_out=fam.conv1d, init_lora_weights=False)
    )
    x = torch.randn(5, dims.d_model, generator=torch.Generator().manual_seed(4))
    for kind in ("q", "k", "v", "up"):
        mat = MatrixName(1, kind)
        path, rows = fam.matrix(kind, dims)
        module = fam.module(peft_model, 1, path)
        tuned, base = read_matrix(peft_model, mat), read_matrix(peft_model, mat, adapter=False)
        with torch.no_grad():
            out = module(x)
        _close(x @ tuned.T + _bias(module, rows), out if rows is None else out[:, rows], f"{kind} adapter on")
        factors = lora_factors(peft_model, mat)
        assert factors is not None and factors.B.shape == (tuned.shape[0], 3)
        _close(tuned - base, factors.delta(), f"{kind} delta")
        assert float((tuned - base).abs().max()) > 1e-3
