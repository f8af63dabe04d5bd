"""The tiny zoo built for real (seconds), and the CLI on it."""

import json

import pytest
import torch

from tunelens.faces.cli import main
from tunelens.models import zoo


@pytest.fixture(scope="module")
def built():
    return zoo.build("tiny-lora")


def test_build_records_held_out_accuracy_and_an_honest_verdict(built):
    assert built["base"] == "tiny" and built["kind"] == "lora"
    test = built["tuned_accuracy"]["test"]
    assert test["n"] >= 100 and 0 <= test["accuracy"] <= 1
    gain = built["gain"]["test"]
    assert ("did NOT" in built["verdict"]) == (gain < zoo.MIN_GAIN)
    assert zoo.is_built("tiny") and json.loads((zoo.path("tiny") / "zoo.json").read_text())["kind"] == "root"


def test_root_learned_induction(built):
    first, last = zoo.report("tiny")["loss_first_last"]
    assert last < 0.2 * first


def test_switch_pair_equals_merged_model(built):
    pair = zoo.load_pair("tiny-lora")
    merged = zoo.load("tiny-lora")
    plain = zoo.load("tiny")
    batch = pair.base.encode(["The cup is in Box F. The key is in Box Q. Box Q contains the"])
    assert torch.allclose(pair.tuned.logits(batch), merged.logits(batch), atol=1e-5)
    # adapter off runs only the base layers: the plain model's kernels on its weights
    assert torch.allclose(pair.base.logits(batch), plain.logits(batch), atol=1e-6)
    assert pair.base.content_hash == plain.content_hash != pair.tuned.content_hash


def test_cli_lists_informs_and_checks(built, capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-lora" in out and "smollm2-et-lora-r8" in out
    assert main(["info", "tiny-lora"]) == 0
    out = capsys.readouterr().out
    assert zoo.load_pair("tiny-lora").tuned.content_hash in out and "verdict" in out
    assert main(["check", "tiny-lora"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out


def test_cli_cache_writes_a_resumable_store(built, tmp_path, capsys):
    args = ["cache", "tiny-lora", "--task", "entity_tracking", "--n", "30", "--sites", "resid_post,z.1",
            "--out", str(tmp_path / "acts"), "--shard-size", "8"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0  # a rerun finds every shard complete
    out = capsys.readouterr().out
    assert "complete=True" in out
    manifest = json.loads((tmp_path / "acts" / "base" / "manifest.json").read_text())
    assert "resid_post.3" in manifest["spec"]["sites"] and "z.1" in manifest["spec"]["sites"]
