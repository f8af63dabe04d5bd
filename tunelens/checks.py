"""Self-checks of a model pair: backends agree with the plain HF forward, self-patching is a no-op,
no hook survives a call. ``tunelens check`` prints them; the tests assert them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelens.backends.base import replace
from tunelens.models.loaded import BACKENDS, LoadedModel
from tunelens.models.pair import ModelPair
from tunelens.sites import Site

TOLERANCE = 1e-4
DEFAULT_PROMPTS = (
    "The apple is in Box F. The cup is in Box Q. Box Q contains the",
    "The capital of France is",
    "Once upon a time, there was",
)


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
    results, acts = [], {}
    for kind in BACKENDS:
        backend = model.backend(kind)  # type: ignore[arg-type]
        out = backend.run(batch, reads=sites)
        diff = (out.logits - reference)[mask].abs().max().item()
        results.append(
            CheckResult(
                name=f"{model.name}: {kind} logits vs HF",
                passed=diff <= TOLERANCE,
                value=diff,
                threshold=TOLERANCE,
            )
        )
        acts[kind] = out.acts
        z = [s for s in sites if s.kind in ("z", "resid_post")]
        patched = backend.run(batch, writes=[replace(s, out.acts[s]) for s in z])
        diff = (patched.logits - out.logits).abs().max().item()
        results.append(
            CheckResult(
                name=f"{model.name}: {kind} self-patch is a no-op",
                passed=diff <= TOLERANCE,
                value=diff,
                threshold=TOLERANCE,
                detail=f"({len(z)} sites)",
            )
        )
        left = backend.attached_hooks()
        results.append(
            CheckResult(
                name=f"{model.name}: {kind} leaves no hook", passed=left == 0, value=left, threshold=0
            )
        )
    worst, where = 0.0, ""
    for s in sites:
        a, b = acts["bridge"][s], acts["nnsight"][s]
        m = mask[:, None, :, None] if s.kind == "pattern" else mask.reshape(*mask.shape, *[1] * (a.ndim - 2))
        d = (a - b).masked_fill(~m.expand_as(a), 0).abs().max().item()
        if d >= worst:
            worst, where = d, str(s)
    results.append(
        CheckResult(
            name=f"{model.name}: bridge vs nnsight activations",
            passed=worst <= TOLERANCE,
            value=worst,
            threshold=TOLERANCE,
            detail=f"(worst at {where})",
        )
    )
    return results


def check_pair(pair: ModelPair, prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[CheckResult]:
    results = [CheckResult(name="pair is compatible (sizes, tokenizer)", passed=True, value=0, threshold=0)]
    for _, model in pair:
        results += check_model(model, prompts)
    return results
