"""Path patching on models trained on induction: it finds which layer-0 head reaches the induction heads
through their keys.

1. Layer 0 holds a previous-token head set by hand (a RoPE offset of one position, copying the previous
   token into its own lane of the residual stream) next to a random distractor head; layer 1 is trained on
   repeated sequences whose period varies, so it can only solve the task by composing with the
   previous-token head. The textbook circuit is known, and path patching must find it: previous-token head
   → induction head through K, not Q or V.
2. Both layers trained (attention only). These tiny models do not grow a previous-token head: they learn a
   composition of two layer-0 heads at fixed offsets (9 and 10 positions back), which store the bigram
   (token at s − 10, token at s − 9) at position s; layer 1 finds the s whose first token is the current
   one (K) and copies the second (V). Path patching at the position layer 1 reads finds that too.
"""

from __future__ import annotations

import math

import pytest
import torch

from circuits.patching.engine import trace
from circuits.patching.metrics import Answers, logit_diff
from circuits.patching.path_patching import path_patching
from tests.unit.circuits.conftest import induction_data, induction_ids
from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.tiny import TinyConfig, tiny_llama, train_periodic_induction
from tunelens.threads import one_thread

PREV, DISTRACTOR = 0, 1  # layer-0 heads
HALF = 12  # test prompts x1..x12 x1..x11; the answer x12 sits at position HALF - 1


def _plant_previous_token_head(hf) -> None:
    """Residual lanes: dim 0 constant, 1..31 the token's code, 32..63 what layer 0 writes. Head PREV puts
    q̃ = a·e^(−iθ), k̃ = a on every rotary pair (score ∝ Σ cos θ(t − s − 1), largest at s = t − 1) and
    copies the code into 33..63; DISTRACTOR keeps random weights but also writes into 32..63 only."""
    dh = hf.config.hidden_size // hf.config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    inv_freq = hf.model.rotary_emb.inv_freq
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        code = torch.randn(emb.shape[0], 31, generator=gen)
        emb.zero_()
        emb[:, 1:32] = code / code.norm(dim=1, keepdim=True) * math.sqrt(31)  # equal norms: RMSNorm
        emb[:, 0] = math.sqrt(31)  # leaves dim 0 the same for every token
        for block in hf.model.layers:
            block.mlp.down_proj.weight.zero_()
        hf.model.layers[0].input_layernorm.weight.fill_(1.0)
        att = hf.model.layers[0].self_attn
        q, k, v, o = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight
        rows = slice(PREV * dh, (PREV + 1) * dh)
        for w in (q, k, v):
            w[rows] = 0
        o[:, rows] = 0
        pairs = dh // 2
        for i in range(pairs):
            theta = float(inv_freq[i])
            q[PREV * dh + i, 0] = 4.0 * math.cos(theta)
            q[PREV * dh + i + pairs, 0] = -4.0 * math.sin(theta)
            k[PREV * dh + i, 0] = 4.0
        for j in range(31):
            v[PREV * dh + j, 1 + j] = 1.0
            o[33 + j, PREV * dh + j] = 1.0
        o[:32, DISTRACTOR * dh : (DISTRACTOR + 1) * dh] = 0
    for name, p in hf.named_parameters():
        p.requires_grad_(name.startswith(("model.layers.1.self_attn", "model.norm", "lm_head")))


@pytest.fixture(scope="module")
def model(tiny_tok) -> LoadedModel:
    torch.manual_seed(0)
    hf = tiny_llama(TinyConfig(n_layers=2, d_model=64, n_heads=2, n_kv_heads=2), len(tiny_tok.get_vocab()), 0)
    _plant_previous_token_head(hf)
    acc = train_periodic_induction(hf, induction_ids(tiny_tok), steps=350, seed=0, lr=3e-3)
    assert sum(acc[-20:]) / 20 > 0.9, "layer 1 did not learn the task"
    return LoadedModel(hf, tiny_tok, source=ModelSource(kind="memory", location="planted-induction"))


@pytest.fixture(scope="module")
def runs(model, tiny_tok):
    clean, corrupt = induction_data(tiny_tok, n=16, half=HALF, seed=1)
    target = trace(model, clean.tokens, record=["z"])
    source = trace(model, corrupt.tokens, record=["z"])
    return clean, target, source, Answers.from_encoded(clean)


