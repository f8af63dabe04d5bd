"""Checks and helpers of the live parts (typed prompts) shared by the Patching and Context-knob pages."""

from __future__ import annotations

import importlib
from typing import Any

from tunelens.errors import PromptError

MAX_LIVE_TOKENS = 256


def encode_live(pair: Any, prompt: str, what: str = "prompt"):
    """Tokens of a typed prompt; empty or over-long (for a live answer, or for the model): PromptError."""
    if not prompt or not prompt.strip():
        raise PromptError(f"the {what} is empty; type some text")
    batch = pair.base.encode([prompt])
    n = int(batch.input_ids.shape[1])
    if n > MAX_LIVE_TOKENS:
        raise PromptError(
            f"the {what} has {n} tokens; live analyses take at most {MAX_LIVE_TOKENS} tokens so they "
            "answer in seconds. Shorten it, or run the analysis as a batch job."
        )
    return batch


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


def optional(module: str, name: str) -> Any | None:
    """``module.name`` if that analysis API exists in this install, else None."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, name, None)


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
