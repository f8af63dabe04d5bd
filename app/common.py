"""What every page shares: the results folder, the loaded pair, cached loading, and showing a Result.

UI only: everything computed here is a call into tunelens or an analysis package. Models are held with
``st.cache_resource`` (keyed by every argument that changes them), results with ``st.cache_data``.
Every user-caused error is shown as ``st.error`` with the TunelensError's message, and the app goes on.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import streamlit as st

from tunelens.errors import TunelensError
from tunelens.faces import catalog
from tunelens.faces.atlas import AtlasCache
from tunelens.faces.jobs.runner import JOB_DIR, MANIFEST
from tunelens.models import resolve, zoo
from tunelens.results import load_result

DEFAULT_RESULTS = "results/demo"
RESULTS_ENV = "TUNELENS_RESULTS"
PAIR_ENV = "TUNELENS_APP_PAIR"


# -- state -----------------------------------------------------------------------------------------------
def init_state() -> None:
    """Defaults of the session: the results folder (from ``tunelens app DIR``) and no pair loaded yet."""
    if "results_dir" not in st.session_state:
        st.session_state["results_dir"] = os.environ.get(RESULTS_ENV, DEFAULT_RESULTS)
    if "pair_spec" not in st.session_state:
        spec = os.environ.get(PAIR_ENV, "")
        st.session_state["pair_spec"] = tuple(spec.split("|", 1)) if "|" in spec else None


def sidebar() -> None:
    # The widget has its own key and copies into "results_dir": Streamlit drops a widget's state when the
    # page changes, and the folder must survive page changes.
    st.session_state["results_dir_input"] = st.session_state["results_dir"]
    st.sidebar.text_input(
        "Results folder",
        key="results_dir_input",
        on_change=_copy_results_dir,
        help="A folder written by `tunelens demo --out DIR` or a batch job; every page reads it.",
    )
    spec = st.session_state.get("pair_spec")
    st.sidebar.caption(f"Pair: **{pair_label(spec)}**" if spec else "Pair: none loaded (Pair page)")


def _copy_results_dir() -> None:
    st.session_state["results_dir"] = st.session_state["results_dir_input"]


def results_dir() -> str:
    return str(st.session_state.get("results_dir", DEFAULT_RESULTS)).strip()


def pair_label(spec: tuple[str, str] | None) -> str:
    if not spec:
        return ""
    base, tuned = spec
    return base if not tuned else f"{base} → {tuned}"


# -- cached loading --------------------------------------------------------------------------------------
@st.cache_resource(max_entries=2, show_spinner="Loading the pair (once) ...")
def load_pair(base: str, tuned: str, device: str = "cpu"):
    """A pair, held across reruns and sessions: a zoo pair name (``tuned`` empty) or two references."""
    return resolve.load_pair(base, tuned or None, device=device)


def current_pair():
    """The pair chosen on the Pair page, or None (loading errors are shown and give None)."""
    spec = st.session_state.get("pair_spec")
    if not spec:
        return None
    try:
        return load_pair(spec[0], spec[1] or "")
    except TunelensError as exc:
        st.error(f"The pair {pair_label(spec)!r} cannot be loaded: {exc}")
        return None


@st.cache_data(show_spinner=False, max_entries=64)
def _load_result(path: str, mtime: float):
    return load_result(path)


def load(entry: catalog.Entry):
    return _load_result(str(entry.path), entry.mtime)


@st.cache_data(show_spinner=False, max_entries=64)
def _figure(path: str, mtime: float, kwargs: tuple[tuple[str, Any], ...]):
    return _load_result(path, mtime).figure(**dict(kwargs))


@st.cache_resource(show_spinner=False)
def atlas_cache() -> AtlasCache:
    """The layer atlas's decompositions, frames and loaded results, held by the app for every session (the
    atlas keeps nothing between calls by itself)."""
    return AtlasCache()


def scan() -> list[catalog.Entry] | None:
    """The results in the chosen folder; on a bad folder, says why and returns None."""
    try:
        return catalog.scan(results_dir())
    except TunelensError as exc:
        st.error(str(exc))
        return None


def folder_pair(root: str | os.PathLike[str]) -> str | None:
    """The zoo pair that produced the results folder ``root``: the pair of the demo's ``summary.json``
    (``settings.pair``), else the pair most of its results were computed on (their recorded provenance).
    None when neither names a zoo pair, or the folder cannot be read (the Pair page says nothing then)."""
    settings = catalog.folder_summary(root).get("settings")
    name = settings.get("pair") if isinstance(settings, dict) else None
    if isinstance(name, str) and name in zoo.PAIRS:
        return name
    try:
        entries = catalog.scan(root)
    except TunelensError:
        return None
    counts = Counter(e.pair.get("name") for e in entries if e.pair.get("name") in zoo.PAIRS)
    return counts.most_common(1)[0][0] if counts else None


def job_folders(root: str | os.PathLike[str], depth: int = 3) -> list[Path]:
    """The batch-job folders in ``root``: ``root`` itself and its subfolders (down to ``depth`` levels)
    that hold a job's records (``job/manifest.json``, what the job runner writes first), in order."""
    root = Path(root)
    found = []
    for level in range(depth + 1):
        for manifest in sorted(root.glob("/".join(["*"] * level + [JOB_DIR, MANIFEST]))):
            folder = manifest.parent.parent
            if not any(part.startswith(".") for part in folder.relative_to(root).parts):
                found.append(folder)
    return found


