"""bfloat16 on CPU, on a saved tiny pair of each family: the self-checks pass at half precision's
tolerance, CMAP and the probe study agree with float32 within a stated tolerance, tunelens's own numbers
come out in float32, and a pair of two dtypes is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from circuits.patching.cmap import cmap_sweep
from probes.config import ProbeConfig
from probes.studies.entity_tracking import entity_tracking_study
from probes.studies.settings import EntityTrackingSettings
from spectral.intruders import IntruderConfig, intruders
from tests.unit.families.helpers import perturbed_copy, save_pair
from tests.unit.families.names import NAMES
from tunelens.checks import check_pair
from tunelens.errors import ConfigError, PairIncompatibleError
from tunelens.models.pair import ModelPair
from tunelens.models.resolve import load_model, load_pair
from tunelens.models.tiny import TinyConfig, tiny_family
from tunelens.tasks import entity_tracking as et

CMAP_TOLERANCE = 0.02  # bf16 vs float32, relative to the largest |logit| (+1): bf16 keeps 8 bits (0.4 %)


def _folders(name: str, tok, root: Path) -> tuple[str, str]:
    model = tiny_family(name, TinyConfig(n_layers=2), len(tok.get_vocab()), seed=0, sliding_window=6)
    base, tuned = save_pair(tok, root, model, perturbed_copy(model, 0.1))
    return str(base), str(tuned)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_checks_pass_and_cmap_agrees_with_float32(name, tiny_tok, tmp_path):
    base, tuned = _folders(name, tiny_tok, tmp_path)
    half = load_pair(base, tuned, dtype="bfloat16")
    full = load_pair(base, tuned)
    assert half.base.dtype == torch.bfloat16 and full.base.dtype == torch.float32
    failed = [r.line() for r in check_pair(half) if not r.passed]
    assert not failed, failed
    data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=2), seed=0).encode(tiny_tok)
    a = cmap_sweep(half, data).values["logit_diff"]
    b = cmap_sweep(full, data).values["logit_diff"]
    assert a.dtype == torch.float32  # the metric is computed in float32 from bf16 logits
    scale = float(full.base.logits(data.tokens).abs().max())
    assert float((a - b).abs().max()) <= CMAP_TOLERANCE * (scale + 1)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_bfloat16_probes_and_intruders_accumulate_in_float32(name, tiny_tok, tmp_path):
    base, tuned = _folders(name, tiny_tok, tmp_path)
    half, full = load_pair(base, tuned, dtype="bfloat16"), load_pair(base, tuned)
    settings = EntityTrackingSettings(n_contexts=12, batch_size=12, probe=ProbeConfig(min_test_items=5))
    rh, rf = entity_tracking_study(half, settings), entity_tracking_study(full, settings)
    assert rh.weight.dtype == rf.weight.dtype  # fitted in the same precision whatever the model's
    for role in ("base", "tuned"):  # 11 test examples a layer: bf16 may flip one or two
        assert float((rh.curve(role) - rf.curve(role)).abs().max()) <= 0.25
    cfg = IntruderConfig(baselines=(), kinds=("q", "v"))
    mh, mf = intruders(half, cfg).max_sim, intruders(full, cfg).max_sim
    assert mh.dtype == torch.float32
    assert float((mh - mf).abs().max()) <= 0.05  # bf16 rounding of the weights (8 bits of mantissa)


def test_a_pair_of_two_dtypes_and_an_unknown_dtype_are_refused(tiny_tok, tmp_path):
    base, tuned = _folders("qwen2", tiny_tok, tmp_path)
    with pytest.raises(
        PairIncompatibleError, match=r"dtype differs: base .* is bfloat16, tuned .* is float32"
    ):
        ModelPair(load_model(base, dtype="bfloat16"), load_model(tuned))
    with pytest.raises(
        ConfigError, match="unknown dtype 'float8'; expected one of float32, bfloat16, float16"
    ):
        load_pair(base, tuned, dtype="float8")
