"""``tunelens report``: one self-contained HTML file with every figure and a short text per analysis.

The page is readable offline: plotly's JavaScript is inlined once in the head, each figure is a ``div``
drawn from its JSON, and each result gets its headline numbers (``summary()``) as a small table. A result
that cannot be read or drawn is named with the reason instead of being left out silently.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> write_report(d).name
    'report.html'
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tunelens.errors import TunelensError
from tunelens.faces.catalog import ANALYSES, Entry, by_analysis, check_folder, folder_summary, scan
from tunelens.io import atomic_write_text
from tunelens.results import load_result

log = logging.getLogger(__name__)

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table.s{border-collapse:collapse;margin:.5em 0} table.s td{padding:2px 10px;border-bottom:1px solid #eee}
table.s td:first-child{color:#555} .meta{color:#666;font-size:.9em} .err{color:#a00;font-weight:600}
nav a{margin-right:1em}
"""


def _summary_table(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in summary.items()
    )
    return f"<table class='s'>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)[:300]
    return str(v)


def _section(entry: Entry, index: int) -> str:
    head = f"<h3>{html.escape(entry.name)}</h3><p class='meta'>{html.escape(entry.class_name)}</p>"
    try:
        result = load_result(entry.path)
    except TunelensError as exc:
        return head + f"<p class='err'>cannot be read: {html.escape(str(exc))}</p>"
    text = f"<p>{html.escape(result.title)}</p>" + _summary_table(entry.summary or _summary(result))
    try:
        fig = result.figure()
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{index}")
    except Exception as exc:  # an analysis' figure() failing is reported in the page, not hidden
        log.warning("report: %s figure() failed: %s", entry.name, exc)
        why = f"{type(exc).__name__}: {exc}"
        div = f"<p class='err'>figure() failed: {html.escape(why)}</p>"
    return head + text + div


def _summary(result: Any) -> dict[str, Any]:
    try:
        return result.summary()
    except Exception as exc:  # reported in the page
        return {"summary() failed": f"{type(exc).__name__}: {exc}"}


def _pair_block(root: Path, entries: list[Entry]) -> str:
    info = folder_summary(root)
    models = info.get("steps", {}).get("models", {}).get("pair", {}) if isinstance(info, dict) else {}
    lines = []
    if models:
        lines.append(f"<p>Pair <b>{html.escape(str(models.get('name', '')))}</b></p>")
        rows = {
            f"{role}": f"{m.get('name')} · {m.get('source')} · hash {m.get('hash')}"
            for role, m in models.get("models", {}).items()
        }
        lines.append(_summary_table(rows))
    else:
        pairs = {json.dumps(e.pair, sort_keys=True) for e in entries if e.pair}
        for p in sorted(pairs):
            d = json.loads(p)
            lines.append(
                f"<p>Pair <b>{html.escape(d.get('name', '?'))}</b> (base {html.escape(d.get('base', '?'))}, "
                f"tuned {html.escape(d.get('tuned', '?'))})</p>"
            )
    return "".join(lines)


def render_report(results_dir: str | os.PathLike[str]) -> str:
    """The report of ``results_dir`` as one HTML string (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    root = check_folder(results_dir)
    entries = scan(root)
    sections, nav = [], []
    n = 0
    for a in ANALYSES:
        mine = by_analysis(entries, a.key)
        if not mine:
            continue
        nav.append(f"<a href='#{a.key}'>{html.escape(a.title)}</a>")
        parts = [f"<h2 id='{a.key}'>{html.escape(a.title)}</h2><p>{html.escape(a.about)}</p>"]
        for e in mine:
            parts.append(_section(e, n))
            n += 1
        sections.append("".join(parts))
    missing = [a.title for a in ANALYSES if a.key != "other" and not by_analysis(entries, a.key)]
    body = (
        f"<h1>tunelens report</h1><p class='meta'>{html.escape(str(root.resolve()))} · "
        f"{time.strftime('%Y-%m-%d %H:%M')} · {len(entries)} results</p>"
        + _pair_block(root, entries)
        + (f"<nav>{''.join(nav)}</nav>" if nav else "")
        + (
            "".join(sections)
            if sections
            else "<p>This folder holds no results yet; run <code>tunelens demo --out DIR</code>.</p>"
        )
        + (
            f"<p class='meta'>Not in this folder: {html.escape(', '.join(missing))}.</p>"
            if missing and sections
            else ""
        )
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tunelens report</title>"
        f"<style>{_STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body>{body}</body></html>\n"
    )


def write_report(results_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of ``results_dir`` (default ``results_dir/report.html``); returns its path."""
    out_path = Path(out) if out is not None else Path(results_dir) / "report.html"
    text = render_report(results_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, text)
    return out_path
