"""Fixtures for the batch-job tests: a tiny pair saved as two HF folders, and small real job files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelens.models.tiny import TinyConfig, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama pair (2 layers; tuned = base + seeded noise) saved as HF folders any process can load."""
    root = tmp_path_factory.mktemp("job-pair")
    tok = tiny_tokenizer()
    base = tiny_llama(TinyConfig(n_layers=2), len(tok.get_vocab()), seed=0)
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = {}
    for role, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        out[role] = str(root / role)
    return out


def job_dict(pair_dirs: dict[str, str], **over: Any) -> dict[str, Any]:
    """A small but real probe job: 60 entity-tracking prompts, resid_post at both layers, 2 probe kinds."""
    d: dict[str, Any] = {
        "kind": "probe",
        "output": "out",
        "pair": dict(pair_dirs),
        "task": {"name": "entity_tracking", "n": 60, "seed": 0, "label": "query_is_first"},
        "sites": ["resid_post"],
        "probes": ["logistic", "diff_means"],
        "seeds": [0, 1],
        "probe": {"min_test_items": 5},
        "cache": {"shard_size": 16, "batch_size": 16},
    }
    d.update(over)
    return d


@pytest.fixture
def write_job(tmp_path, pair_dirs):
    """``write_job(name="job.yaml", folder=tmp_path, **overrides) -> Path`` of a job file."""

    def write(name: str = "job.yaml", folder: Path | None = None, **over: Any) -> Path:
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(yaml.safe_dump(job_dict(pair_dirs, **over)))
        return path

    return write


def output_files(root: Path) -> dict[str, Path]:
    """Every file a job wrote except its bookkeeping (``job/``: timings differ between runs)."""
    return {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "job"
    }


def hidden_entries(root: Path) -> list[str]:
    """Temp files/folders (names starting with '.') anywhere under ``root``."""
    return [str(p.relative_to(root)) for p in root.rglob(".*")]


def assert_same_outputs(ref: Path, other: Path, atol: float = 1e-6, rtol: float = 1e-5) -> float:
    """Both job folders hold the same files with the same tensors and JSON numbers (within ``atol`` plus
    ``rtol`` of the tensor's or number's magnitude); returns the largest absolute difference.

    Not bit-identical on purpose: a unit run in another process (pool, Ray) may run torch at another thread
    count, and a fit's float32 rounding then differs; probe weights reach ~3e2, so only a bound relative to
    the magnitude says "the same result" on every machine."""
    a, b = output_files(ref), output_files(other)
    assert sorted(a) == sorted(b), f"files differ: {sorted(set(a) ^ set(b))}"
    worst = 0.0
    for rel, pa in a.items():
        pb = b[rel]
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(pa)), load_file(str(pb))
            assert sorted(ta) == sorted(tb), rel
            for k in ta:
                x, y = ta[k].double(), tb[k].double()
                assert x.shape == y.shape, (rel, k)
                same_nan = torch.equal(x.isnan(), y.isnan())
                assert same_nan, (rel, k, "NaN pattern differs")
                diff = (x - y).nan_to_num().abs().max().item() if x.numel() else 0.0
                scale = x.nan_to_num().abs().max().item() if x.numel() else 0.0
                worst = max(worst, diff)
                assert diff <= atol + rtol * scale, (rel, k, diff, scale)
        elif rel.endswith(".json"):
            ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
            assert _close(ja, jb, atol, rtol), rel
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel
    return worst


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], atol, rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, atol, rtol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return (a != a and b != b) or abs(a - b) <= atol + rtol * max(abs(a), abs(b))
    return a == b
