"""The results in a folder, grouped by the analysis that made them (for the app, the report, the atlas).

Only ``result.json`` files are read (types, headline numbers and the pair each result was computed on);
no tensors are loaded and no analysis package is imported, so scanning a folder is fast and safe. Which
analysis a result belongs to is what the result declared when it was saved (``Result.analysis``, written
into ``result.json``); for folders saved before that, :data:`tunelens.results.LEGACY_ANALYSIS` says it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelens.errors import PairIncompatibleError, StoreError
from tunelens.results import RESULT_FILE, analysis_of, find_results


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """One analysis as the faces show it: a key, a title, what it shows and how to produce its results."""

    key: str
    title: str
    about: str
    produce: str = "tunelens demo --out RESULTS_DIR"


ANALYSES: tuple[Analysis, ...] = (
    Analysis(
        key="probes",
        title="Probes",
        about="Linear probes on the residual stream of both models: accuracy by layer, transfer between the "
        "models, and control tasks.",
    ),
    Analysis(
        key="patching",
        title="Patching & CMAP",
        about="Activation and attribution patching (layer × position, layer × head) and cross-model "
        "activation patching (CMAP): which sites carry the fine-tune's gain.",
    ),
    Analysis(
        key="circuit",
        title="Circuit",
        about="The entity-tracking circuit as head groups, and its faithfulness in both models.",
    ),
    Analysis(
        key="knob",
        title="Context knob",
        about="A direction that trades context against prior knowledge: where it lives (layer curve), how "
        "strongly it steers (dose-response).",
    ),
    Analysis(
        key="skills",
        title="Skill localization",
        about="Grafting a sparse set of fine-tuned parameters onto the base: sparsity curve against "
        "baselines, per-layer map, mask overlap.",
    ),
    Analysis(
        key="intruders",
        title="Intruder dimensions",
        about="Singular vectors of the tuned weights that have no counterpart in the base (intruder "
        "dimensions), and weight spectra.",
    ),
    Analysis(
        key="atlas",
        title="Layer atlas",
        about="Everything found at one layer, side by side, and the geometry linking the layer's output "
        "weights to the probe and knob directions read there.",
        produce="the Layer atlas page (button 'Compute the atlas') or tunelens.faces.atlas.compute_atlas",
    ),
    Analysis(key="other", title="Other results", about="Results of types no page knows yet."),
)
BY_KEY: dict[str, Analysis] = {a.key: a for a in ANALYSES}


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One saved result: its name (folder relative to the results folder), type, summary and pair."""

    name: str
    path: Path
    type: str
    analysis: str
    title: str
    summary: dict[str, Any] = field(default_factory=dict)
    pair: dict[str, str] = field(default_factory=dict)
    mtime: float = 0.0

    @property
    def class_name(self) -> str:
        return self.type.partition(":")[2] or self.type


def _pair_of(fields: dict[str, Any]) -> dict[str, str]:
    """The provenance dict (``name``, ``base``, ``tuned``) among a result's top-level JSON fields."""
    for key in ("pair", "provenance", "models"):
        value = fields.get(key)
        if isinstance(value, dict) and {"base", "tuned"} <= set(value):
            return {k: str(v) for k, v in value.items() if isinstance(v, str | int | float)}
    for value in fields.values():
        if isinstance(value, dict) and {"base", "tuned"} <= set(value) and "name" in value:
            return {k: str(v) for k, v in value.items() if isinstance(v, str | int | float)}
    return {}


def check_folder(root: str | os.PathLike[str]) -> Path:
    """``root`` as a Path, or :class:`StoreError` saying why it cannot be a results folder."""
    path = Path(root).expanduser()
    if not str(root).strip():
        raise StoreError("no results folder given; expected a folder such as results/demo")
    if not path.exists():
        raise StoreError(
            f"results folder {str(path)!r} does not exist; expected a folder written by "
            "`tunelens demo --out DIR` or a batch job"
        )
    if not path.is_dir():
        raise StoreError(
            f"results folder {str(path)!r} is a file; expected a folder written by `tunelens demo --out DIR` "
            "or a batch job"
        )
    return path


def scan(root: str | os.PathLike[str]) -> list[Entry]:
    """Every result under ``root``, sorted by name; a folder that is not there raises :class:`StoreError`.

    A ``result.json`` that cannot be read is skipped with its error recorded as an ``other`` entry.
    """
    path = check_folder(root)
    entries = []
    for name, folder in find_results(path).items():
        doc_file = folder / RESULT_FILE
        try:
            doc = json.loads(doc_file.read_text())
            type_name = str(doc["type"])
            analysis = analysis_of(doc)
            fields = doc.get("fields", {}) if isinstance(doc.get("fields"), dict) else {}
            summary = doc.get("summary", {}) if isinstance(doc.get("summary"), dict) else {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            type_name, fields, summary = "unreadable:Result", {}, {"error": f"{doc_file}: {exc}"}
            analysis = "other"
        entries.append(
            Entry(
                name=name,
                path=folder,
                type=type_name,
                analysis=analysis if analysis in BY_KEY else "other",
                title=str(fields.get("title") or type_name.partition(":")[2] or type_name),
                summary=summary,
                pair=_pair_of(fields),
                mtime=doc_file.stat().st_mtime if doc_file.exists() else 0.0,
            )
        )
    return entries


def by_analysis(entries: list[Entry], key: str) -> list[Entry]:
    return [e for e in entries if e.analysis == key]


def pair_mismatches(entries: list[Entry], hashes: dict[str, str]) -> list[str]:
    """One sentence per result computed on other weights than ``hashes`` (``{"base": h, "tuned": h}``)."""
    out = []
    for e in entries:
        if not e.pair:
            continue
        diff = [role for role in ("base", "tuned") if e.pair.get(role) and e.pair[role] != hashes.get(role)]
        if diff:
            out.append(
                f"{e.name} was computed on pair {e.pair.get('name') or '?'!r} "
                f"(base {e.pair.get('base', '?')}, "
                f"tuned {e.pair.get('tuned', '?')}), not on the loaded pair (base {hashes.get('base')}, "
                f"tuned {hashes.get('tuned')})"
            )
    return out


def check_pair(entries: list[Entry], hashes: dict[str, str], label: str = "the loaded pair") -> None:
    """:class:`PairIncompatibleError` when any of ``entries`` was computed on other weights than ``hashes``
    (one line: how many, the first, what was expected and what to do)."""
    problems = pair_mismatches(entries, hashes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PairIncompatibleError(
            f"the results folder holds results of another pair than {label}: {problems[0]}{more}; expected "
            f"results computed on base {hashes.get('base')} and tuned {hashes.get('tuned')}: load the pair "
            "they were computed on (Pair page) or choose this pair's results folder"
        )


def folder_summary(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The demo's ``summary.json`` in ``root`` (empty when there is none)."""
    file = Path(root) / "summary.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
