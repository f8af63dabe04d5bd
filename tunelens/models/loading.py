"""Loading models: HF folders, GGUF files (converted once to safetensors), peft LoRA adapters.

Nothing here downloads: every path is local, ``HF_HUB_OFFLINE`` is honoured, and ``trust_remote_code``
stays off unless the caller asks for it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError

from tunelens.errors import ModelLoadError, PairIncompatibleError
from tunelens.models.loaded import LoadedModel, ModelSource, check_device, check_dtype
from tunelens.models.pair import ModelPair
from tunelens.paths import data_home

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _require_folder(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{what} {str(path)!r} does not exist; expected an existing folder")
    if not path.is_dir():
        raise ModelLoadError(f"{what} {str(path)!r} is not a folder")
    return path


def _listing(path: Path, limit: int = 8) -> list[str]:
    return sorted(p.name for p in path.iterdir())[:limit]


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library messages can span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def load_hf_folder(
    path: str | Path,
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
    source: ModelSource | None = None,
    name: str | None = None,
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """A model saved with ``save_pretrained`` (config.json + weights + tokenizer files), in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _require_folder(Path(path), "model folder")
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{str(path)!r} is not a model folder: expected a config.json (from save_pretrained), "
            f"found {sorted(p.name for p in path.iterdir())[:8]}"
        )
    dev = check_device(device)
    want = check_dtype(dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load the tokenizer in {str(path)!r}: expected tokenizer files from save_pretrained "
            f"(tokenizer.json, tokenizer_config.json), found {_listing(path)}: {_first_line(exc)}"
        ) from exc
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=want,
            attn_implementation="eager",
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(
            f"could not load the model in {str(path)!r}: expected a config.json and readable weights "
            f"(model.safetensors) from save_pretrained, found {_listing(path)}: {_first_line(exc)}"
        ) from exc
    _check_weights_fit(path, model, info)
    return LoadedModel(
        model.to(dev),
        tok,
        source=source or ModelSource(kind="hf", location=str(path)),
        name=name or path.name,
    )


def _check_weights_fit(path: Path, model, info: dict) -> None:
    """A checkpoint whose weights do not fit its config (another family's, another size's) would load with the
    missing weights drawn at random: refuse it, naming what is missing and what is left over."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = info.get("mismatched_keys") or ()
    if not missing and not mismatched:
        return
    arch = type(model).__name__
    unexpected = sorted(info.get("unexpected_keys") or ())
    detail = (
        f"{len(missing)} weights the config's {arch} needs are not in the checkpoint (first: {missing[0]!r})"
        if missing
        else f"{len(mismatched)} weights have another shape than the config says (first: {mismatched[0]})"
    )
    extra = f"; it holds {len(unexpected)} it does not use (first: {unexpected[0]!r})" if unexpected else ""
    raise ModelLoadError(
        f"the weights in {str(path)!r} do not fit its config.json: {detail}{extra}; expected the weights "
        "save_pretrained wrote with this config (is config.json from another model?)"
    )


def convert_gguf(gguf: str | Path, out: Path | None = None) -> Path:
    """Dequantise a GGUF file once into an fp32 safetensors folder (cached); returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} does not exist; expected a path to a .gguf file")
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"could not read GGUF file {str(gguf)!r}: expected the magic bytes b'GGUF' at its start, "
            f"found {magic!r}; is it really a GGUF model file?"
        )
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = out or data_home() / "converted" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to safetensors (once) ...", gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many kinds on a bad file
        raise ModelLoadError(
            f"could not read GGUF file {str(gguf)!r}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    # A GGUF-loaded model refuses save_pretrained (environment.md pitfall 3): rebuild a clean one.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg), dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_gguf(
    path: str | Path, *, device: str = "cpu", name: str | None = None, dtype: str | torch.dtype = "float32"
) -> LoadedModel:
    """A GGUF file, through its cached safetensors conversion (float32), loaded in ``dtype``."""
    folder = convert_gguf(path)
    return load_hf_folder(
        folder,
        device=device,
        dtype=dtype,
        source=ModelSource(kind="gguf", location=str(path)),
        name=name or Path(path).stem,
    )


def _adapter_base_name(adapter_dir: Path) -> str | None:
    """The base the adapter says it was made for; a config that is not a JSON object is a load error."""
    file = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{str(file)!r} cannot be read: expected the JSON peft writes with save_pretrained: {exc}"
        ) from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{str(file)!r}: expected a JSON object, got {type(cfg).__name__}")
    return cfg.get("base_model_name_or_path")


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _adapter_misfit(exc: BaseException) -> str:
    """The first parameter whose shape does not fit, from torch's many-line ``load_state_dict`` error."""
    mismatches = _SIZE_MISMATCH.findall(str(exc))
    if not mismatches:
        return _first_line(exc)
    name, got, want = mismatches[0]
    more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
    return f"{name} has shape {got} in the adapter, but the base model expects {want}{more}"


def load_adapter_pair(
    base: LoadedModel,
    adapter_dir: str | Path,
    *,
    mode: Literal["switch", "merged"] = "switch",
    name: str | None = None,
) -> ModelPair:
    """A (base, base + LoRA adapter) pair.

    ``switch``: one set of base weights with the adapter injected, switched off for ``base`` and on for
    ``tuned`` (memory of one model). ``merged``: the tuned model is a merged copy (plain HF model).
    An adapter whose matrix shapes do not fit the base raises :class:`PairIncompatibleError`.
    """
    from peft import PeftModel

    adapter_dir = _require_folder(Path(adapter_dir), "adapter folder")
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelLoadError(f"{str(adapter_dir)!r} is not a peft adapter folder: no adapter_config.json")
    made_for = _adapter_base_name(adapter_dir)
    made_for = f" (made for {made_for!r})" if made_for else ""
    model = copy.deepcopy(base.module)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except SafetensorError as exc:
        raise ModelLoadError(
            f"could not read the adapter weights in {str(adapter_dir)!r}: expected a readable "
            f"adapter_model.safetensors from save_pretrained, found {_listing(adapter_dir)}: "
            f"{_first_line(exc)}"
        ) from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PairIncompatibleError(
            f"adapter {str(adapter_dir)!r}{made_for} does not fit base model {base.name!r} "
            f"(d_model {base.dims.d_model}): {_adapter_misfit(exc)}; load it onto the base it was made for"
        ) from exc
    src = ModelSource(kind="adapter", location=base.source.location, adapter=str(adapter_dir), mode=mode)
    tuned_name = name or adapter_dir.name
    if mode == "merged":
        tuned = LoadedModel(peft_model.merge_and_unload(), base.tokenizer, source=src, name=tuned_name)
        return ModelPair(base, tuned)
    off = LoadedModel(peft_model, base.tokenizer, source=base.source, adapter=False, name=base.name)
    on = LoadedModel(peft_model, base.tokenizer, source=src, adapter=True, name=tuned_name)
    return ModelPair(off, on)
