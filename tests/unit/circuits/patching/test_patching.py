"""The patching engine against transformer_lens.patching and against one backend forward per site."""

from __future__ import annotations

import pytest
import torch

from circuits.patching.engine import Patch, layer_pos_cells, run_cells, trace
from circuits.patching.metrics import Answers, logit_diff
from circuits.patching.result import PatchingResult
from circuits.patching.sweeps import SweepConfig, activation_patching
from tests.unit.circuits.conftest import induction_data
from tunelens.backends.base import replace
from tunelens.backends.tl_patching import tl_patch_sweep
from tunelens.errors import ConfigError, ShapeError, SiteError, TaskError
from tunelens.sites import Site


@pytest.fixture(scope="module")
def data(tiny_tok):
    return induction_data(tiny_tok)


def _tl_metric(clean, corrupt):
    last = clean.tokens.last

    def metric(logits):
        lg = logits[torch.arange(len(last)), last]
        return (lg.gather(1, clean.answer_ids[:, None]) - lg.gather(1, corrupt.answer_ids[:, None])).mean()

    return metric


@pytest.mark.parametrize(
    ("kind", "by", "tl_name"),
    [
        ("resid_pre", "layer_pos", "resid_pre"),
        ("attn_out", "layer_pos", "attn_out"),
        ("mlp_out", "layer_pos", "mlp_out"),
        ("z", "layer_pos_head", "z_by_pos"),
        ("z", "layer_head", "z_all_pos"),
    ],
)
def test_sweep_equals_transformer_lens_patching(induction_model, data, kind, by, tl_name):
    clean, corrupt = data
    result = activation_patching(induction_model, clean, corrupt, SweepConfig(kind=kind, by=by, max_rows=40))
    ref = tl_patch_sweep(
        induction_model.backend("bridge"),
        clean.tokens.input_ids,
        corrupt.tokens.input_ids,
        _tl_metric(clean, corrupt),
        tl_name,
    )
    ours = result.values["logit_diff"]
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.5  # the sweep has real effects to compare
    assert (ours - ref).abs().max() <= 1e-4


def _brute_force(model, clean, corrupt, cells):
    """One bridge forward of the corrupt prompts per cell, the clean activation written by Write.replace."""
    backend = model.backend("bridge")
    sites = {Site(p.kind, p.layer) for cell in cells for p in cell}
    acts = backend.run(clean.tokens, reads=sorted(sites, key=str)).acts
    out = []
    for cell in cells:
        writes = []
        for p in cell:
            whole = acts[Site(p.kind, p.layer)]
            site = Site(p.kind, p.layer, p.head)
            value = whole if p.head is None else whole[:, :, p.head]
            if p.position is not None:
                value = value[:, p.position]
            writes.append(replace(site, value, positions=p.position))
        logits = backend.run(corrupt.tokens, writes=writes).logits[:, -1]
        out.append(
            logits.gather(1, clean.answer_ids[:, None])[:, 0]
            - logits.gather(1, corrupt.answer_ids[:, None])[:, 0]
        )
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["resid_mid", "resid_post", "q", "k", "v"])
def test_other_sites_equal_one_forward_per_site(induction_model, data, kind):
    clean, corrupt = data
    dims = induction_model.dims
    n_heads = dims.n_kv_heads if kind in ("k", "v") else dims.n_heads
    heads = [None] if kind.startswith("resid") else list(range(n_heads))
    T = clean.tokens.input_ids.shape[1]
    cells = [
        (Patch(Site(kind, layer, h), pos),)
        for layer in range(dims.n_layers)
        for pos in (0, 5, T - 1)
        for h in heads
    ]
    # a multi-site cell too: two layers, two positions
    cells.append((Patch(Site(kind, 0, heads[0]), 5), Patch(Site(kind, 1, heads[-1]), T - 1)))
    source = trace(induction_model, clean.tokens, record=[kind])
    target = trace(induction_model, corrupt.tokens)
    answers = Answers.from_encoded(clean, foil=corrupt)
    ours = logit_diff(run_cells(target, source, cells, answers, max_rows=16))
    ref = _brute_force(induction_model, clean, corrupt, cells)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max() <= 1e-4


