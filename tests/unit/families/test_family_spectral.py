"""Intruder dimensions on LoRA pairs of the other families: PEFT's own detector where a LoRA module is one
matrix, and numpy on matrices cut from the merged fused weights by hand where it is not."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from spectral.intruders import IntruderConfig, intruders
from tunelens.families import FAMILIES
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.loading import load_adapter_pair
from tunelens.models.tiny import TinyConfig, tiny_family

CFG = TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=64)


def _lora_pair(name, tok, folder, targets, seed=0):
    from peft import LoraConfig, get_peft_model

    fam = FAMILIES[name]
    module = tiny_family(name, CFG, len(tok.get_vocab()), seed=seed)
    base = LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(module),
        LoraConfig(
            r=4, lora_alpha=64, target_modules=targets, fan_in_fan_out=fam.conv1d, init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(folder)
    return load_adapter_pair(base, folder, mode="switch"), peft_model


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma2", "olmo2"])
def test_intruder_counts_equal_peft_reduce_intruder_dimension(name, tiny_tok, tmp_path):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    pair, peft_model = _lora_pair(name, tiny_tok, tmp_path, ["q_proj", "v_proj", "down_proj"])
    res = intruders(pair, IntruderConfig(baselines=(), kinds=("q", "v", "down")))
    lines: list[str] = []
    reduce_intruder_dimension(peft_model, top_k=10, threshold_epsilon=0.5, logging_sink=lines.append)
    peft_count = sum(int(m[1]) for line in lines if (m := re.search(r"Intruders: (\d+)", line)))
    ours = res.counts()[pair.tuned.name]
    assert ours == peft_count
    assert ours > 0  # a strong random adapter does plant intruders: the comparison is not 0 == 0


def _split_by_hand(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v (d_out x d_in) of a merged fused projection, cut by hand from the family's layout."""
    h, d = CFG.n_heads, CFG.d_model // CFG.n_heads
    if name == "gpt2":  # Conv1D (in, out), columns [Q | K | V]
        w = weight.T
        return {"q": w[: h * d], "k": w[h * d : 2 * h * d], "v": w[2 * h * d :]}
    if name == "gpt_neox":  # Linear (out, in), rows per head [q_h | k_h | v_h]
        w = weight.reshape(h, 3, d, -1)
        return {kind: w[:, i].reshape(h * d, -1) for i, kind in enumerate("qkv")}
    kv = CFG.n_kv_heads  # phi3: rows [Q | K | V]
    return {"q": weight[: h * d], "k": weight[h * d : (h + kv) * d], "v": weight[(h + kv) * d :]}


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3"])
def test_intruders_of_fused_projections_match_numpy_on_hand_cut_matrices(name, tiny_tok, tmp_path):
    fam = FAMILIES[name]
    (path,) = fam.qkv
    pair, peft_model = _lora_pair(name, tiny_tok, tmp_path, [path.split(".")[-1]])
    res = intruders(pair, IntruderConfig(baselines=(), kinds=("q", "k", "v")))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    found = 0
    for layer in range(CFG.n_layers):
        base = _split_by_hand(name, fam.module(pair.base.hf, layer, path).get_base_layer().weight.detach())
        tuned = _split_by_hand(name, fam.module(merged, layer, path).weight.detach())
        for kind in "qkv":
            u0 = np.linalg.svd(base[kind].double().numpy(), full_matrices=False)[0]
            ut = np.linalg.svd(tuned[kind].double().numpy(), full_matrices=False)[0][:, :10]
            want = np.abs(ut.T @ u0).max(axis=1)
            got = res.max_sim[0, res.matrices.index(f"L{layer}.{kind}"), :10].double().numpy()
            # float32 SVDs of close singular values: the same tolerance as the Llama test's
            np.testing.assert_allclose(got, want, atol=5e-3, err_msg=f"L{layer}.{kind}")
            found += int((want < 0.5).sum())
    assert res.counts()[pair.tuned.name] == found
