"""Weight-space analyses of a pair or family: SVD spectra, intruder dimensions, skill localisation.

* :func:`spectra` — singular values of every base matrix and of every fine-tuning update, effective rank.
* :func:`intruders` / :func:`intruder_family` — intruder dimensions (Shuttleworth et al. 2024) with noise
  baselines, k/ε sweeps, and :func:`intruder_tradeoff`, the λ causal test.
* :func:`graft` — skill localisation by grafting (Panigrahi et al. 2023): learned sparse masks over the
  update, top-|Δθ| and random baselines, ECE, per-layer maps, per-task masks and their overlap.

Everything reads weights through :mod:`tunelens.weights` on the plain HF / peft module, never a backend.
"""

from spectral.drift import GeneralTextConfig, base_samples, continuation_loss
from spectral.graft import GraftConfig, GraftResult, graft, graft_space
from spectral.intruders import (
    IntruderConfig,
    IntruderResult,
    intruder_family,
    intruder_tradeoff,
    intruders,
    scaled_intruders,
)
from spectral.spectra import SpectrumConfig, SpectrumResult, spectra

__all__ = [
    "GeneralTextConfig",
    "GraftConfig",
    "GraftResult",
    "IntruderConfig",
    "IntruderResult",
    "SpectrumConfig",
    "SpectrumResult",
    "base_samples",
    "continuation_loss",
    "graft",
    "graft_space",
    "intruder_family",
    "intruder_tradeoff",
    "intruders",
    "scaled_intruders",
    "spectra",
]
