"""The context knob of a pair (Minder et al. 2024): find it, steer with it, carry it across the pair.

:func:`run_knob` does, on held-out facts (:mod:`circuits.knob.data`):

1. pair accuracy of base and tuned, per intent;
2. layer localisation (:mod:`circuits.knob.layers`): switch rate of last-token attention patching
   between the intents, by layer, in both models; the knob layer is the earliest layer whose residual
   carries the switch at ``threshold`` in the tuned model;
3. rank-1 DAS at that layer (:mod:`circuits.knob.das`) against difference-of-means and random
   directions: interchange accuracy on validation items, cosine;
4. steering (:mod:`circuits.knob.steering`) on the instruction-free format (and, against the instruction,
   on both intents' prompts): dose-response over ``c``, calibrated per model from ``uᵀh``;
5. transfer: the tuned model's direction in the base (and the base's difference of means in the tuned
   model), swept over layers, with the AUROC of ``uᵀh`` between intents in each model.

Every steering effect (:mod:`circuits.knob.effects`) is reported beside random unit directions set to
the same set-points and with a 95 % bootstrap interval over items. The headline set-points are the
calibrated class means (``t = 0`` and ``1``: ``uᵀh`` as on prior- and context-intent prompts); the
overshoot set-points (one class separation beyond each mean) are a separate, named row.

Names: ``mean_prior`` / ``mean_context`` are the class means of ``uᵀh`` (:class:`Calibration`);
``setpoint_prior`` / ``setpoint_context`` are the values ``uᵀh`` is *set to*, ``c(t) = mean_prior +
t (mean_context − mean_prior)`` at the row's ``t_prior`` / ``t_context``.

A model whose answers do not follow the instructions on the sweep's items has no switch to localise: its
layer curve is marked undefined (``follows_intent`` below one half), not plotted as a finding.

Example (not run as a doctest: it needs the SmolLM2 zoo pair, whose base knows the facts the knob
switches between, and takes minutes):
    >>> from tunelens.models import zoo
    >>> result = run_knob(zoo.load_pair("smollm2-knob"), KnobConfig())    # doctest: +SKIP
    >>> result.summary()["knob_layer"], result.figure("dose")             # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from torch import Tensor

from circuits.knob.das import (
    DASConfig,
    confident,
    interchange_accuracy,
    interchange_hits,
    interchange_set,
    mean_direction,
    random_direction,
    train_das,
)
from circuits.knob.data import KnobItems, heldout_items
from circuits.knob.effects import steering_effect
from circuits.knob.layers import Patcher, lens_curve, lower_bound, sweep_layers
from circuits.knob.runs import candidate_logits, picks_context
from circuits.knob.steering import calibrate, dose_response, steer, with_layer
from tunelens.directions import Direction
from tunelens.errors import ConfigError
from tunelens.metrics import bootstrap_means, percentile_ci
from tunelens.models.pair import ModelPair
from tunelens.results import Result, pair_provenance

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
ROLES = ("base", "tuned")
COLORS = {"base": "#1f77b4", "tuned": "#d62728"}


@dataclass(frozen=True, kw_only=True)
class KnobConfig:
    """Settings of :func:`run_knob`; the defaults are the full study, :data:`DEMO` the reduced one."""

    n_knob: int | None = None
    n_test: int | None = None
    layer_step: int = 1
    threshold: float = 0.8
    das: DASConfig = field(default_factory=DASConfig)
    dose_ts: tuple[float, ...] = (-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0)
    dose_fmts: tuple[str, ...] = ("none", "context", "prior")
    effect_ts: tuple[float, float] = (0.0, 1.0)
    overshoot_ts: tuple[float, float] | None = (-1.0, 2.0)
    n_random: int = 5
    refine: bool = True
    transfer_step: int = 3
    n_transfer: int | None = None
    n_generate: int = 3
    max_new_tokens: int = 8
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_knob", "n_test", "n_transfer"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 4):
                raise ConfigError(f"{name} must be None (all) or an integer >= 4, got {v!r}")
        for name in ("layer_step", "transfer_step", "batch_size", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must lie in (0, 1], got {self.threshold}")
        if not self.dose_ts or not all(math.isfinite(t) for t in self.dose_ts):
            raise ConfigError(f"dose_ts must be finite numbers, got {self.dose_ts}")
        bad = [f for f in self.dose_fmts if f not in ("none", "context", "prior")]
        if bad or not self.dose_fmts:
            raise ConfigError(f"dose_fmts must be among 'none', 'context', 'prior', got {self.dose_fmts}")
        for name in ("effect_ts", "overshoot_ts"):
            ts = getattr(self, name)
            if ts is None and name == "overshoot_ts":
                continue
            if len(ts) != 2 or not all(math.isfinite(t) for t in ts) or ts[0] >= ts[1]:
                raise ConfigError(f"{name} must be (t_prior, t_context) with t_prior < t_context, got {ts}")
        if isinstance(self.n_random, bool) or not isinstance(self.n_random, int) or self.n_random < 0:
            raise ConfigError(
                f"n_random must be an integer >= 0 (random control directions), got {self.n_random}"
            )


DEMO = KnobConfig(
    n_knob=12,
    n_test=12,
    layer_step=5,
    das=DASConfig(epochs=2, batch_size=8, lr=1e-2),
    dose_ts=(-1.0, 0.0, 1.0, 2.0),
    dose_fmts=("none",),
    transfer_step=15,
    n_transfer=8,
    n_random=3,
    n_generate=1,
    max_new_tokens=6,
)
"""Reduced settings for ``tunelens demo`` (a few minutes on 2 CPU cores). The layer grid has a step of 5,
refined to single layers between the last grid layer below the rule and the first that meets it."""


@dataclass(frozen=True, kw_only=True)
class KnobResult(Result):
    """Everything :func:`run_knob` measured; tables are tidy frames, the knob is a :class:`Direction`."""

    title: ClassVar[str] = "context knob (Minder et al. 2024)"
    analysis: ClassVar[str] = "knob"

    pair: dict[str, str]
    config: dict[str, Any]
    knob_layer: int
    layer_rule_met: bool
    read_in: tuple[int, int]
    accuracy: pd.DataFrame
    layer_curve: pd.DataFrame
    read_in_runs: pd.DataFrame
    lens: pd.DataFrame
    direction: Direction
    baseline: Direction
    base_direction: Direction
    interchange: dict[str, float]
    das_losses: list[float]
    calibration: pd.DataFrame
    dose: pd.DataFrame
    transfer: pd.DataFrame
    generations: pd.DataFrame
    n_items: dict[str, int]
    seconds: float
    # 95% bootstrap intervals of the validation interchange accuracies over items (both pairs of an item
    # drawn together), and of DAS − difference of means; empty in results saved before they were added
    interchange_ci: dict[str, list[float]] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.dose

    def summary(self) -> dict[str, Any]:
        acc = {
            f"{r.model}_{k}": round(float(getattr(r, k)), 3)
            for r in self.accuracy.itertuples()
            for k in ("pair_accuracy", "context_accuracy", "prior_accuracy")
        }
        cal = {
            f"auroc_{r.model}_{r.direction}": round(float(r.auroc), 3) for r in self.calibration.itertuples()
        }
        eff = self._headline_effects()
        best = {}
        for role in ROLES:
            part = eff[(eff.model == role) & (eff.direction == "tuned DAS")]
            if len(part):
                top = part.loc[part.effect.idxmax()]
                best[f"transfer_{role}_best_layer"] = int(top.layer)
                best[f"transfer_{role}_best_effect"] = round(float(top.effect), 3)
        steering: dict[str, Any] = {}
        for name in ("means", "overshoot"):
            rows = self.effects(name)
            rows = rows[(rows.layer == self.knob_layer) & (rows.direction == "tuned DAS")]
            tag = "" if name == "means" else "_overshoot"
            for r in rows.itertuples():
                key = f"steer_effect{tag}_{r.model}"
                steering[key] = round(float(r.effect), 3)
                if hasattr(r, "effect_lo"):
                    steering[f"{key}_ci"] = [round(r.effect_lo, 3), round(r.effect_hi, 3)]
                    steering[f"{key}_random"] = {
                        "mean": round(r.control_effect_mean, 3),
                        "max": round(r.control_effect_max, 3),
                        "n": int(r.n_controls),
                    }
                    steering[f"{key}_specific"] = bool(r.specific)
        curve = self.layer_curve
        defined = (
            {f"layer_curve_defined_{m}": bool(curve[curve.model == m].defined.all()) for m in ROLES}
            if "defined" in curve
            else {}
        )
        return {
            "knob_layer": self.knob_layer,
            "layer_rule_met": self.layer_rule_met,
            "read_in_layers": list(self.read_in),
            **acc,
            **{f"interchange_{k}": round(v, 3) for k, v in self.interchange.items()},
            **{f"interchange_ci_{k}": [round(x, 3) for x in v] for k, v in self.interchange_ci.items()},
            "cosine_das_diff_of_means": round(self.direction.cosine(self.baseline), 3),
            **cal,
            **steering,
            **best,
            **defined,
            "layer_grid_step": self.config.get("layer_step"),
            "n_test_pairs": self.n_items["test"],
            "n_confident_train": self.n_items["das_train"],
            "n_confident_val": self.n_items["das_val"],
        }

    def effects(self, setpoints: str = "means") -> pd.DataFrame:
        """The transfer table's rows at one set of set-points (``means``: the headline; ``overshoot``).
        Results saved before set-points were named hold only overshoot rows (t = −1 and 2)."""
        if "setpoints" not in self.transfer:
            return self.transfer if setpoints == "overshoot" else self.transfer.iloc[0:0]
        return self.transfer[self.transfer.setpoints == setpoints]

    def _headline_effects(self) -> pd.DataFrame:
        """The rows the summary's best layer and the transfer figure use: the class means, or for a result
        saved before they existed, its (overshoot) rows."""
        rows = self.effects("means")
        return rows if len(rows) else self.effects("overshoot")

    def figure(self, view: Literal["layers", "lens", "dose", "transfer"] = "layers"):
        """``layers``: switch rate by patched layer, both models; ``lens``: logit-lens switch by read
        layer for the read-in range; ``dose``: context-answer rate against ``c``, both models side by side;
        ``transfer``: steering effect and AUROC by layer, tuned direction in both models."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        if view == "layers":
            fig = go.Figure()
            undefined = []
            for role in ROLES:
                part = self.layer_curve[(self.layer_curve.model == role) & (self.layer_curve.upper >= 0)]
                if "defined" in part and len(part) and not bool(part.defined.all()):
                    undefined.append(
                        f"{role} (follows the instructions on {part.follows_intent.iloc[0]:.0%})"
                    )
                    continue  # no switch to localise: its rates are not a finding
                for setting, dash in (("CP", "solid"), ("PC", "dash")):
                    fig.add_scatter(
                        x=part.upper,
                        y=part[setting],
                        mode="lines+markers",
                        name=f"{role}: {setting}",
                        line=dict(color=COLORS[role], dash=dash),
                    )
            fig.add_hline(y=self.config["threshold"], line_dash="dot", annotation_text="threshold")
            fig.add_vline(x=self.knob_layer, line_dash="dot", annotation_text=f"knob layer {self.knob_layer}")
            fig.update_layout(
                title="Where the intent reaches the last token: patch last-token attention outputs of layers "
                "0..L from the other intent<br><sup>CP: context-intent source into prior-intent target; PC: "
                "the reverse. Switch = the source intent's answer wins (two candidates)</sup>",
                xaxis_title="last patched layer L",
                yaxis_title="switch rate (fraction of items)",
                yaxis_range=[-0.02, 1.02],
            )
            if undefined:  # said in the title, where it cannot cover an axis
                fig.update_layout(
                    title=fig.layout.title.text
                    + "<br><sup>undefined, not drawn: "
                    + "; ".join(undefined)
                    + ", it answers alike under both instructions</sup>"
                )
            return fig
        if view == "lens":
            fig = go.Figure()
            for role in ROLES:
                part = self.lens[self.lens.model == role]
                for setting, dash in (("CP", "solid"), ("PC", "dash")):
                    p = part[part.setting == setting]
                    fig.add_scatter(
                        x=p.read,
                        y=p.switch,
                        mode="lines+markers",
                        name=f"{role}: {setting}",
                        line=dict(color=COLORS[role], dash=dash),
                    )
            lo, hi = self.read_in
            fig.update_layout(
                title=f"Logit lens after patching attention outputs of layers {lo}..{hi} (last token)",
                xaxis_title="layer read (residual after the block)",
                yaxis_title="switch rate under the lens",
                yaxis_range=[-0.02, 1.02],
            )
            return fig
        if view == "dose":
            panels = [("tuned", "tuned DAS"), ("base", "tuned DAS"), ("tuned", "base diff-of-means")]
            fig = make_subplots(
                rows=1,
                cols=3,
                shared_yaxes=True,
                subplot_titles=[
                    "tuned model, its DAS knob",
                    "base model, the tuned model's knob",
                    "tuned model, the base's diff-of-means",
                ],
            )
            dashes = {"none": "solid", "context": "dash", "prior": "dot"}
            for col, (role, dname) in enumerate(panels, start=1):
                part = self.dose[(self.dose.model == role) & (self.dose.direction == dname)]
                for fmt in dict.fromkeys(part.fmt):
                    p = part[(part.fmt == fmt) & part.c.notna()]
                    fig.add_scatter(
                        x=p.c,
                        y=p.context_rate,
                        mode="lines+markers",
                        row=1,
                        col=col,
                        name=f"{role}, {dname}: prompts '{fmt}'",
                        legendgroup=fmt,
                        line=dict(color=COLORS[role], dash=dashes[fmt]),
                    )
                fig.update_xaxes(title_text="c (set-point of uᵀh)", row=1, col=col)
            fig.update_yaxes(
                title_text="fraction answered from the context", range=[-0.02, 1.02], row=1, col=1
            )
            fig.update_layout(
                title="Dose-response: set uᵀh = c at the knob layer on the last token "
                "(prompt formats: none = no instruction; context / prior = with that instruction)"
            )
            return fig
        if view == "transfer":
            fig = make_subplots(
                rows=1,
                cols=2,
                subplot_titles=[
                    "steering effect at the class means (tuned model's set-points), 95 % CI",
                    "AUROC of uᵀh, intent context vs prior",
                ],
            )
            rows = self._headline_effects()
            for role in ROLES:
                part = rows[(rows.model == role) & (rows.direction == "tuned DAS")]
                bars = {}
                if "effect_lo" in part:
                    bars = dict(
                        error_y=dict(
                            type="data",
                            array=(part.effect_hi - part.effect).tolist(),
                            arrayminus=(part.effect - part.effect_lo).tolist(),
                        )
                    )
                fig.add_scatter(
                    x=part.layer,
                    y=part.effect,
                    mode="lines+markers",
                    name=f"{role}: effect",
                    line=dict(color=COLORS[role]),
                    row=1,
                    col=1,
                    **bars,
                )
                if "control_effect_max" in part:
                    fig.add_scatter(
                        x=part.layer,
                        y=part.control_effect_max,
                        mode="lines",
                        name=f"{role}: random directions (max)",
                        line=dict(color=COLORS[role], dash="dot"),
                        row=1,
                        col=1,
                    )
                fig.add_scatter(
                    x=part.layer,
                    y=part.auroc,
                    mode="lines+markers",
                    name=f"{role}: AUROC",
                    line=dict(color=COLORS[role], dash="dash"),
                    row=1,
                    col=2,
                )
            for col in (1, 2):
                fig.add_vline(x=self.knob_layer, line_dash="dot", row=1, col=col)
                fig.update_xaxes(title_text="layer the tuned model's knob is applied at", row=1, col=col)
            fig.update_yaxes(title_text="Δ fraction answered from the context", row=1, col=1)
            fig.update_yaxes(title_text="AUROC", range=[0, 1], row=1, col=2)
            fig.update_layout(
                title="Transfer: the tuned model's DAS direction, moved along the layers, in both models"
                "<br><sup>dotted: the largest effect of random unit directions at the same set-points</sup>"
            )
            return fig
        raise ConfigError(f"view must be 'layers', 'lens', 'dose' or 'transfer', got {view!r}")


