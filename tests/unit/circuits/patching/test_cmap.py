"""CMAP on constructed pairs with known answers, and the batched sweep against one forward per head."""

from __future__ import annotations

import copy

import pytest
import torch

from circuits.patching.cmap import cmap_groups, cmap_sweep, trace_pair
from circuits.patching.result import PatchingResult
from tests.conftest import make_tiny
from tunelens.backends.base import replace
from tunelens.errors import PairIncompatibleError
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.tiny import TinyConfig
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et


@pytest.fixture(scope="module")
def base(tiny_tok):
    return make_tiny(tiny_tok, seed=5, cfg=TinyConfig(n_layers=2, n_heads=4, n_kv_heads=2), name="cmap-base")


@pytest.fixture(scope="module")
def data(tiny_tok):
    return et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=4), seed=0).encode(tiny_tok)


def _variant(base, edit, name="variant"):
    module = copy.deepcopy(base.module)
    with torch.no_grad():
        edit(module)
    return LoadedModel(module, base.tokenizer, source=ModelSource(kind="memory", location=name), name=name)


def _effect(sweep: PatchingResult) -> torch.Tensor:
    return sweep.values["logit_diff"] - sweep.target["logit_diff"]


def test_identical_models_give_no_effect(base, data):
    sweep = cmap_sweep((base, base), data, position="last")
    assert _effect(sweep).abs().max() <= 1e-5


def test_models_differing_only_in_last_o_proj_give_exactly_zero(base, data):
    def edit(m):
        m.model.layers[-1].self_attn.o_proj.weight.mul_(3.0).add_(0.5)

    tuned = _variant(base, edit)
    assert not torch.allclose(base.logits(data.tokens), tuned.logits(data.tokens))  # the models do differ
    for direction in ("tuned -> base", "base -> tuned"):
        for position in ("last", "query_label"):
            sweep = cmap_sweep((base, tuned), data, position=position, direction=direction)
            assert _effect(sweep).abs().max() <= 1e-5, (direction, position)


def test_value_weights_of_one_kv_head_show_only_at_its_query_heads(base, data):
    dims = base.dims
    kv, d = 1, dims.d_head

    def edit(m):
        w = m.model.layers[-1].self_attn.v_proj.weight[kv * d : (kv + 1) * d]
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))

    tuned = _variant(base, edit)
    sweep = cmap_sweep((base, tuned), data, position="last")
    effect = _effect(sweep)
    sharing = [h for h in range(dims.n_heads) if dims.kv_head_of(h) == kv]
    assert sharing == [2, 3]
    others = [h for h in range(dims.n_heads) if h not in sharing]
    assert effect[:-1].abs().max() <= 1e-5  # earlier layers: identical
    assert effect[-1, others].abs().max() <= 1e-5
    assert effect[-1, sharing].abs().min() > 1e-3  # 100x the tolerance above


def test_batched_sweep_equals_one_backend_forward_per_head(base, data):
    def edit(m):
        for p in m.model.layers[0].self_attn.parameters():
            p.add_(0.3 * torch.randn_like(p))

    torch.manual_seed(0)
    tuned = _variant(base, edit)
    sweep = cmap_sweep((base, tuned), data, position="last")
    last = data.tokens.last
    z = tuned.backend("bridge").run(data.tokens, reads=[Site("z", 0), Site("z", 1)]).acts
    backend = base.backend("bridge")
    rows = torch.arange(len(last))
    for layer in range(2):
        for head in range(base.dims.n_heads):
            value = z[Site("z", layer)][rows, last, head]
            logits = backend.run(
                data.tokens, writes=[replace(Site("z", layer, head), value, positions=last)]
            ).logits
            lg = logits[rows, last]
            answer = lg.gather(1, data.answer_ids[:, None])[:, 0]
            cand = lg.gather(1, data.candidate_ids).masked_fill(
                data.candidate_ids == data.answer_ids[:, None], -1e9
            )
            ld = (answer - cand.amax(1)).mean()
            assert float(ld) == pytest.approx(float(sweep.values["logit_diff"][layer, head]), abs=1e-4)


def test_all_heads_everywhere_recover_a_pair_differing_only_in_attention_inputs(base, data):
    """If only q/k/v weights differ, the tuned z at every head and position *is* the tuned model."""

    def edit(m):
        for layer in m.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).weight.add_(
                    0.2 * torch.randn_like(getattr(layer.self_attn, name).weight)
                )

    torch.manual_seed(1)
    tuned = _variant(base, edit)
    everything = [(layer, h, "all") for layer in range(2) for h in range(base.dims.n_heads)]
    result = cmap_groups((base, tuned), data, {"all": everything, "one": [(1, 0, "last")]}, n_random=3)
    row = result.table[(result.table.direction == "tuned -> base") & (result.table.group == "all")].iloc[0]
    assert row.gap_logit_diff == pytest.approx(1.0, abs=1e-4)
    assert row.logit_diff == pytest.approx(result.tuned["logit_diff"], abs=1e-4)
    assert set(result.table.direction) == {"tuned -> base", "base -> tuned"}
    assert result.figure().layout.yaxis.title.text.startswith("fraction")


def test_pair_with_different_head_counts_is_refused(tiny_tok, base, data):
    other = make_tiny(tiny_tok, cfg=TinyConfig(n_layers=2, n_heads=8, n_kv_heads=2), name="eight-heads")
    with pytest.raises(PairIncompatibleError, match="n_heads"):
        trace_pair((base, other), data)
