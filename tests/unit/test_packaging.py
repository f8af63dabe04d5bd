"""The package declares ranges and the lock pins one tested set inside them: every dependency and extra of
pyproject.toml has a pin in constraints.txt that its range accepts, torch is the CPU-build pin, and the
Python bound is open above."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_range_accepts_its_pin():
    pins = _pins()
    declared = [
        *PROJECT["dependencies"],
        *(d for group in PROJECT["optional-dependencies"].values() for d in group),
    ]
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{text} does not accept {pins[name]}"
        assert req.specifier, f"{req.name} has no lower bound"


def test_the_ranges_are_ranges_and_python_is_open_above():
    exact = [d for d in PROJECT["dependencies"] if "==" in d]
    assert not exact, f"exact pins belong in constraints.txt, not in the package: {exact}"
    assert PROJECT["requires-python"] == ">=3.11"
    assert _pins()["torch"] == Version("2.13.0")  # the CPU build on these machines