# --- the study ---------------------------------------------------------------------------------------


def _interchange_intervals(hits: dict[str, Tensor], items: KnobItems, seed: int) -> dict[str, list[float]]:
    """95% intervals of each accuracy in ``hits`` and of DAS − difference of means, resampling items (an
    item's two pairs, prior target and context target, are drawn together)."""
    names = list(hits)
    values = torch.stack([hits[n].double() for n in names])
    boots = bootstrap_means(values, list(items.item_ids) * 2, seed=seed)
    out = {n: list(percentile_ci(boots[:, i])) for i, n in enumerate(names)}
    diff = boots[:, names.index("das_val")] - boots[:, names.index("diff_of_means_val")]
    out["das_minus_diff_of_means_val"] = list(percentile_ci(diff))
    return out


def intent_accuracy(model, items: KnobItems, batch_size: int = 32) -> dict[str, float]:
    """Pair / context / prior accuracy (two-candidate restricted) on ``items``."""
    tok = model.tokenizer
    ctx = picks_context(
        candidate_logits(model, items.encode(tok, "context"), items.candidates, batch_size=batch_size)
    )
    pri = ~picks_context(
        candidate_logits(model, items.encode(tok, "prior"), items.candidates, batch_size=batch_size)
    )
    return {
        "pair_accuracy": float((ctx & pri).float().mean()),
        "context_accuracy": float(ctx.float().mean()),
        "prior_accuracy": float(pri.float().mean()),
        "n_pairs": len(items),
    }


