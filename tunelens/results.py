"""Result: what every analysis returns, and how it goes to and from disk.

A Result is a frozen dataclass that inherits :class:`Result`. Its fields hold tensors, numpy arrays,
pandas frames, sites, nested config dataclasses and plain JSON values (in any nesting of dicts with
string keys, lists and tuples). It implements ``to_frame()`` (one tidy table), ``figure()`` (plotly) and
``summary()`` (a few headline numbers, shown in notebooks, the report and the app); :meth:`Result.save`
and :func:`load_result` are shared.

On disk a result is a folder: ``result.json`` (type, format, the JSON fields, with tensors replaced by
references) and ``tensors.safetensors`` (every tensor and array). Nothing is pickled, so loading a result
never runs code; the type named in ``result.json`` is only imported from tunelens' own packages. A save
goes to a temp folder first and replaces the old folder only when complete, so a crash or a full disk
leaves the previous result intact.

Example:
    >>> import tempfile, torch
    >>> from dataclasses import dataclass
    >>> from tunelens.results import Result, load_result
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Curve(Result):
    ...     values: torch.Tensor
    ...     pair: dict
    >>> d = tempfile.mkdtemp() + "/curve"
    >>> _ = Curve(values=torch.arange(3.0), pair={"name": "tiny"}).save(d)
    >>> Curve.load(d).values.tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelens.errors import StoreCorruptError, StoreError
from tunelens.io import fsync_dir
from tunelens.sites import Site

FORMAT = "tunelens-result/1"
RESULT_FILE = "result.json"
TENSOR_FILE = "tensors.safetensors"
TRUSTED_PACKAGES = ("tunelens", "probes", "circuits", "spectral")

R = TypeVar("R", bound="Result")


def pair_provenance(pair: Any) -> dict[str, str]:
    """What a result was computed on: the pair's name and both models' content hashes."""
    return {"name": str(getattr(pair, "name", "") or ""), **pair.hashes()}


def model_provenance(model: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a one-model result was computed on: the model's name and content hash, then what the caller
    adds (``given``, e.g. the pair it belongs to and its role there), which wins on a clash."""
    return {"model": str(getattr(model, "name", "") or ""), "model_hash": model.content_hash, **(given or {})}


class Result:
    """Base of every analysis result. Subclasses are frozen ``kw_only`` dataclasses.

    Subclasses set :attr:`title` and implement ``to_frame``, ``figure`` and ``summary``.
    """

    title: ClassVar[str] = "result"
    analysis: ClassVar[str] = "other"
    """Where the result belongs: ``probes``, ``patching``, ``circuit``, ``knob``, ``skills``, ``intruders``
    or ``atlas`` (the app's page, the report's section). Saved into ``result.json``, so a folder is sorted
    without importing any analysis."""
    layer_column: ClassVar[str | None] = "layer"
    """The column of :meth:`to_frame` that says each row's layer (an int, a Site or a matrix name such as
    ``L3.q``), or None; the layer atlas reads a result's rows at a layer through it."""

    def to_frame(self):  # pragma: no cover - every subclass overrides
        raise NotImplementedError(f"{type(self).__name__} has no to_frame()")

    def figure(self, *args: Any, **kwargs: Any):  # pragma: no cover - every subclass overrides
        raise NotImplementedError(f"{type(self).__name__} has no figure()")

    def summary(self) -> dict[str, Any]:
        """Headline numbers (JSON values), for notebooks, the report and the app."""
        return {}

    # -- notebooks ---------------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(str(k))}</td>"
            f"<td style='text-align:left'>{html.escape(_fmt(v))}</td></tr>"
            for k, v in self.summary().items()
        )
        return f"<b>{html.escape(type(self).__name__)}</b>: {html.escape(self.title)}<table>{rows}</table>"

    # -- disk --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this result to the folder ``path`` (replaced atomically if it exists); returns it."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} must be a dataclass to be saved")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        fields = {f.name: _encode(getattr(self, f.name), f.name, tensors) for f in dataclasses.fields(self)}
        doc = {
            "format": FORMAT,
            "type": _qualname(type(self)),
            "analysis": self.analysis,
            "fields": fields,
            "summary": self.summary(),
        }
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            save_file(tensors, str(tmp / TENSOR_FILE))
            (tmp / RESULT_FILE).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
            for name in (TENSOR_FILE, RESULT_FILE):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str]) -> R:
        """Read a result saved by :meth:`save`; the folder must hold a ``cls``."""
        result = load_result(path, expect=cls)
        if not isinstance(result, cls):
            raise StoreError(f"{path} holds a {type(result).__name__}, expected a {cls.__name__}")
        return result


