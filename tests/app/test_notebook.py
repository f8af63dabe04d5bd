"""The Jupyter tour executes top to bottom (on the tiny pair), and its Results render rich summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.app

TOUR = Path(__file__).resolve().parents[2] / "notebooks" / "tour.ipynb"


def test_tour_notebook_runs(app_pair_dirs, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("TUNELENS_TOUR_PAIR", "|".join(app_pair_dirs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(TOUR, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(TOUR.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("ProbeResult" in h for h in html) and any("AtlasResult" in h for h in html)
    plots = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plots) >= 4, "every analysis shows its figure"
    assert any("report.html" in "".join(o.get("text", "")) for o in outputs)