def test_the_planted_head_attends_to_the_previous_token(model, tiny_tok):
    ids = induction_ids(tiny_tok)[torch.randint(44, (3, 30), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        att = model.hf(input_ids=ids, output_attentions=True).attentions[0][:, PREV]
    prev = torch.stack([att[:, t, t - 1] for t in range(1, 30)])
    assert prev.min() > 0.99


def test_layer1_heads_are_induction_heads(model, runs):
    clean, target, _, _ = runs
    assert (target.trace.logits.argmax(-1) == clean.answer_ids).float().mean() >= 0.9
    with torch.no_grad():
        att = model.hf(input_ids=clean.tokens.input_ids, output_attentions=True).attentions[1]
    # from the last token (x11) to the token after its earlier copy (x12), in every prompt
    assert att[:, :, -1, HALF - 1].mean(0).min() > 0.5


def test_path_patching_finds_previous_token_to_induction_through_k_only(runs):
    _, target, source, answers = runs
    clean_ld = float(logit_diff(target.last(answers)).mean())
    senders = [(0, PREV), (0, DISTRACTOR)]
    last = 2 * HALF - 2
    for receiver in range(2):
        effect = {
            via: path_patching(
                target,
                source,
                answers,
                senders=senders,
                receivers=[(1, receiver)],
                via=via,
                sender_pos=pos,
                receiver_pos=pos,
            ).effect()
            for via, pos in (("k", HALF - 1), ("v", HALF - 1), ("q", last))
        }
        k_prev = float(effect["k"][0])
        # the corrupt prompt's first half has other tokens, so the key at x12 no longer says "after x11"
        assert k_prev < -0.1 * clean_ld
        others = [effect["k"][1], effect["v"][0], effect["v"][1], effect["q"][0], effect["q"][1]]
        assert max(abs(float(e)) for e in others) < 0.1 * abs(k_prev)


@pytest.fixture(scope="module")
def trained(tiny_tok) -> LoadedModel:
    """Both layers trained, attention only (MLPs zeroed and frozen), 2 query heads sharing 1 KV head;
    1,000 steps, about 25 s on one thread (one thread, so the run does not depend on the thread count)."""
    with one_thread():
        torch.manual_seed(0)
        hf = tiny_llama(
            TinyConfig(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1), len(tiny_tok.get_vocab()), 0
        )
        for block in hf.model.layers:
            torch.nn.init.zeros_(block.mlp.down_proj.weight)
            block.mlp.requires_grad_(False)
        acc = train_periodic_induction(hf, induction_ids(tiny_tok), steps=1000, seed=0, lr=3e-3)
    assert sum(acc[-50:]) / 50 > 0.85, "the model did not learn the task"
    return LoadedModel(hf, tiny_tok, source=ModelSource(kind="memory", location="trained-induction"))


@pytest.mark.slow
@pytest.mark.parametrize("half", [12, 16])
def test_a_fully_trained_model_composes_through_k_at_the_position_it_reads(trained, tiny_tok, half):
    clean, corrupt = induction_data(tiny_tok, n=16, half=half, seed=1)
    target = trace(trained, clean.tokens, record=["z"])
    source = trace(trained, corrupt.tokens, record=["z"])
    answers = Answers.from_encoded(clean)
    assert (target.trace.logits.argmax(-1) == clean.answer_ids).float().mean() >= 0.9
    clean_ld = float(logit_diff(target.last(answers)).mean())
    ids = clean.tokens.input_ids
    with torch.no_grad():
        att = trained.hf(input_ids=ids, output_attentions=True).attentions
    read = int(att[1][:, :, -1].mean((0, 1)).argmax())  # where layer 1 reads from the last token
    last = ids.shape[1] - 1
    senders = [(0, 0), (0, 1)]

    def effect(via, pos):
        return path_patching(
            target,
            source,
            answers,
            senders=senders,
            receivers=[(1, 0)],
            via=via,
            sender_pos=pos,
            receiver_pos=pos,
        ).effect()

    k, q = effect("k", read), effect("q", last)
    key_head = int(k.argmin())
    assert float(k[key_head]) < -0.3 * clean_ld  # one layer-0 head makes the key that layer 1 matches
    assert q.abs().max() < 0.05 * clean_ld  # the query side is the last token itself
    # and that head brings the current token to the position layer 1 reads: it attends from there to an
    # earlier copy of the last token, in most prompts
    src = att[0][:, key_head, read].argmax(-1)
    assert (ids[torch.arange(len(ids)), src] == ids[:, -1]).float().mean() >= 0.75
