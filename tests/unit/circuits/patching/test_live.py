"""The live sweep: exact effects against full re-runs with one activation replaced, attribution against the
attribution module, the answer/foil choice, and the errors a user typing prompts meets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from circuits.patching.attribution import attribute
from circuits.patching.engine import trace
from circuits.patching.live import LiveSweepResult, live_sweep
from circuits.patching.metrics import Answers
from tests.unit.circuits.conftest import induction_ids
from tunelens.backends.stepwise import Stepper
from tunelens.errors import ConfigError, PromptError
from tunelens.results import load_result


def _words(tok, idx) -> str:
    vocab = {v: k for k, v in tok.get_vocab().items()}
    ids = induction_ids(tok)
    return " ".join(vocab[int(ids[i])] for i in idx)


@pytest.fixture(scope="module")
def prompts(tiny_tok):
    seq = list(range(10))
    clean = _words(tiny_tok, seq + seq[:-1])
    counter = _words(tiny_tok, list(range(10, 20)) + seq[:-1])
    return clean, counter


@pytest.fixture(scope="module")
def result(induction_model, prompts) -> LiveSweepResult:
    return live_sweep(induction_model, *prompts, top_k=6)


def _full_rerun(model, tokens, site, clean_value, answers) -> float:
    """The counterfactual run from scratch with one site's activation replaced (no cache, no partial run)."""
    kind, layer, pos, head = site

    def hook(lay, k, t):
        if lay == layer and k == kind:
            t = t.clone()
            if head is None:
                t[:, pos] = clean_value[:, pos]
            else:
                t[:, pos, head] = clean_value[:, pos, head]
            return t
        return None

    with torch.no_grad():
        logits = Stepper(model.module).trace(tokens.input_ids, tokens.last, hook=hook).logits
    return float(logits[0, answers.answer[0]] - logits[0, answers.foil[0]])


def _parse(label: str):
    kind, rest, pos = label.split(" ")
    layer, _, head = rest[1:].partition(".h")
    return kind, int(layer), int(pos[1:]), (int(head) if head else None)


def test_exact_effects_equal_full_reruns(induction_model, prompts, result, tiny_tok):
    clean_p, counter_p = prompts
    clean = trace(induction_model, induction_model.encode([clean_p]), record=["z", "attn_out", "mlp_out"])
    corrupt_tok = induction_model.encode([counter_p])
    vocab = tiny_tok.get_vocab()
    answers = Answers(answer=torch.tensor([vocab[result.answer]]), foil=torch.tensor([vocab[result.foil]]))
    assert result.clean - result.corrupt > 0.5  # the pair of prompts matters to the model
    for label, exact in zip(result.sites, result.exact.tolist(), strict=True):
        kind, layer, pos, head = _parse(label)
        ref = _full_rerun(
            induction_model, corrupt_tok, (kind, layer, pos, head), clean.value(kind, layer), answers
        )
        assert ref - result.corrupt == pytest.approx(exact, abs=1e-4)


def test_answer_is_the_top_token_and_the_foil_the_counterfactual_top(induction_model, prompts, result):
    clean_p, counter_p = prompts
    tok = induction_model.tokenizer
    top = int(induction_model.logits(induction_model.encode([clean_p]))[0, -1].argmax())
    cf = induction_model.logits(induction_model.encode([counter_p]))[0, -1].argsort(descending=True)
    assert result.answer == tok.decode([top])
    foil = int(cf[0]) if int(cf[0]) != top else int(cf[1])
    assert result.foil == tok.decode([foil])
    forced = live_sweep(induction_model, clean_p, counter_p, answer=result.foil, top_k=2)
    assert forced.answer == result.foil and forced.foil != forced.answer


def test_attribution_matches_the_attribution_module(induction_model, prompts, result, tiny_tok):
    clean_p, counter_p = prompts
    vocab = tiny_tok.get_vocab()
    answers = Answers(answer=torch.tensor([vocab[result.answer]]), foil=torch.tensor([vocab[result.foil]]))
    src = trace(induction_model, induction_model.encode([clean_p]), record=["z"])
    tgt = trace(induction_model, induction_model.encode([counter_p]))
    resid = attribute(tgt, src, answers, "resid_pre")[:, 0]
    assert torch.allclose(result.resid_estimate, resid, atol=1e-5)
    z = attribute(tgt, src, answers, "z")[:, 0]  # layer pos head
    for label, est in zip(result.sites, result.estimate.tolist(), strict=True):
        kind, layer, pos, head = _parse(label)
        if kind == "z":
            assert float(z[layer, pos, head]) == pytest.approx(est, abs=1e-5)
    # the top sites are the largest |estimates| among every attributed site
    assert result.estimate.abs().tolist() == sorted(result.estimate.abs().tolist(), reverse=True)
    assert float(z.abs().max()) <= float(result.estimate.abs()[0]) + 1e-6


def test_result_figure_summary_and_roundtrip(result, tmp_path):
    fig = result.figure()
    assert {t.type for t in fig.data} == {"heatmap", "bar"}
    s = result.summary()
    assert s["sites_patched"] == 6 and s["sites_attributed"] == 2 * 19 * (2 + 4)
    back = load_result(result.save(tmp_path / "live"))
    assert back.sites == result.sites and torch.equal(back.exact, result.exact)
    assert len(result.to_frame()) == 6


def test_bad_inputs(induction_model, prompts, tiny_tok):
    clean_p, _ = prompts
    with pytest.raises(PromptError, match="19 tokens but the counterfactual has 3"):
        live_sweep(induction_model, clean_p, _words(tiny_tok, [1, 2, 3]))
    with pytest.raises(PromptError, match="empty"):
        live_sweep(induction_model, "  ", clean_p)
    with pytest.raises(ConfigError, match="top_k"):
        live_sweep(induction_model, clean_p, clean_p, top_k=0)


def test_the_package_exports_live_sweep_lazily():
    code = (
        "import sys, circuits; "
        "assert 'circuits.patching.live' not in sys.modules and 'torch' not in sys.modules; "
        "f = circuits.live_sweep; assert 'circuits.patching.live' in sys.modules; print(f.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "live_sweep"
