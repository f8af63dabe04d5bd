"""ProbeConfig: how a probe is trained and evaluated (the *what* and *where* come with the activations).

Example:
    >>> from probes.config import ProbeConfig
    >>> cfg = ProbeConfig(kind="logistic", C=0.5, n_seeds=3)
    >>> cfg.kind, cfg.C, cfg.seeds
    ('logistic', 0.5, (0, 1, 2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tunelens.errors import ConfigError

ProbeKind = Literal["logistic", "diff_means", "ridge"]
TransferRule = Literal["target", "source"]
Precision = Literal["float32", "float64"]
Solver = Literal["auto", "newton", "lbfgs"]
KINDS: tuple[str, ...] = ("logistic", "diff_means", "ridge")
TRANSFER_RULES: tuple[str, ...] = ("target", "source")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Settings of a probe sweep over layers.

    Attributes:
        kind: ``logistic`` (binary or multinomial, scikit-learn's objective: summed log-loss +
            ``‖W‖² / (2C)``, intercept unpenalised), ``diff_means`` (binary; the shared
            :func:`tunelens.directions.diff_of_means`, threshold halfway between the projected class
            means) or ``ridge`` (scalar targets; scikit-learn's ``Ridge(alpha)`` objective).
        C: inverse L2 strength of the logistic probe (scikit-learn's ``C``).
        alpha: L2 strength of the ridge probe (scikit-learn's ``alpha``).
        max_iter: L-BFGS iterations at most (logistic).
        tol: stop when the largest gradient entry of the mean objective (log-loss averaged over the
            training items) is below this — scikit-learn's ``tol`` for lbfgs (logistic).
        seed: first seed; seed ``seed + i`` fixes split ``i``, its control labels and its shuffle.
        n_seeds: how many seeded splits to average (confidence intervals over seeds).
        test_fraction: share of *items* (never of examples: an item's examples stay together) held out.
        control: also fit the Hewitt–Liang control task (each type gets a random, consistent label).
        shuffled: also fit on shuffled training labels (a chance baseline measured, not assumed).
        transfer: also evaluate each model's probe on the other model (needs both roles).
        transfer_standardise: how a probe moves to the other model. ``target``: the other model's
            activations are standardised with *its own* training-split mean and scale (no labels
            used) and the source probe's standardised-space weights applied; ``source``: the source
            probe is applied unchanged, as an affine function of raw activations.
        precision: dtype of the products with the activations and of the factorisations (``float32``
            halves their cost on a CPU; ``float64`` reproduces scikit-learn's coefficients to ~1e-6).
            Parameters, losses, the stopping gradient and the optimiser state are float64 either way.
        solver: ``newton`` (binary logistic: Newton in the span of the training examples, ~5–10
            iterations of dense linear algebra), ``lbfgs`` (any number of classes: batched L-BFGS
            preconditioned by the log-loss's curvature bound, tens of iterations) or ``auto`` (Newton
            for binary probes with up to 3,000 training examples, else L-BFGS).
        min_test_items: smallest test split (in items) a reported accuracy may rest on (100; lower only
            for tests and toys).
    """

    kind: ProbeKind = "logistic"
    C: float = 1.0
    alpha: float = 1.0
    max_iter: int = 200
    tol: float = 1e-4
    seed: int = 0
    n_seeds: int = 1
    test_fraction: float = 0.3
    control: bool = True
    shuffled: bool = True
    transfer: bool = True
    transfer_standardise: TransferRule = "target"
    min_test_items: int = 100
    precision: Precision = "float32"
    solver: Solver = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"ProbeConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.transfer_standardise not in TRANSFER_RULES:
            raise ConfigError(
                f"ProbeConfig.transfer_standardise must be one of {TRANSFER_RULES}, "
                f"got {self.transfer_standardise!r}"
            )
        if self.precision not in ("float32", "float64"):
            raise ConfigError(f"ProbeConfig.precision must be 'float32' or 'float64', got {self.precision!r}")
        if self.solver not in ("auto", "newton", "lbfgs"):
            raise ConfigError(f"ProbeConfig.solver must be 'auto', 'newton' or 'lbfgs', got {self.solver!r}")
        for name in ("C", "alpha", "tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"ProbeConfig.{name} must be a finite number > 0, got {v!r}")
        for name, low in (("max_iter", 1), ("n_seeds", 1), ("min_test_items", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"ProbeConfig.{name} must be an integer >= {low}, got {v!r}")
        f = self.test_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ConfigError(f"ProbeConfig.test_fraction must be strictly between 0 and 1, got {f!r}")

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.n_seeds))
