"""A live patching sweep on one typed prompt and its counterfactual, for the app (answers in seconds).

1. The counterfactual (source of nothing: the *corrupted* run) and the prompt (the *clean* run) are traced
   once each; the clean run records every site's activation.
2. Attribution patching over every site at once: one more forward of the corrupted run with gradients and
   one backward give ``∇ metric · (clean − corrupt)`` for the residual stream (layer × position), the
   attention and MLP outputs (layer × position) and every head's ``z`` (layer × position × head).
3. The ``top_k`` sites with the largest estimated effect (attention/MLP outputs and heads) are patched
   exactly with the engine of :mod:`circuits.patching.engine`, in one batched call.

The metric is ``logit(answer) − logit(foil)`` at the last position: ``answer`` is the model's top token on
the prompt (or the one given), ``foil`` its top token on the counterfactual (the next best if that equals
the answer).

Example (``model``: a tiny Llama of 4 layers × 4 heads):
    >>> prompt = "The pen is in Box C. The cup is in Box D. Box C contains the"
    >>> counterfactual = "The pen is in Box C. The cup is in Box D. Box D contains the"
    >>> result = live_sweep(model, prompt, counterfactual, answer=" pen", top_k=5)
    >>> result.answer, len(result.tokens), tuple(result.resid_estimate.shape)  # resid: layer × position
    ('pen', 18, (4, 18))
    >>> result.n_sites, len(result.sites)  # attn_out, mlp_out and 4 heads per layer and position; the top 5
    (432, 5)
    >>> fig = result.figure()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from circuits.patching.attribution import pearson
from circuits.patching.engine import Patch, Run, run_cells, trace
from circuits.patching.metrics import Answers, LastLogits, logit_diff
from tunelens.backends.base import TokenBatch
from tunelens.backends.stepwise import Stepper, Trace
from tunelens.errors import ConfigError, PromptError
from tunelens.models.loaded import LoadedModel
from tunelens.results import Result
from tunelens.sites import Site
from tunelens.weights import frozen

SITE_KINDS = ("attn_out", "mlp_out", "z")  # candidates for exact patching
GRAD_KINDS = ("resid_pre", *SITE_KINDS)


@dataclass(frozen=True, kw_only=True)
class LiveSweepResult(Result):
    """Attribution over every site of one prompt pair, and the exact effect of the top sites.

    Effects are changes of the logit difference (answer − foil) when the clean activation is written into
    the counterfactual run; ``clean``/``corrupt`` are the unpatched values, so an effect of
    ``clean − corrupt`` restores the prompt's behaviour completely.
    """

    title: ClassVar[str] = "live patching sweep"
    analysis: ClassVar[str] = "patching"
    layer_column: ClassVar[str | None] = "site"
    tokens: list[str]
    answer: str
    foil: str
    clean: float
    corrupt: float
    resid_estimate: Tensor  # layer pos: estimated effect of patching the residual stream there
    sites: list[str]  # top sites, e.g. "z L3.h2 @5", "mlp_out L4 @7"
    estimate: Tensor  # (top_k,) attributed effect of each top site
    exact: Tensor  # (top_k,) exact effect of each top site
    n_sites: int  # how many sites were attributed
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        gap = self.clean - self.corrupt
        return pd.DataFrame(
            {
                "site": self.sites,
                "attributed": self.estimate.tolist(),
                "exact": self.exact.tolist(),
                "exact_fraction_of_gap": [
                    e / gap if abs(gap) > 1e-12 else float("nan") for e in self.exact.tolist()
                ],
            }
        )

    def figure(self):
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.6, 0.4],
            subplot_titles=(
                "attributed effect of patching the residual stream",
                f"top {len(self.sites)} sites: exact vs attributed",
            ),
        )
        ticks = [f"{i}:{t}" for i, t in enumerate(self.tokens)]
        fig.add_heatmap(
            z=self.resid_estimate.tolist(),
            x=ticks,
            y=list(range(self.resid_estimate.shape[0])),
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": "Δ logit diff", "x": 0.55},
            row=1,
            col=1,
        )
        fig.add_bar(name="exact (activation patching)", x=self.sites, y=self.exact.tolist(), row=1, col=2)
        fig.add_bar(name="attributed (gradient × Δ)", x=self.sites, y=self.estimate.tolist(), row=1, col=2)
        fig.update_xaxes(title_text="position: token", row=1, col=1)
        fig.update_yaxes(title_text="layer", row=1, col=1)
        fig.update_xaxes(title_text="site (kind, layer, head @ position)", row=1, col=2)
        fig.update_yaxes(title_text="change of logit diff (answer − foil)", row=1, col=2)
        fig.update_layout(
            barmode="group",
            title=f"'{self.answer}' vs '{self.foil}': logit diff {self.clean:.2f} on the prompt, "
            f"{self.corrupt:.2f} on the counterfactual",
            legend={"orientation": "h", "y": -0.25},
        )
        return fig

    def summary(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "foil": self.foil,
            "logit_diff_prompt": round(self.clean, 3),
            "logit_diff_counterfactual": round(self.corrupt, 3),
            "sites_attributed": self.n_sites,
            "sites_patched": len(self.sites),
            "top_site": self.sites[0] if self.sites else None,
            "exact_vs_attributed_r": round(pearson(self.estimate, self.exact), 3)
            if len(self.sites) > 1
            else None,
            "seconds": round(self.seconds, 2),
        }


def _encode_pair(model: LoadedModel, prompt: str, counterfactual: str):
    for what, text in (("prompt", prompt), ("counterfactual", counterfactual)):
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"the {what} is empty; type some text")
    clean, corrupt = model.encode([prompt]), model.encode([counterfactual])
    a, b = int(clean.input_ids.shape[1]), int(corrupt.input_ids.shape[1])
    if a != b:
        raise PromptError(
            f"the prompt has {a} tokens but the counterfactual has {b}; patching compares them position by "
            "position, so they need the same token length"
        )
    return clean, corrupt


def _token_id(model: LoadedModel, answer: str) -> int:
    ids = model.tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise PromptError(f"the answer {answer!r} has no tokens")
    return int(ids[0])


def _grad_run(
    model: LoadedModel, stepper: Stepper, tokens: TokenBatch, answer: int
) -> tuple[Run, Answers, dict, dict]:
    """The counterfactual run with gradients: a Run to patch into, the answers (the foil is read from this
    run's own logits), and d(metric)/d(activation) with the activations, by (layer, kind)."""
    acts: dict[tuple[int, str], Tensor] = {}
    probes: dict[tuple[int, str], Tensor] = {}

    def hook(layer: int, kind: str, t: Tensor) -> Tensor | None:
        if kind in GRAD_KINDS:
            # a zero leaf added to the activation: its gradient is the gradient w.r.t. the activation
            probe = torch.zeros_like(t, requires_grad=True)
            probes[(layer, kind)], acts[(layer, kind)] = probe, t.detach()
            return t + probe
        return None

    tokens = tokens.to(model.device)
    with model.active(), frozen(model.module), torch.enable_grad():
        tr = stepper.trace(tokens.input_ids, tokens.last, hook=hook)
        order = tr.logits[0].detach().argsort(descending=True)
        foil = int(order[0]) if int(order[0]) != answer else int(order[1])
        answers = Answers(answer=torch.tensor([answer]), foil=torch.tensor([foil]))
        logit_diff(LastLogits.from_logits(tr.logits, answers)).sum().backward()
    grads = {k: v.grad.detach() for k, v in probes.items()}
    detached = Trace(
        resid=[r.detach() for r in tr.resid],
        keys=[k.detach() for k in tr.keys],
        values=[v.detach() for v in tr.values],
        acts={},
        logits=tr.logits.detach(),
    )
    return Run(model=model, tokens=tokens, trace=detached, stepper=stepper), answers, grads, acts


def _label(p: Patch) -> str:
    head = "" if p.head is None else f".h{p.head}"
    return f"{p.kind} L{p.layer}{head} @{p.position}"


def live_sweep(
    model: LoadedModel,
    prompt: str,
    counterfactual: str,
    *,
    answer: str | None = None,
    top_k: int = 10,
) -> LiveSweepResult:
    """Attribution over every site, then exact patching of the ``top_k`` largest (see the module doc)."""
    t0 = time.perf_counter()
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    clean_tok, corrupt_tok = _encode_pair(model, prompt, counterfactual)
    clean = trace(model, clean_tok, record=SITE_KINDS)
    stepper = clean.stepper
    ans = _token_id(model, answer) if answer is not None else int(clean.trace.logits[0].argmax())
    target, answers, grads, acts = _grad_run(model, stepper, corrupt_tok, ans)

    n_layers = stepper.n_layers
    effect = {}  # (layer, kind) -> pos [head]: gradient × (clean − corrupt)
    for layer in range(n_layers):
        for kind in GRAD_KINDS:
            a = acts[(layer, kind)]
            diff = clean.value(kind, layer).to(a.dtype) - a
            effect[(layer, kind)] = (grads[(layer, kind)] * diff).sum(dim=-1)[0]
    resid = torch.stack([effect[(layer, "resid_pre")] for layer in range(n_layers)]).float()

    cands: list[tuple[float, Patch]] = []
    for layer in range(n_layers):
        for kind in SITE_KINDS:
            e = effect[(layer, kind)]
            if kind == "z":
                for pos, head in torch.cartesian_prod(
                    torch.arange(e.shape[0]), torch.arange(e.shape[1])
                ).tolist():
                    cands.append((float(e[pos, head]), Patch(Site("z", layer, head), pos)))
            else:
                cands.extend((float(v), Patch(Site(kind, layer), pos)) for pos, v in enumerate(e.tolist()))
    cands.sort(key=lambda c: -abs(c[0]))
    top = cands[:top_k]
    cells = [(p,) for _, p in top]
    patched = logit_diff(run_cells(target, clean, cells, answers))[:, 0]
    corrupt_ld = float(logit_diff(target.last(answers))[0])
    clean_ld = float(logit_diff(clean.last(answers))[0])
    tok = model.tokenizer
    return LiveSweepResult(
        tokens=[tok.decode([int(i)]) for i in clean_tok.input_ids[0]],
        answer=tok.decode([int(answers.answer[0])]),
        foil=tok.decode([int(answers.foil[0])]),
        clean=clean_ld,
        corrupt=corrupt_ld,
        resid_estimate=resid.detach().cpu(),
        sites=[_label(p) for _, p in top],
        estimate=torch.tensor([e for e, _ in top]),
        exact=(patched - corrupt_ld).detach().cpu(),
        n_sites=len(cands),
        seconds=time.perf_counter() - t0,
        provenance={"model": model.name, "prompt": prompt, "counterfactual": counterfactual},
    )
