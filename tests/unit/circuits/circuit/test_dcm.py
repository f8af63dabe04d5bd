"""DCM on a toy where one head carries the answer: the masks find that head and only that head."""

from __future__ import annotations

import pytest
import torch

from circuits.circuit.dcm import DCMConfig, DCMResult, dcm
from tests.conftest import make_tiny
from tunelens.backends.base import TokenBatch
from tunelens.errors import ConfigError, ShapeError, SiteError
from tunelens.models.tiny import TinyConfig
from tunelens.results import load_result
from tunelens.sites import Site

PLANTED = (1, 2)
HEADS = [(lay, h) for lay in range(2) for h in range(4)]


@pytest.fixture(scope="module")
def toy(tiny_tok):
    """Layer-1 head 2's output is scaled up until it decides the prediction at the last position."""
    model = make_tiny(tiny_tok, seed=5, cfg=TinyConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2))
    with torch.no_grad():
        o = model.hf.model.layers[1].self_attn.o_proj.weight
        o[:, PLANTED[1] * 16 : (PLANTED[1] + 1) * 16] *= 300
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 80, (2, 96, 8), generator=gen)
    mask = torch.ones(96, 8, dtype=torch.long)
    base, source = (TokenBatch(input_ids=i, attention_mask=mask) for i in ids)
    with torch.no_grad():
        want = model.logits(source)[:, -1].argmax(-1)  # the desideratum: what the source run predicts
        keep = model.logits(base)[:, -1].argmax(-1) != want
    return model, base.select(keep), source.select(keep), want[keep]


@pytest.fixture(scope="module")
def result(toy) -> DCMResult:
    model, base, source, want = toy
    cfg = DCMConfig(epochs=15, batch_size=16, lam=0.05)
    return dcm(model, base, source, want, heads=HEADS, position=7, config=cfg, desideratum="source answer")


def test_dcm_recovers_the_planted_head(result):
    assert result.selected == [PLANTED]
    assert result.base_accuracy < 0.2  # nothing patched: the base's own answer
    assert result.test_accuracy > 0.8
    assert result.test_accuracy >= result.all_patched_accuracy - 0.1


def test_the_planted_head_alone_realises_the_desideratum(toy, result):
    """Independent of the optimiser: a brute force over single heads, one patched at a time."""
    from circuits.patching.engine import Patch, run_cells, trace
    from circuits.patching.metrics import Answers

    model, base, source, want = toy
    cells = [(Patch(Site("z", lay, h), 7),) for lay, h in HEADS]
    last = run_cells(trace(model, base), trace(model, source, record=["z"]), cells, Answers(answer=want))
    acc = (last.selected[..., 0] >= last.top).float().mean(-1)
    assert int(acc.argmax()) == HEADS.index(PLANTED) and acc.max() > 0.8


def test_result_roundtrip(result, tmp_path):
    back = load_result(result.save(tmp_path / "dcm"), expect=DCMResult)
    assert back.selected == result.selected and torch.equal(back.mask, result.mask)
    assert result.figure().data[0].type == "bar" and len(result.to_frame()) == len(HEADS)
    assert result.summary()["selected"] == ["L1.h2"]


def test_bad_inputs(toy):
    model, base, source, want = toy
    with pytest.raises(ShapeError, match="one token id per prompt"):
        dcm(model, base, source, want[:3], heads=HEADS, position=7)
    with pytest.raises(ConfigError, match="at least one head"):
        dcm(model, base, source, want, heads=[], position=7)
    with pytest.raises(SiteError, match="does not exist"):
        dcm(model, base, source, want, heads=[(2, 0)], position=7)
    with pytest.raises(ShapeError, match="outside the prompts"):
        dcm(model, base, source, want, heads=HEADS, position=8)
    with pytest.raises(ConfigError, match="lam"):
        DCMConfig(lam=-1)
