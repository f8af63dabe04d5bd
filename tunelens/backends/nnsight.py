"""nnsight backend (``TransformersModel``): the second local backend and the path to remote execution.

Sites map to module inputs/outputs of the HF model (:func:`tunelens.sites.module_side`); the trace
touches them in execution order, as nnsight requires. ``resid_mid`` is ``resid_pre + attn_out``, and a
write there is carried out as a change of ``attn_out``. ``pattern`` can be read (eager attention) but
not written: the probabilities are computed inside a function, not a module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from tunelens.backends._shared import attn_out_step, plan, record
from tunelens.backends.base import RunOutput, TokenBatch, Write, apply_writes
from tunelens.backends.hooks import adapter_enabled, count_hooks
from tunelens.dims import ModelDims
from tunelens.errors import BackendError
from tunelens.families import family_of
from tunelens.families.base import _unwrap, put_features, take_features
from tunelens.sites import Site, module_side

_HEADED = ("z", "q", "k", "v")


class NNsightBackend:
    """Runs a model inside ``nnsight`` traces; reads and writes are trace interventions."""

    name = "nnsight"

    def __init__(self, model: nn.Module, tokenizer, dims: ModelDims, *, adapter: bool | None = None) -> None:
        from nnsight import TransformersModel

        self.dims = dims
        self._adapter = adapter
        self._root = model
        hf = _unwrap(model)
        self._family = family_of(hf)
        self._lm = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")

    @property
    def device(self) -> torch.device:
        return next(self._root.parameters()).device

    def attached_hooks(self) -> int:
        return count_hooks(self._root)

    def _envoy(self, path: str):
        env = self._lm
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    def _to_canonical(self, site: Site, native: Tensor) -> Tensor:
        if site.kind in _HEADED:
            return rearrange(
                native, "batch pos (head d_head) -> batch pos head d_head", d_head=self.dims.d_head
            )
        return native

    def _to_native(self, site: Site, canonical: Tensor) -> Tensor:
        if site.kind in _HEADED:
            return rearrange(canonical, "batch pos head d_head -> batch pos (head d_head)")
        return canonical

    def run(
        self,
        batch: TokenBatch,
        *,
        reads: Sequence[Site] = (),
        writes: Sequence[Write] = (),
        grad: bool = False,
        logits: bool = True,
    ) -> RunOutput:
        sites = plan(self.dims, reads, writes)
        for w in writes:
            if w.site.kind == "pattern":
                raise BackendError(
                    "the nnsight backend cannot write 'pattern' (computed inside a function); use the bridge"
                )
        batch = batch.to(self.device)
        acts: dict[Site, Tensor] = {}
        out: dict[str, Tensor] = {}
        with torch.set_grad_enabled(grad), adapter_enabled(self._root, self._adapter):
            try:
                self._trace(batch, sites, reads, writes, acts, out, grad)
            except BackendError:
                raise
            except Exception as exc:
                if type(exc).__module__.startswith("tunelens"):
                    raise
                raise BackendError(f"nnsight trace failed: {type(exc).__name__}: {exc}") from exc
        return RunOutput(logits=out.get("logits") if logits else None, acts=acts)

    def _trace(self, batch, sites, reads, writes, acts, out, grad: bool) -> None:
        resid_pre: dict[int, Tensor] = {}
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with self._lm.trace(inputs):
            for whole in sites:
                if whole.kind == "logits":  # the model's output: after Gemma's final soft-cap (read only)
                    record(acts, reads, whole, self._lm.output.logits)
                    continue
                where = module_side(whole, self._family, self.dims)
                side, features = where.side, where.features
                env = self._envoy(where.path)
                if side == "input":
                    native = env.input
                elif side == "output":
                    native = env.output
                else:
                    native = env.output[int(side[-1])]
                fused = native
                if features is not None:  # a q/k/v block of a fused projection
                    native = take_features(fused, features)
                canonical = self._to_canonical(whole, native)
                if whole.kind == "attn_out":
                    pre = resid_pre.get(whole.layer)
                    new = attn_out_step(canonical, pre, whole.layer, reads, writes, acts, grad)
                else:
                    new = apply_writes(canonical, whole, writes)
                    record(acts, reads, whole, new)
                if whole.kind == "resid_pre":
                    resid_pre[whole.layer] = new
                # with gradients, route the canonical tensor back in so reads are upstream of everything
                changed = new is not canonical or grad
                if changed and features is not None:
                    full = fused.clone()
                    put_features(full, features, self._to_native(whole, new))
                    env.output = full
                elif changed and side == "input":
                    env.input = self._to_native(whole, new)
                elif changed and side == "output":
                    env.output = self._to_native(whole, new)
                elif changed and side == "output0":
                    env.output = (new, *tuple(env.output)[1:])
            out["logits"] = self._lm.output.logits