# -- showing results -------------------------------------------------------------------------------------
def show_summary(summary: dict[str, Any]) -> None:
    if not summary:
        return
    numeric = [(k, v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    for start in range(0, min(len(numeric), 8), 4):
        cols = st.columns(4)
        for col, (k, v) in zip(cols, numeric[start : start + 4], strict=False):
            col.metric(str(k), f"{v:.3g}" if isinstance(v, float) else str(v))
    rest = {k: v for k, v in summary.items() if (k, v) not in numeric[:8]}
    if rest:
        st.table({"headline": list(rest), "value": [_text(v) for v in rest.values()]})


def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def figure_widgets(result: Any, key: str) -> dict[str, Any]:
    """Widgets for the options of ``result.figure()``: a select box per ``Literal`` option or per text
    option whose values the result names (:func:`text_choices`), a check box per ``bool``, a number box per
    ``int`` (generic: any Result's figure options become controls)."""
    try:
        params = inspect.signature(result.figure).parameters
        hints = typing.get_type_hints(result.figure)
    except (TypeError, ValueError, NameError):
        return {}
    out: dict[str, Any] = {}
    cols = st.columns(max(1, min(4, len(params))))
    i = 0
    for name, p in params.items():
        if p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(name)
        col = cols[i % len(cols)]
        choices = text_choices(result, name) if hint in (str, str | None) else None
        if typing.get_origin(hint) is typing.Literal or choices:
            options = choices or list(typing.get_args(hint))
            index = options.index(p.default) if p.default in options else 0
            out[name] = col.selectbox(name, options, index=index, key=f"{key}:{name}")
        elif hint is bool:
            out[name] = col.checkbox(name, value=p.default, key=f"{key}:{name}")
        elif hint is int and isinstance(p.default, int):
            out[name] = int(col.number_input(name, value=p.default, step=1, key=f"{key}:{name}"))
        else:
            continue
        i += 1
    return out


def text_choices(result: Any, name: str) -> list[str] | None:
    """The values a text option of ``result.figure()`` can take, when the result says so: ``metric`` from
    the metrics the result holds, ``task`` from its tasks. None when unknown (no widget is made); options
    with a fixed set of values (``view``) are ``Literal`` in the figure's signature instead."""
    if name == "metric":
        values = getattr(result, "values", None)
        if isinstance(values, dict) and values:
            return [str(k) for k in values]
        table = getattr(result, "table", None)
        columns = [str(c) for c in getattr(table, "columns", [])]
        metrics = [c.removeprefix("gap_") for c in columns if c.startswith("gap_")]
        return metrics or None
    if name == "task":
        tasks = [str(t) for t in getattr(result, "tasks", ()) or ()]
        return tasks or None
    return None


def show_figure(entry: catalog.Entry, kwargs: dict[str, Any] | None = None, key: str = "") -> bool:
    """The Result's own plotly figure; an analysis that cannot draw is reported, not fatal."""
    try:
        fig = _figure(str(entry.path), entry.mtime, tuple(sorted((kwargs or {}).items())))
    except TunelensError as exc:
        st.error(f"{entry.name}: {exc}")
        return False
    except Exception as exc:  # an analysis' figure() bug must not take the app down; it is shown
        st.error(f"{entry.name}: figure() failed: {type(exc).__name__}: {exc}")
        return False
    st.plotly_chart(fig, width="stretch", key=key or f"fig:{entry.name}")
    return True


def show_result(entry: catalog.Entry, *, kwargs: dict[str, Any] | None = None, frame: bool = True) -> Any:
    """Summary, figure (with generic controls for its options) and data table of a saved result."""
    try:
        result = load(entry)
    except TunelensError as exc:
        st.error(f"{entry.name} cannot be read: {exc}")
        return None
    st.subheader(f"{result.title} — {entry.name}")
    st.caption(f"{entry.class_name} · {entry.path}")
    show_summary(entry.summary or _safe_summary(result))
    if kwargs is None:
        kwargs = figure_widgets(result, key=f"w:{entry.name}")
    show_figure(entry, kwargs, key=f"fig:{entry.name}:{sorted(kwargs.items())}")
    if frame:
        with st.expander("Data (the result's table)"):
            try:
                st.dataframe(result.to_frame(), width="stretch")
            except Exception as exc:  # shown, not swallowed
                st.error(f"to_frame() failed: {type(exc).__name__}: {exc}")
    return result


def _safe_summary(result: Any) -> dict[str, Any]:
    try:
        return result.summary()
    except Exception as exc:  # shown
        return {"summary() failed": f"{type(exc).__name__}: {exc}"}


def pair_check(entries: list[catalog.Entry]) -> None:
    """Say so when the folder's results were computed on another pair than the loaded one.

    A warning, not an error: saved results stand on their own (a demo folder holds results of several
    pairs, e.g. the knob on ``smollm2-knob``), and what combines them with the loaded pair's weights (the
    atlas) leaves other pairs' results out and names them."""
    spec = st.session_state.get("pair_spec")
    if not spec or not entries:
        return
    pair = current_pair()
    if pair is None:
        return
    try:
        catalog.check_pair(entries, pair.hashes(), f"the loaded one ({pair_label(spec)})")
    except TunelensError as exc:
        st.warning(str(exc))


def own_pair(entry: catalog.Entry) -> str | None:
    """The zoo pair ``entry`` was computed on, when it is not the loaded pair (else None)."""
    name = (entry.pair or {}).get("name")
    pair = current_pair()
    if not name or name not in zoo.PAIRS or pair is None:
        return None
    return name if catalog.pair_mismatches([entry], pair.hashes()) else None


def analysis_page(key: str, *, show: bool = True) -> list[catalog.Entry]:
    """The generic page of one analysis: its results in the folder, a chooser, and each shown in full.

    Returns the analysis' entries so a specialised page can add to it.
    """
    a = catalog.BY_KEY[key]
    st.title(a.title)
    st.caption(a.about)
    entries = scan()
    if entries is None:
        return []
    mine = catalog.by_analysis(entries, key)
    if not mine:
        st.info(
            f"No {a.title} results in `{results_dir()}`. Produce them with `{a.produce}` "
            "(the demo writes every analysis), then point the results folder in the sidebar at that folder."
        )
        return []
    pair_check(mine)
    if show:
        names = [e.name for e in mine]
        choice = st.selectbox("Result", names, key=f"pick:{key}") if len(names) > 1 else names[0]
        show_result(next(e for e in mine if e.name == choice))
    return mine


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