def run_knob(
    pair: ModelPair,
    cfg: KnobConfig,
    *,
    items: dict[str, KnobItems] | None = None,
    progress: Progress | None = None,
) -> KnobResult:
    """The whole study on ``pair`` (see the module docstring). ``items``: ``{"knob", "test"}`` item sets;
    by default the held-out facts of the zoo's knob fine-tune (:func:`~circuits.knob.data.heldout_items`)."""
    say = progress or (lambda msg: log.info(msg))
    t0 = time.time()
    models = {"base": pair.base, "tuned": pair.tuned}
    items = items if items is not None else heldout_items(pair.base, seed=cfg.seed)
    for part in ("knob", "test"):
        if part not in items or len(items[part]) == 0:
            raise ConfigError(f"items must hold non-empty 'knob' and 'test' parts, got {list(items)}")
    knob, test = items["knob"].head(cfg.n_knob), items["test"].head(cfg.n_test)
    bs = cfg.batch_size
    n_layers = pair.tuned.dims.n_layers

    say(f"knob: pair accuracy of both models on {len(test)} held-out pairs")
    acc_rows = [{"model": r, **intent_accuracy(m, test, bs)} for r, m in models.items()]

    conf_knob = confident(pair.tuned, knob, bs)
    conf_test = confident(pair.tuned, test, bs)
    das_train = knob.subset(torch.nonzero(conf_knob)[:, 0])
    das_val = test.subset(torch.nonzero(conf_test)[:, 0])
    if len(das_train) < 2 or len(das_val) < 1:
        raise ConfigError(
            f"the tuned model answers only {len(das_train)} knob and {len(das_val)} test items right in both "
            "intents; the knob needs a model that follows the intent"
        )

    say(f"knob: layer sweep (every {cfg.layer_step} layers) on {len(das_train)} confident items, both models")
    patchers = {role: Patcher(m, das_train, bs) for role, m in models.items()}
    follows = {role: intent_accuracy(m, das_train, bs)["pair_accuracy"] for role, m in models.items()}
    curve_rows, layer, rule_met = sweep_layers(
        patchers, "tuned", n_layers, cfg.layer_step, cfg.threshold, refine=cfg.refine
    )
    for r in curve_rows:
        r["follows_intent"] = follows[r["model"]]
        r["defined"] = follows[r["model"]] >= 0.5
    lower, lower_runs = lower_bound(patchers["tuned"], layer, cfg.threshold)
    say(f"knob: layer {layer} (rule met: {rule_met}); attention writes the intent in layers {lower}..{layer}")
    lens_rows = [
        {"model": role, **r}
        for role in ROLES
        for r in lens_curve(patchers[role], list(range(lower, layer + 1)))
    ]

    say(f"knob: rank-1 DAS at resid_post.{layer} on {len(das_train)} items ({2 * len(das_train)} pairs)")
    train_set = interchange_set(pair.tuned, das_train, layer, bs)
    val_set = interchange_set(pair.tuned, das_val, layer, bs)
    u, losses = train_das(pair.tuned, train_set, layer, cfg.das, name="tuned DAS")
    dom = mean_direction(pair.tuned, knob, layer, bs)
    rnd = random_direction(pair.tuned, layer, cfg.seed)
    base_dom = mean_direction(pair.base, knob, layer, bs)
    val_hits = {
        "das_val": interchange_hits(pair.tuned, u, val_set, bs),
        "diff_of_means_val": interchange_hits(pair.tuned, dom, val_set, bs),
        "random_val": interchange_hits(pair.tuned, rnd, val_set, bs),
    }
    interchange = {
        "das_val": float(val_hits["das_val"].float().mean()),
        "das_train": interchange_accuracy(pair.tuned, u, train_set, bs),
        "diff_of_means_val": float(val_hits["diff_of_means_val"].float().mean()),
        "random_val": float(val_hits["random_val"].float().mean()),
    }
    interchange_ci = _interchange_intervals(val_hits, das_val, cfg.seed)
    say(
        f"knob: interchange accuracy DAS {interchange['das_val']:.2f}, diff-of-means "
        f"{interchange['diff_of_means_val']:.2f}, random {interchange['random_val']:.2f}"
    )

    say("knob: calibration and dose-response in both models")
    directions = {"tuned DAS": u, "tuned diff-of-means": dom, "base diff-of-means": base_dom}
    cal_rows, dose_rows, cals = [], [], {}
    for role, m in models.items():
        for dname, d in directions.items():
            cal = calibrate(m, d, knob, bs)
            cals[(role, dname)] = cal
            cal_rows.append(
                {
                    "model": role,
                    "direction": dname,
                    "mean_context": cal.mean_context,
                    "mean_prior": cal.mean_prior,
                    "std_context": cal.std_context,
                    "std_prior": cal.std_prior,
                    "auroc": cal.auroc,
                }
            )
    found_in = {"tuned DAS": "tuned", "tuned diff-of-means": "tuned", "base diff-of-means": "base"}
    for role, dname in (("tuned", "tuned DAS"), ("base", "tuned DAS"), ("tuned", "base diff-of-means")):
        cal = cals[(found_in[dname], dname)]  # set-points of the model the direction was found in
        cs = cal.grid(cfg.dose_ts)
        for r in dose_response(models[role], directions[dname], test, cs, cfg.dose_fmts, bs):
            t = math.nan if math.isnan(r["c"]) else cfg.dose_ts[cs.index(r["c"])]
            dose_rows.append({"model": role, "direction": dname, "t": t, **r})

    say(
        f"knob: transfer sweep (every {cfg.transfer_step} layers) of the tuned knob in both models, each "
        f"effect beside {cfg.n_random} random directions"
    )
    layers = sorted(set(range(0, n_layers, cfg.transfer_step)) | {layer})
    cal_t, test_t = knob.head(cfg.n_transfer), test.head(cfg.n_transfer)
    setpoint_sets = {"means": cfg.effect_ts} | ({"overshoot": cfg.overshoot_ts} if cfg.overshoot_ts else {})

    def effect_rows(m, d, source, own, base_row: dict) -> list[dict]:
        """One row per set of set-points, read off ``source`` (the calibration in the model the direction
        was found in, as the paper carries fixed set-points across models); AUROC from ``own``."""
        return [
            {
                **base_row,
                "setpoints": name,
                "t_prior": ts[0],
                "t_context": ts[1],
                "auroc": own.auroc,
                **steering_effect(
                    m, d, test_t, tuple(source.grid(ts)), n_random=cfg.n_random, seed=cfg.seed, batch_size=bs
                ),
            }
            for name, ts in setpoint_sets.items()
        ]

    transfer_rows = []
    for ell in layers:
        moved = with_layer(u, ell)
        own = {role: calibrate(m, moved, cal_t, bs) for role, m in models.items()}
        for role, m in models.items():
            row = {"model": role, "direction": "tuned DAS", "layer": ell}
            transfer_rows += effect_rows(m, moved, own["tuned"], own[role], row)
    transfer_rows += effect_rows(
        pair.tuned,
        base_dom,
        cals[("base", "base diff-of-means")],
        cals[("tuned", "base diff-of-means")],
        {"model": "tuned", "direction": "base diff-of-means", "layer": layer},
    )

    say("knob: generated text with and without the knob")
    gen_rows = []
    for i in range(min(cfg.n_generate, len(test))):
        prompt = test.prompts("none")[i]
        lo, hi = cals[("tuned", "tuned DAS")].grid(cfg.effect_ts)
        for role, m in models.items():
            gen_rows.append(
                {
                    "item": test.item_ids[i],
                    "model": role,
                    "prior_answer": test.answers[i][0],
                    "context_answer": test.answers[i][1],
                    "unsteered": m.generate(prompt, max_new_tokens=cfg.max_new_tokens),
                    "t_prior": cfg.effect_ts[0],
                    "t_context": cfg.effect_ts[1],
                    "steered_to_setpoint_prior": steer(m, u, prompt, lo, cfg.max_new_tokens),
                    "steered_to_setpoint_context": steer(m, u, prompt, hi, cfg.max_new_tokens),
                }
            )

    from dataclasses import asdict

    return KnobResult(
        pair=pair_provenance(pair),
        config={**asdict(cfg), "das": asdict(cfg.das)},
        knob_layer=layer,
        layer_rule_met=rule_met,
        read_in=(lower, layer),
        accuracy=pd.DataFrame(acc_rows),
        layer_curve=pd.DataFrame(curve_rows),
        read_in_runs=pd.DataFrame(
            lower_runs or [{"lower": float(layer), "CP": math.nan, "PC": math.nan, "mean": math.nan}]
        ),
        lens=pd.DataFrame(lens_rows),
        direction=u,
        baseline=dom,
        base_direction=base_dom,
        interchange=interchange,
        interchange_ci=interchange_ci,
        das_losses=losses,
        calibration=pd.DataFrame(cal_rows),
        dose=pd.DataFrame(dose_rows),
        transfer=pd.DataFrame(transfer_rows),
        generations=pd.DataFrame(gen_rows),
        n_items={"knob": len(knob), "test": len(test), "das_train": len(das_train), "das_val": len(das_val)},
        seconds=round(time.time() - t0, 1),
    )
