"""Self-checks of a model pair, on any declared family: both backends and the layer-by-layer engine agree
with the plain HF forward, self-patching is a no-op, no hook survives a call, and a cross-model patch of one
head (CMAP's unit) gives the same logits through the engine and through nnsight. A backend that refuses a
model (the bridge on a LoRA over fused projections) is reported as refused, not run. ``tunelens check``
prints them; the tests assert them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelens.backends.base import replace
from tunelens.backends.stepwise import Stepper
from tunelens.errors import BackendError
from tunelens.models.loaded import BACKENDS, LoadedModel
from tunelens.models.pair import ModelPair
from tunelens.sites import Site

TOLERANCE = 1e-4  # float32
HALF_TOLERANCE = 2e-2  # bfloat16 / float16, relative to the logits' scale: two backends round differently


def tolerance(model: LoadedModel, scale: float = 1.0) -> float:
    """How far two computations of the same numbers may differ in this model's dtype."""
    return TOLERANCE if model.dtype == torch.float32 else HALF_TOLERANCE * (scale + 1.0)


DEFAULT_PROMPTS = (
    "The apple is in Box F. The cup is in Box Q. Box Q contains the",
    "The capital of France is",
    "Once upon a time, there was",
)


def _within(name: str, value: float, threshold: float, detail: str = "") -> CheckResult:
    """A check that passes when ``value`` is at most ``threshold``."""
    return CheckResult(name=name, passed=value <= threshold, value=value, threshold=threshold, detail=detail)


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return f"[{mark}] {self.name}: {self.value:.2e} (<= {self.threshold:.0e}) {self.detail}".rstrip()


def check_sites(model: LoadedModel) -> list[Site]:
    """A spread of sites over the model: every kind it has, at the first, middle and last layer."""
    n = model.dims.n_layers
    layers = sorted({0, n // 2, n - 1})
    kinds = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
    if model.dims.parallel_residual:  # GPT-NeoX: attention and MLP both read resid_pre
        kinds = tuple(k for k in kinds if k != "resid_mid")
    return [Site(k, layer) for layer in layers for k in kinds]  # type: ignore[arg-type]


@torch.no_grad()
def check_model(model: LoadedModel, prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[CheckResult]:
    batch = model.encode(prompts)
    reference = model.logits(batch)
    mask = batch.attention_mask.bool().to(reference.device)
    sites = check_sites(model)
    tol = tolerance(model, float(reference.abs().max()))
    results, acts = [], {}
    rows = torch.arange(batch.input_ids.shape[0])
    with model.active() as module:
        run = Stepper(module).trace(batch.input_ids.to(model.device), batch.last)
    diff = (run.logits - reference[rows, batch.last.to(reference.device)]).abs().max().item()
    results.append(
        _within(
            f"{model.name}: engine logits vs HF",
            diff,
            tol,
            f"({model.family.name}, each prompt's last token)",
        )
    )
    for kind in BACKENDS:
        try:
            backend = model.backend(kind)  # type: ignore[arg-type]
        except BackendError as exc:
            results.append(
                CheckResult(
                    name=f"{model.name}: {kind} refused", passed=True, value=0, threshold=0, detail=str(exc)
                )
            )
            continue
        out = backend.run(batch, reads=sites)
        diff = (out.logits - reference)[mask].abs().max().item()
        results.append(_within(f"{model.name}: {kind} logits vs HF", diff, tol))
        acts[kind] = out.acts
        z = [s for s in sites if s.kind in ("z", "resid_post")]
        patched = backend.run(batch, writes=[replace(s, out.acts[s]) for s in z])
        diff = (patched.logits - out.logits).abs().max().item()
        results.append(_within(f"{model.name}: {kind} self-patch is a no-op", diff, tol, f"({len(z)} sites)"))
        left = backend.attached_hooks()
        results.append(_within(f"{model.name}: {kind} leaves no hook", left, 0))
    if len(acts) < 2:
        return results
    worst, where, scale = 0.0, "", 0.0
    for s in sites:
        a, b = acts["bridge"][s], acts["nnsight"][s]
        m = mask[:, None, :, None] if s.kind == "pattern" else mask.reshape(*mask.shape, *[1] * (a.ndim - 2))
        d = (a - b).masked_fill(~m.expand_as(a), 0).abs().max().item()
        scale = max(scale, a.abs().max().item())
        if d >= worst:
            worst, where = d, str(s)
    act_tol = tolerance(model, scale)
    results.append(
        _within(f"{model.name}: bridge vs nnsight activations", worst, act_tol, f"(worst at {where})")
    )
    return results


def check_pair(pair: ModelPair, prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[CheckResult]:
    results = [CheckResult(name="pair is compatible (sizes, tokenizer)", passed=True, value=0, threshold=0)]
    for _, model in pair:
        results += check_model(model, prompts)
    results.append(check_cross_patch(pair, prompts))
    return results


@torch.no_grad()
def check_cross_patch(pair: ModelPair, prompts: Sequence[str] = DEFAULT_PROMPTS) -> CheckResult:
    """CMAP's unit, two ways: the tuned model's z of one head (middle layer, head 0) at each prompt's last
    token written into the base model's run, by the engine's hook and by an nnsight write."""
    base, tuned = pair.base, pair.tuned
    batch = base.encode(prompts)
    layer, head = base.dims.n_layers // 2, 0
    rows, last = torch.arange(batch.input_ids.shape[0]), batch.last
    site = Site("z", layer)
    z = tuned.backend("nnsight").run(batch, reads=[site], logits=False).acts[site][rows, last, head]

    def put(lay, kind, t):
        if (lay, kind) != (layer, "z"):
            return None
        t = t.clone()
        t[rows, last.to(t.device), head] = z.to(t.device, t.dtype)
        return t

    with base.active() as module:
        engine = Stepper(module).trace(batch.input_ids.to(base.device), last, hook=put).logits
    write = replace(Site("z", layer, head), z, positions=last)
    via = base.backend("nnsight").run(batch, writes=[write]).logits[rows, last.to(engine.device)]
    diff = (engine - via).abs().max().item()
    tol = tolerance(base, float(via.abs().max()))
    where = f"(tuned z of L{layer}.H{head} into base, last tokens)"
    return _within("cross-model patch of one head: engine vs nnsight", diff, tol, where)
