"""``fit_probes``: probes at every layer of both models of a pair, with controls, seeds and transfer.

This is the engine every probe study, batch job and app page calls. Given activations
``[layer, batch, d_model]`` per model role, labels and item ids, it splits by item (seeded), fits the
standardisation on the training split only, trains the probes of all layers as one batched
optimisation, and scores them on the test split: the task, the Hewitt–Liang control task, shuffled
labels, and each model's probe applied to the other model. Everything runs in float64 and is
deterministic for a given ``cfg.seed`` and torch thread count.

Example:
    >>> import torch
    >>> from probes import ProbeConfig, fit_probes
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2, 400, 8, generator=g)           # 2 layers, 400 examples
    >>> y = (x[1, :, 0] > 0).long()                       # decodable at layer 1 only
    >>> items = [f"item{i}" for i in range(400)]
    >>> res = fit_probes({"base": x, "tuned": x}, y, items, ProbeConfig(), layers=[4, 5])
    >>> [round(a, 2) for a in res.curve("base").tolist()]
    [0.47, 0.98]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from probes.config import ProbeConfig
from probes.controls import control_labels, shuffled_labels
from probes.diff_means import fit_diff_means
from probes.linear_fit import LinearFit
from probes.logistic import fit_logistic
from probes.result import ProbeResult
from probes.ridge import fit_ridge, r2_score
from probes.split import split_indices
from probes.standardise import Standardiser
from tunelens import metrics
from tunelens.errors import ConfigError, ShapeError

log = logging.getLogger(__name__)
ROLES = ("base", "tuned")


# -- input checks ------------------------------------------------------------------------------------------
def _check_acts(acts: Mapping[str, Tensor]) -> tuple[int, int, int]:
    if not isinstance(acts, Mapping) or not acts:
        raise ShapeError(
            f"acts must map a model role ('base'/'tuned') to a tensor, got {type(acts).__name__}"
        )
    unknown = [r for r in acts if r not in ROLES]
    if unknown:
        raise ConfigError(f"acts has unknown role(s) {unknown}; expected keys among {ROLES}")
    shape = None
    for role, a in acts.items():
        if not isinstance(a, Tensor) or a.ndim != 3:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ShapeError(f"acts[{role!r}] must be a tensor [layer, batch, d_model], got {got}")
        if shape is not None and tuple(a.shape) != shape:
            raise ShapeError(f"acts of the two models differ in shape: {shape} vs {tuple(a.shape)} ({role})")
        shape = tuple(a.shape)
        # one cheap pass first: NaN/Inf propagate through a sum (which may also overflow: then look closer)
        finite = None if torch.isfinite(a.sum()) else torch.isfinite(a)
        if finite is not None and not finite.all():
            layer, row, _ = (~finite).nonzero()[0].tolist()
            n_bad = int((~finite).sum())
            raise ShapeError(
                f"acts[{role!r}] has {n_bad} NaN/Inf values (first at layer index {layer}, example {row}); "
                "probes need finite activations — check the capture dtype (float16 overflow?) and the model"
            )
    assert shape is not None
    return shape


def _check_labels(
    labels: Tensor | Mapping[str, Tensor], roles: Sequence[str], n: int, kind: str
) -> dict[str, Tensor]:
    per_role = dict(labels) if isinstance(labels, Mapping) else {r: labels for r in roles}
    missing = [r for r in roles if r not in per_role]
    if missing:
        raise ConfigError(f"labels are given per role but lack {missing}; roles in acts: {list(roles)}")
    out = {}
    for role in roles:
        y = per_role[role]
        if not isinstance(y, Tensor) or y.ndim != 1:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ShapeError(f"labels for {role!r} must be a 1-d tensor [batch], got {got}")
        if len(y) != n:
            raise ShapeError(
                f"labels for {role!r} have length {len(y)}, but the activations have {n} examples"
            )
        if kind == "ridge":
            if not torch.isfinite(y.double()).all():
                raise ShapeError(f"ridge targets for {role!r} contain NaN/Inf")
            y = y.double()
        elif y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise ShapeError(
                    f"{kind} probes need class labels (integers), got non-integer floats for {role!r}; "
                    "use kind='ridge' for scalar targets"
                )
            y = y.long()
        out[role] = y
    return out


# -- scoring -------------------------------------------------------------------------------------------------
def _scores(
    kind: str,
    x: Float[Tensor, "layer batch d_model"],
    test: Tensor,
    y: Tensor,
    w: Tensor,
    b: Tensor,
    n_classes: int,
) -> dict[str, Tensor]:
    """Per-layer scores of raw-space affine probes (``w``, ``b``) on the ``test`` examples of raw
    activations ``x`` (all examples go through the product, which reads ``x`` once, instead of copying
    the test rows out first), against their labels ``y``."""
    n_layer = x.shape[0]
    z = torch.bmm(x, w.to(x.dtype))[:, test].double() + b[:, None, :]
    if kind == "ridge":
        return {"score": r2_score(z[..., 0], y)}
    pred = (z[..., 0] > 0).long() if z.shape[-1] == 1 else z.argmax(-1)
    acc = (pred == y[None]).double().mean(-1)
    out = {"score": acc}
    nan = torch.full((n_layer,), math.nan, dtype=torch.float64)
    if kind == "logistic":
        probs = torch.cat([1 - torch.sigmoid(z), torch.sigmoid(z)], -1) if z.shape[-1] == 1 else z.softmax(-1)
        out["ece"] = metrics.ece_rows(probs, y)
    else:
        out["ece"] = nan
    if n_classes == 2 and bool((y == 1).any()) and bool((y == 0).any()):
        out["auroc"] = metrics.auroc_rows(z[..., 0], y)
    else:
        out["auroc"] = nan
    return out


def _fit(kind: str, xs: Tensor, st: Standardiser, ys: Tensor, n_classes: int, cfg: ProbeConfig) -> LinearFit:
    """Fit every (layer, label set) on the standardised training split ``xs`` ``[layer, batch, d]``
    with labels ``ys`` ``[layer, target, batch]``; returns raw-space affine probes, weight
    ``[layer, target, d, k]``."""
    if kind == "logistic":
        fit = fit_logistic(
            xs, ys, n_classes=n_classes, C=cfg.C, max_iter=cfg.max_iter, tol=cfg.tol, solver=cfg.solver
        )
    else:
        fit = fit_ridge(xs, ys, alpha=cfg.alpha)
    w, b = _per_target_raw(st, fit.weight, fit.bias)
    return LinearFit(weight=w, bias=b, converged=fit.converged, n_iter=fit.n_iter)


def _fit_diff_means_roles(
    x_raw: Tensor, ys: Tensor, n_roles: int, layers: Sequence[int], site_kind: str
) -> LinearFit:
    """Diff-of-means probes (raw activations) for stacked roles (``x_raw`` ``[role·layer, batch, d]``)."""
    L = len(layers)
    ws, bs = [], []
    for i in range(n_roles):
        for t in range(ys.shape[1]):
            x = x_raw[i * L : (i + 1) * L]
            fit, _ = fit_diff_means(x, ys[i * L, t], layers=layers, site_kind=site_kind)
            ws.append(fit.weight)
            bs.append(fit.bias)
    n_target = ys.shape[1]
    weight = torch.stack(ws).view(n_roles, n_target, *ws[0].shape).transpose(1, 2).flatten(0, 1)
    bias = torch.stack(bs).view(n_roles, n_target, *bs[0].shape).transpose(1, 2).flatten(0, 1)
    return LinearFit(
        weight=weight,
        bias=bias,
        converged=torch.ones(n_roles * L, n_target, dtype=torch.bool),
        n_iter=torch.zeros(n_roles * L, n_target, dtype=torch.long),
    )


def _examples(x: Tensor, index: Tensor, out: Tensor) -> None:
    """``out[:] = x[:, index]`` for ``x`` ``[layer, batch, d]``, as one row gather over the flattened layers
    (twice as fast as indexing the middle axis on CPU)."""
    L, n, d = x.shape
    rows = (index[None] + n * torch.arange(L)[:, None]).reshape(-1)
    torch.index_select(x.reshape(L * n, d), 0, rows, out=out.view(L * len(index), d))


def _per_target_raw(st: Standardiser, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Standardised-space weights ``[layer, target, d, k]`` -> raw space, per target."""
    pairs = [st.to_raw(w[:, t], b[:, t]) for t in range(w.shape[1])]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def _cosine(wa: Tensor, wb: Tensor) -> Tensor:
    """Cosine per layer between raw-space probe weights, averaged over classes (k > 1)."""
    num = (wa * wb).sum(1)
    den = wa.norm(dim=1) * wb.norm(dim=1)
    return (num / den.clamp_min(1e-300)).mean(-1)


