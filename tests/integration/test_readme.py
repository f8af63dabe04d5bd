"""The README's Python tour runs as written (on the real SmolLM2 pair)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python tour"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # the tour's cross-model patch must actually change the base model's output
    unpatched = namespace["pair"].base.logits(namespace["batch"])
    assert (namespace["patched"].logits - unpatched).abs().max() > 1e-4