def test_gemma_layout_with_sliding_window(tiny_gemma_model, data):
    """Gemma-3 (post norms, q/k norms, a 16-token sliding window shorter than the prompts)."""
    clean, corrupt = data
    tokens = torch.cat([clean.tokens.input_ids, clean.tokens.input_ids], dim=1)  # 22 tokens > window
    from dataclasses import replace as dc_replace

    from tunelens.backends.base import TokenBatch

    def longer(enc, ids):
        return dc_replace(
            enc,
            tokens=TokenBatch(input_ids=ids, attention_mask=torch.ones_like(ids)),
            positions={"last": torch.full((len(ids),), ids.shape[1] - 1)},
        )

    clean2 = longer(clean, tokens)
    corrupt2 = longer(corrupt, torch.cat([clean.tokens.input_ids, corrupt.tokens.input_ids], dim=1))
    cells = layer_pos_cells("resid_pre", range(2), [0, 3, 12, 20, 21])
    source, target = trace(tiny_gemma_model, clean2.tokens), trace(tiny_gemma_model, corrupt2.tokens)
    ours = logit_diff(run_cells(target, source, cells, Answers.from_encoded(clean2, foil=corrupt2)))
    ref = _brute_force(tiny_gemma_model, clean2, corrupt2, cells)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["resid_pre", "z", "k", "mlp_out"])
def test_patching_a_run_with_itself_changes_nothing(induction_model, data, kind):
    clean, corrupt = data
    run = trace(induction_model, corrupt.tokens, record=[kind])
    answers = Answers.from_encoded(clean, foil=corrupt)
    head = 1 if kind in ("z", "k") else None
    cells = [(Patch(Site(kind, layer, head), pos),) for layer in range(2) for pos in (None, 0, 4, 10)]
    patched = logit_diff(run_cells(run, run, cells, answers))
    unpatched = logit_diff(run.last(answers))
    assert (patched - unpatched).abs().max() <= 1e-5


def test_result_round_trip_and_figure(induction_model, data, tmp_path):
    clean, corrupt = data
    result = activation_patching(
        induction_model,
        clean,
        corrupt,
        SweepConfig(kind="resid_post", by="layer_pos", positions=(0, "prev", "last")),
    )
    assert result.values["logit_diff"].shape == (2, 3)
    # the last layer's output at the last position is all the logits read: full restoration
    assert result.normalised()[1, 2] == pytest.approx(1.0, abs=1e-4)
    assert result.normalised()[1, 0] == pytest.approx(0.0, abs=1e-4)
    loaded = PatchingResult.load(result.save(tmp_path / "p"))
    assert torch.equal(loaded.values["logit_diff"], result.values["logit_diff"])
    fig = result.figure()
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "pos"
    assert len(result.to_frame()) == 6 and result.summary()["grid"] == "2x3"


def test_bad_inputs_are_clear_errors(induction_model, data, tiny_tok):
    clean, corrupt = data
    source, target = trace(induction_model, clean.tokens), trace(induction_model, corrupt.tokens)
    answers = Answers.from_encoded(clean, foil=corrupt)
    T = clean.tokens.input_ids.shape[1]
    with pytest.raises(ShapeError, match="outside the prompt"):
        run_cells(target, source, [(Patch(Site("resid_pre", 0), T),)], answers)
    with pytest.raises(SiteError, match="kv_head 2 out of range"):
        run_cells(target, source, [(Patch(Site("k", 0, 2), 1),)], answers)
    with pytest.raises(SiteError, match="layer 5 out of range"):
        run_cells(target, source, [(Patch(Site("resid_pre", 5), 1),)], answers)
    shorter = trace(induction_model, induction_data(tiny_tok, half=15)[0].tokens)
    with pytest.raises(ShapeError, match="same token lengths"):
        run_cells(target, shorter, [(Patch(Site("resid_pre", 0), 1),)], answers)
    with pytest.raises(TaskError, match="no answers"):
        Answers(answer=torch.full((len(clean),), -1))
    with pytest.raises(ConfigError, match="head kind"):
        SweepConfig(kind="resid_pre", by="layer_head")
    with pytest.raises(ConfigError, match="unknown position"):
        activation_patching(
            induction_model,
            clean,
            corrupt,
            SweepConfig(kind="resid_pre", by="layer_pos", positions=("nope",)),
        )
    with pytest.raises(SiteError, match="has no heads"):
        Patch(Site("resid_pre", 0, 0), 1)


def test_logit_diff_subtracts_the_best_other_candidate_by_token_even_on_a_tie():
    """Candidates 7 (the answer), 8 and 9; candidate 8's logit equals the answer's exactly (common in
    bfloat16): the best other candidate is then 8, and the difference is 0, not answer - logit(9)."""
    from circuits.patching.metrics import LastLogits

    logits = torch.zeros(1, 2, 12)
    logits[0, :, 7] = 3.0
    logits[0, 0, 8] = 3.0  # a tie in prompt 0
    logits[0, 1, 8] = 1.0
    logits[0, :, 9] = 2.0
    answers = Answers(answer=torch.tensor([7, 7]), candidates=torch.tensor([[7, 8, 9], [9, 7, 8]]))
    ld = logit_diff(LastLogits.from_logits(logits, answers))
    assert ld.tolist() == [[0.0, 1.0]]
