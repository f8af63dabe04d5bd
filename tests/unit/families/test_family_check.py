"""``tunelens check`` on a saved tiny model of every declared family: a full-fine-tune pair of folders, and
(GPT-2) a LoRA adapter folder, where the bridge must be reported as refused and everything else must pass."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.families.helpers import perturbed_copy, save_pair
from tests.unit.families.names import NAMES
from tunelens.checks import check_pair
from tunelens.families import FAMILIES
from tunelens.models.resolve import load_pair
from tunelens.models.tiny import TinyConfig, tiny_family


def _folders(name: str, tok, root: Path) -> tuple[Path, Path, Path]:
    from peft import LoraConfig, get_peft_model

    fam = FAMILIES[name]
    model = tiny_family(name, TinyConfig(n_layers=2), len(tok.get_vocab()), seed=0, sliding_window=5)
    paths = (*save_pair(tok, root, model, perturbed_copy(model, 0.05)), root / "lora")
    lora = LoraConfig(
        r=2, target_modules=[fam.qkv[0].split(".")[-1]], fan_in_fan_out=fam.conv1d, init_lora_weights=False
    )
    get_peft_model(copy.deepcopy(model), lora).save_pretrained(paths[2])
    return paths


@pytest.mark.parametrize("name", NAMES)
def test_check_passes_on_every_family(name, tiny_tok, tmp_path):
    base, tuned, _ = _folders(name, tiny_tok, tmp_path)
    results = check_pair(load_pair(str(base), str(tuned)))
    failed = [r.line() for r in results if not r.passed]
    assert not failed, failed
    names = [r.name for r in results]
    assert any("engine logits vs HF" in n for n in names)
    assert any("bridge vs nnsight activations" in n for n in names)
    assert names[-1].startswith("cross-model patch of one head")


def test_check_on_a_gpt2_lora_reports_the_bridge_refused_and_passes(tiny_tok, tmp_path):
    base, _, lora = _folders("gpt2", tiny_tok, tmp_path)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tunelens.faces.cli", "check", str(base), "--tuned", str(lora)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bridge refused" in out.stdout and "use backend='nnsight'" in out.stdout
    assert "0 failed" in out.stdout


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3"])
def test_a_merged_adapter_pair_is_the_switch_pair_and_the_bridge_runs_it(name, tiny_tok, tmp_path):
    """Merged into a plain model, an adapter on fused projections is no longer a trap for the bridge: the
    merged pair passes every check (bridge included) and its tuned model is the switch pair's."""
    base, _, lora = _folders(name, tiny_tok, tmp_path)
    merged = load_pair(str(base), str(lora), mode="merged")
    switch = load_pair(str(base), str(lora), mode="switch")
    results = check_pair(merged)
    assert not [r.line() for r in results if not r.passed]
    assert not any("refused" in r.name for r in results)
    batch = merged.base.encode(["The pen is in Box C. Box C contains the"])
    torch.testing.assert_close(merged.tuned.logits(batch), switch.tuned.logits(batch), atol=1e-5, rtol=1e-5)
