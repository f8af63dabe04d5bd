"""CMAP on every declared family against a naive loop this test writes itself: one plain HF forward of the
base per head, with a PyTorch pre-hook on the family's out-projection that puts in the tuned model's z."""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.patching.cmap import cmap_sweep
from tests.unit.families.names import NAMES
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.tiny import TinyConfig, tiny_family
from tunelens.tasks import entity_tracking as et

CFG = TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=128)


@pytest.fixture(scope="module")
def data(tiny_tok):
    return et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=2), seed=0).encode(tiny_tok)


def _pair(name, tok):
    module = tiny_family(name, CFG, len(tok.get_vocab()), seed=11, sliding_window=6)
    tuned = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=gen))

    def loaded(m, role):
        return LoadedModel(m, tok, source=ModelSource(kind="memory", location=f"{name}-{role}"), name=role)

    return loaded(module, "base"), loaded(tuned, "tuned")


def _logit_diff(logits, data):
    rows = torch.arange(len(data.tokens.last))
    lg = logits[rows, data.tokens.last]
    answer = lg.gather(1, data.answer_ids[:, None])[:, 0]
    cand = lg.gather(1, data.candidate_ids).masked_fill(data.candidate_ids == data.answer_ids[:, None], -1e9)
    return float((answer - cand.amax(1)).mean())


def _naive_cmap(base, tuned, data) -> torch.Tensor:
    fam, dims = base.family, base.dims
    ids, mask = data.tokens.input_ids, data.tokens.attention_mask
    last, rows, d = data.tokens.last, torch.arange(len(data.tokens.last)), dims.d_head
    z: dict[int, torch.Tensor] = {}
    handles = [
        fam.module(tuned.module, layer, fam.out_proj).register_forward_pre_hook(
            lambda m, args, layer=layer: z.__setitem__(layer, args[0].detach().clone())
        )
        for layer in range(dims.n_layers)
    ]
    try:
        with torch.no_grad():
            tuned.module(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = torch.zeros(dims.n_layers, dims.n_heads)
    for layer in range(dims.n_layers):
        for head in range(dims.n_heads):
            cols = slice(head * d, (head + 1) * d)

            def put(m, args, layer=layer, cols=cols):
                x = args[0].clone()
                x[rows, last, cols] = z[layer][rows, last, cols]
                return (x, *args[1:])

            handle = fam.module(base.module, layer, fam.out_proj).register_forward_pre_hook(put)
            try:
                with torch.no_grad():
                    logits = base.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
            finally:
                handle.remove()
            out[layer, head] = _logit_diff(logits, data)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_cmap_over_every_head_equals_a_naive_hf_loop(name, tiny_tok, data):
    base, tuned = _pair(name, tiny_tok)
    sweep = cmap_sweep((base, tuned), data, position="last")
    want = _naive_cmap(base, tuned, data)
    got = sweep.values["logit_diff"]
    assert float((got - want).abs().max()) <= 1e-5 * (float(want.abs().max()) + 1)
    assert float((want - want.mean()).abs().max()) > 1e-3  # heads differ: the comparison is not trivial


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "gemma2"])
def test_patching_a_model_with_itself_changes_nothing(name, tiny_tok, data):
    base, _ = _pair(name, tiny_tok)
    sweep = cmap_sweep((base, base), data, position="last")
    assert float((sweep.values["logit_diff"] - sweep.target["logit_diff"]).abs().max()) <= 1e-5