def _names(classes: list[Any], class_names: Sequence[str] | None) -> list[str]:
    """Names of the classes present: ``class_names[value]`` for integer labels, else the values."""
    if class_names is None:
        return [str(c) for c in classes]
    if all(isinstance(c, int) and 0 <= c < len(class_names) for c in classes):
        return [str(class_names[c]) for c in classes]
    raise ConfigError(f"class_names has {len(class_names)} names, but the labels take values {classes}")


# -- the engine ----------------------------------------------------------------------------------------------
def fit_probes(
    acts: Mapping[str, Float[Tensor, "layer batch d_model"]],
    labels: Tensor | Mapping[str, Tensor],
    items: Sequence[str],
    cfg: ProbeConfig,
    *,
    layers: Sequence[int] | None = None,
    pair: Mapping[str, Any] | None = None,
    types: Sequence[str] | None = None,
    site_kind: str = "resid_post",
    task: str = "",
    class_names: Sequence[str] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Train and score probes at every layer of every model role in ``acts``.

    Args:
        acts: role (``"base"``, ``"tuned"``) -> activations ``[layer, batch, d_model]`` (one site kind,
            one position per example), both roles on the same examples in the same order.
        labels: class ids (logistic, diff_means) or scalar targets (ridge), ``[batch]``; or a mapping
            role -> labels where the label depends on the model (e.g. "does *this* model know the fact").
        items: the item id of each example; the split keeps an item's examples together.
        cfg: the probe settings.
        layers: the layer number of each entry of the ``layer`` axis (default ``0..L-1``).
        pair: provenance of the activations (:func:`tunelens.results.pair_provenance`).
        types: the control-task type of each example (default: ``items``; see :mod:`probes.controls`).
        site_kind: the site the activations were read at (names the probe directions).
        class_names: the name of each label value ``0, 1, …`` (integer labels); recorded with ``task``
            and ``notes`` in the result.

    Raises:
        ShapeError: activations not ``[layer, batch, d_model]``, NaN/Inf in them, labels or items of the
            wrong length, non-integer class labels.
        ConfigError: a single class, an unknown role, too few test examples (``cfg.min_test_items``),
            diff_means with more than two classes, ``layers`` of the wrong length.
    """
    n_layer, n, d = _check_acts(acts)
    roles = tuple(r for r in ROLES if r in acts)
    ys = _check_labels(labels, roles, n, cfg.kind)
    if len(items) != n:
        raise ShapeError(f"items has length {len(items)}, but the activations have {n} examples")
    types = list(items) if types is None else list(types)
    if len(types) != n:
        raise ShapeError(f"types has length {len(types)}, but the activations have {n} examples")
    layers = tuple(range(n_layer)) if layers is None else tuple(int(x) for x in layers)
    if len(layers) != n_layer:
        raise ConfigError(f"layers names {len(layers)} layers, but the activations have {n_layer}")

    classes: list[Any] = []
    n_classes = 0
    if cfg.kind != "ridge":
        classes = sorted(set().union(*(set(ys[r].tolist()) for r in roles)))
        for role in roles:
            present = sorted(set(ys[role].tolist()))
            if len(present) < 2:
                raise ConfigError(
                    f"labels for {role!r} have a single class {present}; a probe needs at least two classes"
                )
        n_classes = len(classes)
        if cfg.kind == "logistic" and cfg.solver == "newton" and n_classes != 2:
            raise ConfigError(f"solver='newton' is for binary probes, got {n_classes} classes; use 'lbfgs'")
        if cfg.kind == "diff_means" and n_classes != 2:
            raise ConfigError(f"diff_means probes are binary, got {n_classes} classes {classes}")
        index = {c: i for i, c in enumerate(classes)}
        ys = {r: torch.tensor([index[v] for v in ys[r].tolist()], dtype=torch.long) for r in roles}

    items = [str(i) for i in items]
    dtype = torch.float32 if cfg.precision == "float32" else torch.float64
    x64 = {r: acts[r].detach().to("cpu", dtype) for r in roles}
    S, R, L = len(cfg.seeds), len(roles), n_layer
    nan = lambda *shape: torch.full(shape, math.nan, dtype=torch.float64)
    targets = ["task"] + (["control"] if cfg.control else []) + (["shuffled"] if cfg.shuffled else [])
    table = {k: nan(R, S, L) for k in ("task", "auroc", "ece", "control", "shuffled")}
    converged = torch.zeros(R, S, L, dtype=torch.bool)
    chance = nan(R, S)
    transfer = {f"{a}->{b}": nan(S, L) for a in roles for b in roles if a != b and cfg.transfer}
    cosine = nan(S, L)
    n_train, n_test, n_test_items = [], [], []
    k = 1 if n_classes <= 2 else n_classes
    weight = torch.zeros(R, L, d, k, dtype=torch.float64)
    bias = torch.zeros(R, L, k, dtype=torch.float64)

    for si, seed in enumerate(cfg.seeds):
        tr, te = split_indices(items, test_fraction=cfg.test_fraction, seed=seed)
        te_items = len({items[i] for i in te.tolist()})
        if len(te) < cfg.min_test_items:
            raise ConfigError(
                f"the test split has {len(te)} examples ({te_items} items) at test_fraction "
                f"{cfg.test_fraction}; reported scores need at least {cfg.min_test_items} "
                "(ProbeConfig.min_test_items). Use more data or a larger test_fraction."
            )
        n_train.append(len(tr))
        n_test.append(len(te))
        n_test_items.append(te_items)
        # label sets per role: [target, example]; test labels per target (shuffled is scored on true labels)
        train_sets, test_sets = [], []
        for role in roles:
            y = ys[role]
            sets = {"task": y}
            if cfg.control:
                sets["control"] = control_labels(types, y, seed=seed)
            if cfg.shuffled:
                shuffled = y.clone()
                shuffled[tr] = shuffled_labels(y[tr], seed=seed)
                sets["shuffled"] = shuffled
            train_sets.append(torch.stack([sets[t][tr] for t in targets]))
            test_sets.append({t: (y if t == "shuffled" else sets[t])[te] for t in targets})
            if cfg.kind != "ridge":
                chance[roles.index(role), si] = float(torch.bincount(y[te]).max()) / len(te)
        # every layer of every role and every label set: one optimisation
        x_tr = torch.empty(R * L, len(tr), d, dtype=dtype)  # [role·layer, train, d]
        for i, r in enumerate(roles):
            _examples(x64[r], tr, out=x_tr[i * L : (i + 1) * L])
        y_tr = torch.cat([s[None].expand(L, -1, -1) for s in train_sets])  # [role·layer, target, train]
        if cfg.kind == "diff_means":
            st = Standardiser.fit(x_tr)
            fit = _fit_diff_means_roles(x_tr, y_tr, R, layers, site_kind)
        else:
            st, xs = Standardiser.fit_apply(x_tr, inplace=True)  # x_tr is not used again
            fit = _fit(cfg.kind, xs, st, y_tr, n_classes, cfg)
            del xs, x_tr
        w_all, b_all = fit.weight.view(R, L, len(targets), d, k), fit.bias.view(R, L, len(targets), k)
        converged[:, si] = fit.converged.view(R, L, -1)[..., 0]
        stds = {
            r: Standardiser(st.mean[i * L : (i + 1) * L], st.scale[i * L : (i + 1) * L])
            for i, r in enumerate(roles)
        }
        for ri, role in enumerate(roles):
            for ti, t in enumerate(targets):
                sc = _scores(
                    cfg.kind, x64[role], te, test_sets[ri][t], w_all[ri, :, ti], b_all[ri, :, ti], n_classes
                )
                table[t][ri, si] = sc["score"]
                if t == "task":
                    for key in ("auroc", "ece"):
                        if key in sc:
                            table[key][ri, si] = sc[key]
            if si == 0:
                weight[ri], bias[ri] = w_all[ri, :, 0], b_all[ri, :, 0]
        if R == 2:
            cosine[si] = _cosine(w_all[0, :, 0], w_all[1, :, 0])
        for key in transfer:
            src, dst = key.split("->")
            w, b = w_all[roles.index(src), :, 0], b_all[roles.index(src), :, 0]
            if cfg.transfer_standardise == "target":
                # the destination's activations, standardised by its own training statistics, are mapped
                # to the source's raw coordinates: x ↦ mean_src + scale_src · (x − mean_dst) / scale_dst
                w_std, b_std = stds[src].from_raw(w, b)
                w, b = stds[dst].to_raw(w_std, b_std)
            transfer[key][si] = _scores(cfg.kind, x64[dst], te, ys[dst][te], w, b, n_classes)["score"]

    metric = "r2" if cfg.kind == "ridge" else "accuracy"
    scores = {"task": table["task"], "control": table["control"], "shuffled": table["shuffled"]}
    scores["selectivity"] = table["task"] - table["control"]
    if cfg.kind != "ridge":
        scores["auroc"], scores["ece"] = table["auroc"], table["ece"]
    if not converged.all():
        log.warning(
            "%d of %d probe fits did not reach tol=%g", int((~converged).sum()), converged.numel(), cfg.tol
        )
    return ProbeResult(
        config=cfg,
        task=task,
        site_kind=site_kind,
        layers=layers,
        roles=roles,
        metric=metric,
        classes=_names(classes, class_names),
        scores=scores,
        transfer=transfer,
        cosine=cosine if R == 2 else None,
        weight=weight.float(),
        bias=bias.float(),
        chance=chance,
        converged=converged,
        n_train=n_train,
        n_test=n_test,
        n_test_items=n_test_items,
        pair=dict(pair or {}),
        notes=dict(notes or {}),
    )
