"""Path patching: the batched partial runs against a from-scratch two-step implementation, and the known
answer on a toy whose layer-0 sender head reaches the layer-1 receiver only through its keys."""

from __future__ import annotations

import pytest
import torch

from circuits.patching.engine import trace
from circuits.patching.metrics import Answers, logit_diff
from circuits.patching.path_patching import path_patching, receiver_units
from tests.conftest import make_tiny
from tests.unit.circuits.conftest import induction_data
from tunelens.backends.stepwise import Stepper
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.models.tiny import TinyConfig

SENDER, RECEIVER = 1, 2  # layer-0 sender head; layer-1 receiver query head (KV group 1)


def _reference(model, target, source, answers, sender, receivers, via, s_pos, r_pos) -> float:
    """Both steps as full runs from the embeddings, one hook each (no cache, no batching)."""
    st = Stepper(model.module)
    ids, last = target.tokens.input_ids, target.tokens.last
    s_layer, s_head = sender
    rec: dict[int, torch.Tensor] = {}

    def step1(lay, kind, t):
        if kind == "z" and lay == s_layer:
            t = t.clone()
            t[:, s_pos, s_head] = source.value("z", lay)[:, s_pos, s_head]
            return t
        if kind == "z" and lay > s_layer:
            return target.value("z", lay)
        if kind == via:
            rec[lay] = t
        return None

    with torch.no_grad():
        tr = st.trace(ids, last, hook=step1)
        if via != "logits":
            units = receiver_units(receivers, via, model.dims.n_heads, model.dims.n_kv_heads)

            def step2(lay, kind, t):
                if kind != via:
                    return None
                t = t.clone()
                for ul, u in units:
                    if ul == lay:
                        t[:, r_pos, u] = rec[lay][:, r_pos, u]
                return t

            tr = st.trace(ids, last, hook=step2)
    rows = torch.arange(len(answers))
    return float((tr.logits[rows, answers.answer] - tr.logits[rows, answers.foil]).mean())


@pytest.fixture(scope="module")
def runs(induction_model, tiny_tok):
    clean, corrupt = induction_data(tiny_tok, n=4)
    answers = Answers.from_encoded(clean, foil=corrupt)
    return (
        answers,
        trace(induction_model, corrupt.tokens, record=["z"]),
        trace(induction_model, clean.tokens, record=["z"]),
    )


@pytest.mark.parametrize(
    ("via", "s_pos", "r_pos", "receivers"),
    [
        ("logits", 30, None, []),
        ("k", 15, 15, [(1, 0), (1, 3)]),
        ("v", 15, 15, [(1, 1)]),
        ("q", 30, 30, [(1, 0), (1, 1), (1, 2), (1, 3)]),
    ],
)
def test_matches_a_from_scratch_two_step_run(induction_model, runs, via, s_pos, r_pos, receivers):
    answers, target, source = runs
    senders = [(0, h) for h in range(4)]
    res = path_patching(
        target,
        source,
        answers,
        senders=senders,
        receivers=receivers,
        via=via,
        sender_pos=s_pos,
        receiver_pos=r_pos,
    )
    ref = [
        _reference(induction_model, target, source, answers, s, receivers, via, s_pos, r_pos) for s in senders
    ]
    assert torch.allclose(res.values["logit_diff"], torch.tensor(ref), atol=1e-4)
    assert res.effect().abs().max() > 1e-3  # the check is not vacuous


def _planted(tiny_tok):
    """2 layers, 4 query / 2 KV heads, no MLPs, layer-1 norm made linear. Residual split in A = dims 0..31
    (embeddings, every other layer-0 head) and B = 32..63 (only the sender writes there). The receiver's KV
    group reads keys from B only, values from A only; its queries read A only."""
    model = make_tiny(tiny_tok, seed=3, cfg=TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2))
    hf = model.hf
    dh = 16
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 32:] = 0
        hf.model.embed_tokens.weight[:, :32] *= 50  # layer 1 reads the residual unnormalised
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()
        o = hf.model.layers[0].self_attn.o_proj.weight  # d_model × (head d_head)
        for h in range(4):
            cols = slice(h * dh, (h + 1) * dh)
            if h == SENDER:
                o[:32, cols] = 0
                o[32:, cols] *= 200
            else:
                o[32:, cols] = 0
        att = hf.model.layers[1].self_attn
        g = RECEIVER // 2
        att.k_proj.weight[g * dh : (g + 1) * dh, :32] = 0
        att.k_proj.weight[g * dh : (g + 1) * dh, 32:] *= 10
        att.q_proj.weight[RECEIVER * dh : (RECEIVER + 1) * dh] *= 10
        att.o_proj.weight[:, RECEIVER * dh : (RECEIVER + 1) * dh] *= 500
        att.v_proj.weight[g * dh : (g + 1) * dh, 32:] = 0
        att.q_proj.weight[RECEIVER * dh : (RECEIVER + 1) * dh, 32:] = 0
        norm = hf.model.layers[1].input_layernorm  # x · w / sqrt(mean x² + eps) ≈ x when eps ≫ mean x²
        norm.variance_epsilon = 1e8
        norm.weight.fill_(1e4)
    return model


