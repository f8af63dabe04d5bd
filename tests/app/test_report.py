"""``tunelens report``: one self-contained HTML file with every figure of a results folder."""

from __future__ import annotations

import re

import pytest

from tunelens.errors import StoreError
from tunelens.faces import catalog
from tunelens.faces.cli import main
from tunelens.faces.report import write_report

pytestmark = pytest.mark.app


def test_report_holds_every_figure_with_plotly_inlined_once(app_results, tmp_path):
    out = write_report(app_results, out=tmp_path / "r.html")
    text = out.read_text()
    entries = catalog.scan(app_results)
    assert len(entries) >= 3
    for e in entries:
        assert f"<h3>{e.name}</h3>" in text
    # plotly.js once (self-contained, no CDN), one drawn figure per result, no failure notes
    assert len(re.findall(r"plotly\.js v\d", text)) == 1 and "<script src=" not in text
    assert text.count("Plotly.newPlot(") == len(entries)
    assert "figure() failed" not in text and "cannot be read" not in text
    # a short text per analysis: its description and the headline numbers of each result
    assert catalog.BY_KEY["probes"].about in text and "best_accuracy" in text


def test_report_cli_and_bad_folder(app_results, tmp_path, capsys):
    assert main(["report", str(app_results), "--out", str(tmp_path / "x.html")]) == 0
    assert str(tmp_path / "x.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(StoreError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_report_of_an_empty_folder_says_so(tmp_path):
    text = write_report(tmp_path).read_text()
    assert "holds no results yet" in text and "tunelens demo" in text
