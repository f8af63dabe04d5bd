"""Safe defaults (issue 9): nothing is unpickled, no shipped code runs unless asked, no secret is written.

The static checks read the source of every package with ``ast``, so a new ``torch.load`` without
``weights_only=True`` or a ``yaml.load`` fails here before it reaches a user.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tunelens.cache import CacheConfig, cache_to_store
from tunelens.errors import ModelLoadError
from tunelens.models.resolve import load_model
from tunelens.sites import Site
from tunelens.tasks.entity_tracking import EntityTrackingConfig, generate

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tunelens", "probes", "circuits", "spectral", "app", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_sources_were_found():
    assert len(_sources()) > 30


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_uses_only_safe_loaders(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    for call, func in _calls(tree):
        where = f"line {call.lineno}: {func}(...)"
        if func.endswith("torch.load"):
            wo = _keyword(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{where} without weights_only=True")
        if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{where}: use yaml.safe_load")
        if func in ("eval", "exec"):
            problems.append(f"{where} runs code from data")
        trc = _keyword(call, "trust_remote_code")
        if isinstance(trc, ast.Constant) and trc.value is True:
            problems.append(f"{where} turns trust_remote_code on unconditionally")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_a_model_folder_that_ships_code_is_refused_and_its_code_never_runs(tmp_path, tiny_model):
    folder = tmp_path / "remote-code-model"
    tiny_model.hf.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    sentinel = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    cfg["model_type"] = "evil-remote"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="could not load the"):
        load_model(folder)
    assert not sentinel.exists()


def test_no_secret_reaches_a_store_or_a_result(tmp_path, tiny_pair, monkeypatch):
    secret = "hf_SECRETsecretSECRET123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    data = generate(EntityTrackingConfig(n_boxes=2, n_contexts=2), seed=0)
    cfg = CacheConfig(sites=(Site("resid_post", 1),), positions="last")
    cache_to_store(tiny_pair, data, cfg, tmp_path / "acts", shard_size=4)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert secret.encode() not in p.read_bytes(), f"{p} contains the token"
