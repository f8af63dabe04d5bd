"""A steering effect with its control and its interval.

The effect of a direction ``u`` at its layer: the fraction of instruction-free prompts answered from the
context with ``uᵀh`` set to the context set-point, minus the fraction with it set to the prior set-point.
Measured on its own it says little: setting any direction of the residual to a far-off value can move the
answers. So every effect comes with

* a **control**: ``n_random`` random unit directions at the same layer, set to the *same* two set-points
  (the same size of intervention, in no particular direction), with their mean, spread and maximum;
* a **95 % bootstrap interval** over the items (for the rates and for the effect, from the same draws).

``specific`` is True when the effect's interval lies above every control's effect.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from circuits.knob.das import random_direction
from circuits.knob.data import KnobItems
from circuits.knob.steering import steered_choices
from tunelens.directions import Direction
from tunelens.metrics import bootstrap_means, percentile_ci

N_BOOT = 2000


def _rates(model, direction: Direction, items: KnobItems, lo: float, hi: float, batch_size: int):
    at_lo = steered_choices(model, direction, items, "none", lo, batch_size).double()
    at_hi = steered_choices(model, direction, items, "none", hi, batch_size).double()
    return at_lo, at_hi


def steering_effect(
    model,
    direction: Direction,
    items: KnobItems,
    setpoints: tuple[float, float],
    *,
    n_random: int,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Rates at the prior and context ``setpoints`` (values of ``uᵀh``), the effect, their intervals, and
    the random-direction control (see the module docstring)."""
    lo, hi = setpoints
    at_lo, at_hi = _rates(model, direction, items, lo, hi, batch_size)
    boot = bootstrap_means(torch.stack([at_lo, at_hi]), list(items.item_ids), n_boot=N_BOOT, seed=seed)
    controls = []
    for k in range(n_random):
        rnd = random_direction(model, direction.site.layer, seed=seed + 1 + k)
        c_lo, c_hi = _rates(model, rnd, items, lo, hi, batch_size)
        controls.append(float(c_hi.mean() - c_lo.mean()))
    effect_lo, effect_hi = percentile_ci(boot[:, 1] - boot[:, 0])
    row: dict[str, Any] = {
        "setpoint_prior": lo,
        "setpoint_context": hi,
        "rate_at_setpoint_prior": float(at_lo.mean()),
        "rate_at_setpoint_context": float(at_hi.mean()),
        "effect": float(at_hi.mean() - at_lo.mean()),
        "effect_lo": effect_lo,
        "effect_hi": effect_hi,
        "n_items": len(items),
        "n_controls": n_random,
    }
    row["rate_at_setpoint_prior_lo"], row["rate_at_setpoint_prior_hi"] = percentile_ci(boot[:, 0])
    row["rate_at_setpoint_context_lo"], row["rate_at_setpoint_context_hi"] = percentile_ci(boot[:, 1])
    if controls:
        row |= {
            "control_effect_mean": statistics.fmean(controls),
            "control_effect_sd": statistics.stdev(controls) if len(controls) > 1 else 0.0,
            "control_effect_min": min(controls),
            "control_effect_max": max(controls),
            "specific": bool(effect_lo > max(controls)),
        }
    else:
        row |= {
            "control_effect_mean": math.nan,
            "control_effect_sd": math.nan,
            "control_effect_min": math.nan,
            "control_effect_max": math.nan,
            "specific": False,
        }
    return row