def test_planted_sender_reaches_the_receiver_through_k_only(tiny_tok, tiny_model):
    model = _planted(tiny_tok)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 80, (2, 6, 12), generator=gen)
    from tunelens.backends.base import TokenBatch

    mask = torch.ones(6, 12, dtype=torch.long)
    target = trace(model, TokenBatch(input_ids=ids[0], attention_mask=mask), record=["z"])
    source = trace(model, TokenBatch(input_ids=ids[1], attention_mask=mask), record=["z"])
    answers = Answers(answer=target.trace.logits.argmax(-1), foil=source.trace.logits.argmax(-1))
    senders = [(0, h) for h in range(4)]
    effects = {
        via: path_patching(
            target,
            source,
            answers,
            senders=senders,
            receivers=[(1, RECEIVER)],
            via=via,
            sender_pos=11,
            receiver_pos=11,
        ).effect()
        for via in ("q", "k", "v")
    }
    assert effects["k"][SENDER].abs() > 1e-2
    assert effects["k"].abs().argmax() == SENDER
    others = [h for h in range(4) if h != SENDER]
    assert effects["k"][others].abs().max() < 1e-5
    # the sender reaches the receiver through k only; the other heads (writing where q and v read) through
    # q and v only
    assert effects["q"][SENDER].abs() < 1e-5 and effects["v"][SENDER].abs() < 1e-5
    assert effects["q"][others].abs().max() > 1e-4 or effects["v"][others].abs().max() > 1e-4
    # the unit patched for k is the receiver's KV group, shared with query head RECEIVER + 1
    res = path_patching(
        target,
        source,
        answers,
        senders=senders,
        receivers=[(1, RECEIVER + 1)],
        via="k",
        sender_pos=11,
        receiver_pos=11,
    )
    assert res.units == [[1, RECEIVER // 2]] and torch.allclose(res.effect(), effects["k"])
    assert logit_diff(target.last(answers)).abs().sum() > 0


def test_bad_inputs(runs):
    answers, target, source = runs
    kw = {"senders": [(0, 1)], "sender_pos": 5}
    with pytest.raises(ConfigError, match="needs receiver heads"):
        path_patching(target, source, answers, via="k", receiver_pos=5, **kw)
    with pytest.raises(ConfigError, match="not before the last receiver layer"):
        path_patching(
            target,
            source,
            answers,
            senders=[(1, 0)],
            receivers=[(1, 1)],
            via="q",
            sender_pos=5,
            receiver_pos=5,
        )
    with pytest.raises(ConfigError, match="precede sender positions"):
        path_patching(target, source, answers, receivers=[(1, 1)], via="q", receiver_pos=3, **kw)
    with pytest.raises(ShapeError, match="outside the prompts"):
        path_patching(target, source, answers, senders=[(0, 1)], sender_pos=99)
    with pytest.raises(SiteError, match="does not exist"):
        path_patching(target, source, answers, senders=[(0, 9)], sender_pos=5)
    with pytest.raises(ShapeError, match="record"):
        path_patching(trace(target.model, target.tokens), source, answers, **kw)


def test_result_roundtrip(runs, tmp_path):
    from tunelens.results import load_result

    answers, target, source = runs
    res = path_patching(target, source, answers, senders=[(0, h) for h in range(4)], sender_pos=15)
    back = load_result(res.save(tmp_path / "pp"))
    assert torch.equal(back.values["logit_diff"], res.values["logit_diff"])
    assert res.figure().data[0].type == "heatmap" and len(res.to_frame()) == 4
    assert set(res.summary()["top_senders"]) <= {f"L0.h{h}" for h in range(4)}


def test_receivers_at_or_below_the_sender_layer_are_left_alone(runs):
    answers, target, source = runs
    kw = {"senders": [(0, h) for h in range(4)], "via": "q", "sender_pos": 30, "receiver_pos": 30}
    mixed = path_patching(target, source, answers, receivers=[(0, 1), (1, 2)], **kw)
    only = path_patching(target, source, answers, receivers=[(1, 2)], **kw)
    assert torch.allclose(mixed.values["logit_diff"], only.values["logit_diff"])