def load_result(path: str | os.PathLike[str], *, expect: type[Result] | None = None) -> Result:
    """Read any result folder written by :meth:`Result.save` (``expect``: the class it should hold)."""
    path = Path(path)
    doc_file = path / RESULT_FILE
    if not doc_file.is_file():
        raise StoreError(f"{path} is not a tunelens result folder (no {RESULT_FILE})")
    try:
        doc = json.loads(doc_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"{doc_file} is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise StoreError(f"{doc_file}: expected format {FORMAT!r}, found {got!r}")
    name = doc.get("type", "")
    same = expect is not None and current_type_name(name) == _qualname(expect)
    cls = expect if same else _import(name, doc_file)
    if not (isinstance(cls, type) and issubclass(cls, Result)):
        raise StoreError(f"{doc_file}: type {doc.get('type')!r} is not a tunelens Result")
    try:
        tensors = load_file(str(path / TENSOR_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise StoreCorruptError(f"{path / TENSOR_FILE} cannot be read ({e})") from e
    # Types nested in the result may come from the result's own module (already imported, so trusted).
    trusted = {cls.__module__}
    fields = {k: _decode(v, tensors, doc_file, trusted) for k, v in doc["fields"].items()}
    return cls(**fields)


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The type and headline numbers of a saved result, without loading its tensors."""
    doc = json.loads((Path(path) / RESULT_FILE).read_text())
    return {"type": doc["type"], "summary": doc.get("summary", {})}


def find_results(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Every result folder under ``root`` (relative name -> folder), sorted by name."""
    root = Path(root)
    found = {
        str(p.parent.relative_to(root)): p.parent
        for p in root.rglob(RESULT_FILE)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    return dict(sorted(found.items()))


# -- encoding ----------------------------------------------------------------------------------------
def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# Where result types saved before the layout moved (issue 17) live now: old module -> new module, and old
# "module:Type" -> new "module:Type" for a type that moved to another module. Saved folders keep loading.
MOVED_MODULES: dict[str, str] = {
    "circuits.patching": "circuits.patching.engine",
    "circuits.sweeps": "circuits.patching.sweeps",
    "circuits.patching_result": "circuits.patching.result",
    "circuits.metrics": "circuits.patching.metrics",
    "circuits.attribution": "circuits.patching.attribution",
    "circuits.cmap": "circuits.patching.cmap",
    "circuits.path_patching": "circuits.patching.path_patching",
    "circuits.live": "circuits.patching.live",
    "circuits.groups": "circuits.circuit.groups",
    "circuits.faithfulness": "circuits.circuit.faithfulness",
    "circuits.minimality": "circuits.circuit.minimality",
    "circuits.dcm": "circuits.circuit.dcm",
    "circuits.knob": "circuits.knob.analysis",
    "circuits.knob_data": "circuits.knob.data",
    "circuits.knob_das": "circuits.knob.das",
    "circuits.knob_layers": "circuits.knob.layers",
    "circuits.knob_runs": "circuits.knob.runs",
    "circuits.knob_effects": "circuits.knob.effects",
    "circuits.steering": "circuits.knob.steering",
    "circuits.study": "circuits.studies.entity_tracking",
    "circuits.gemma_study": "circuits.studies.runner",
    "circuits.circuit_study": "circuits.studies.circuit",
    "tunelens.atlas": "tunelens.faces.atlas",
}
MOVED_TYPES: dict[str, str] = {
    "circuits.faithfulness:CircuitResult": "circuits.circuit.result:CircuitResult",
    "circuits.circuit.faithfulness:CircuitResult": "circuits.circuit.result:CircuitResult",
}
# The analysis of each result type saved before result.json carried its own (issue 17), by the type's
# current name: folders written before keep landing on the right page.
LEGACY_ANALYSIS: dict[str, str] = {
    "probes.result:ProbeResult": "probes",
    "circuits.knob.analysis:KnobResult": "knob",
    "circuits.patching.attribution:AttributionResult": "patching",
    "circuits.patching.cmap:CMAPResult": "patching",
    "circuits.patching.live:LiveSweepResult": "patching",
    "circuits.patching.result:PatchingResult": "patching",
    "circuits.patching.path_patching:PathPatchingResult": "patching",
    "circuits.circuit.dcm:DCMResult": "circuit",
    "circuits.circuit.result:CircuitResult": "circuit",
    "circuits.circuit.groups:HeadGroupsResult": "circuit",
    "circuits.circuit.minimality:MinimalCircuitResult": "circuit",
    "spectral.graft:GraftResult": "skills",
    "spectral.intruders:IntruderResult": "intruders",
    "spectral.spectra:SpectrumResult": "intruders",
    "tunelens.faces.atlas:AtlasResult": "atlas",
}


def analysis_of(doc: dict[str, Any]) -> str:
    """The analysis a saved ``result.json`` belongs to: its own ``analysis`` field, or for a folder saved
    before results carried one, the table of the types that existed then (``other`` when unknown).

    >>> analysis_of({"type": "circuits.knob:KnobResult"}), analysis_of({"type": "x:Y", "analysis": "knob"})
    ('knob', 'knob')
    """
    if isinstance(doc.get("analysis"), str):
        return doc["analysis"]
    return LEGACY_ANALYSIS.get(current_type_name(str(doc.get("type", ""))), "other")


def current_type_name(name: str) -> str:
    """The ``module:Type`` a saved type name refers to in this tunelens (names saved before a move map)."""
    if name in MOVED_TYPES:
        return MOVED_TYPES[name]
    module, sep, qual = name.partition(":")
    return MOVED_MODULES.get(module, module) + sep + qual


def _import(name: str, where: Path, trusted: set[str] = frozenset()) -> Any:
    name = current_type_name(name)
    module, _, qual = name.partition(":")
    if (module.split(".")[0] not in TRUSTED_PACKAGES and module not in trusted) or not qual:
        raise StoreError(f"{where}: type {name!r} is not from a tunelens package {TRUSTED_PACKAGES}")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise StoreError(f"{where}: type {name!r} does not exist in this tunelens ({e})") from e
    return obj


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__array__": key}
    if isinstance(value, Site):
        return {"__site__": str(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": _qualname(type(value)),
            **{
                f.name: _encode(getattr(value, f.name), f"{key}.{f.name}", tensors)
                for f in dataclasses.fields(value)
            },
        }
    if _is_frame(value):
        return {"__frame__": json.loads(value.to_json(orient="split", index=False, double_precision=15))}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"result field {key}: dict keys must be str, got {type(k).__name__} {k!r}")
        return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"result field {key}: cannot save a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: Path, trusted: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where, trusted) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__array__" in value:
        key = value.get("__tensor__", value.get("__array__"))
        if key not in tensors:
            raise StoreCorruptError(f"{where}: tensor {key!r} is missing from {TENSOR_FILE}")
        return tensors[key] if "__tensor__" in value else tensors[key].numpy()
    if "__site__" in value:
        return Site.parse(value["__site__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where, trusted) for v in value["__tuple__"])
    if "__frame__" in value:
        import pandas as pd

        f = value["__frame__"]
        return pd.DataFrame(f["data"], columns=f["columns"])
    if "__dataclass__" in value:
        cls = _import(value["__dataclass__"], where, trusted)
        kwargs = {k: v for k, v in value.items() if k != "__dataclass__"}
        return cls(**{k: _decode(v, tensors, where, trusted) for k, v in kwargs.items()})
    return {k: _decode(v, tensors, where, trusted) for k, v in value.items()}


def _is_frame(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "to_json")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
