"""The import contracts in pyproject.toml name every module they must: a new core module left out of the
lists would escape the dependency rule silently (``lint-imports`` itself runs in scripts/test.sh)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = {
    c["name"]: c
    for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}


def _core_modules() -> set[str]:
    """The top-level modules and packages of tunelens/, but the faces."""
    names = {p.stem for p in (ROOT / "tunelens").glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in (ROOT / "tunelens").iterdir() if (p / "__init__.py").exists()}
    return {f"tunelens.{n}" for n in names} - {"tunelens.faces"}


def test_the_core_contract_lists_every_core_module():
    contract = CONTRACTS["the core imports no analysis and no face"]
    assert set(contract["source_modules"]) == _core_modules()
    assert {"tunelens.faces", "probes", "circuits", "spectral", "app"} == set(contract["forbidden_modules"])


def test_the_backends_contract_covers_everything_but_the_backends():
    contract = CONTRACTS["only tunelens.backends imports transformer_lens or nnsight"]
    want = (_core_modules() - {"tunelens.backends"}) | {
        "app",
        "probes",
        "circuits",
        "spectral",
        "tunelens.faces",
    }
    assert set(contract["source_modules"]) == want


def test_the_layers_keep_the_analyses_independent():
    contract = CONTRACTS["faces above the analyses above the core; the analyses never import each other"]
    assert contract["layers"] == ["app", "tunelens.faces", "probes | circuits | spectral"]
