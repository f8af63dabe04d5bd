"""What a user's model reference names: a zoo model or pair, an HF folder, a ``.gguf`` file or an adapter.

It sits above both the loaders (:mod:`tunelens.models.loading`) and the zoo (:mod:`tunelens.models.zoo`,
which builds its models with those loaders), so neither of them imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from tunelens.errors import ModelLoadError
from tunelens.models import zoo
from tunelens.models.loaded import LoadedModel, check_dtype
from tunelens.models.loading import load_adapter_pair, load_gguf, load_hf_folder
from tunelens.models.pair import ModelPair


def load_model(
    ref: str | Path, *, device: str = "cpu", trust_remote_code: bool = False, dtype: str = "float32"
) -> LoadedModel:
    """A zoo name, an HF model folder or a ``.gguf`` file, in ``dtype`` (float32, bfloat16 or float16).

    ``trust_remote_code`` lets a model folder run the Python code it ships (off unless asked for).
    """
    check_dtype(dtype)
    text = str(ref)
    if text in zoo.names():
        return zoo.load(text, device=device, dtype=dtype)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        return load_gguf(path, device=device, dtype=dtype)
    if path.exists():
        return load_hf_folder(path, device=device, trust_remote_code=trust_remote_code, dtype=dtype)
    raise ModelLoadError(
        f"{text!r} is neither a zoo model ({', '.join(zoo.names())}) nor an existing folder or .gguf file"
    )


def load_pair(
    ref: str,
    tuned: str | None = None,
    *,
    device: str = "cpu",
    mode: str = "switch",
    trust_remote_code: bool = False,
    dtype: str = "float32",
) -> ModelPair:
    """A zoo pair name, or a base reference and a tuned reference (a model or an adapter folder), in
    ``dtype``: ``bfloat16`` halves the memory of ``float32``; activations run in it, while tunelens's metrics,
    SVDs, probe fits and DAS accumulate in float32."""
    check_dtype(dtype)
    if tuned is None:
        if ref in zoo.pair_names():
            return zoo.load_pair(ref, device=device, dtype=dtype)
        raise ModelLoadError(
            f"{ref!r} is not a zoo pair ({', '.join(zoo.pair_names())}); give a base and a tuned reference"
        )
    base = load_model(ref, device=device, trust_remote_code=trust_remote_code, dtype=dtype)
    tuned_path = Path(tuned).expanduser()
    if tuned_path.is_dir() and (tuned_path / "adapter_config.json").exists():
        return load_adapter_pair(base, tuned_path, mode=mode)  # type: ignore[arg-type]
    return ModelPair(base, load_model(tuned, device=device, trust_remote_code=trust_remote_code, dtype=dtype))
