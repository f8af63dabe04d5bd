"""transformer-lens ``TransformerBridge`` backend (the default).

The bridge rewrites the HF model it wraps (environment.md pitfall 19) and edits the tokenizer it is given
(it may add a BOS token), so it always gets its own deep copies; the caller's model stays a plain HF /
peft model for weight-space work.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from tunelens.backends._shared import attn_out_step, plan, record
from tunelens.backends.base import RunOutput, TokenBatch, Write, apply_writes
from tunelens.backends.hooks import adapter_enabled, count_hooks
from tunelens.dims import ModelDims
from tunelens.errors import BackendError
from tunelens.sites import Site, bridge_hook_name


class BridgeBackend:
    """Runs a model through transformer-lens' ``TransformerBridge`` with hooks attached per call."""

    name = "bridge"

    def __init__(self, model: nn.Module, tokenizer, dims: ModelDims, *, adapter: bool | None = None) -> None:
        from transformer_lens.model_bridge import TransformerBridge

        self.dims = dims
        self._adapter = adapter
        own = copy.deepcopy(model)
        hf = own.base_model.model if hasattr(own, "peft_config") else own
        self._root = own
        try:
            self._bridge = TransformerBridge.boot_transformers(
                getattr(hf.config, "name_or_path", None) or "tunelens-model",
                hf_model=hf,
                tokenizer=copy.deepcopy(tokenizer),  # the bridge edits the tokenizer it is given
                device=str(next(hf.parameters()).device),
            )
        except Exception as exc:  # the bridge raises many kinds; say which model failed
            raise BackendError(f"TransformerBridge could not wrap this {dims.architecture}: {exc}") from exc
        self._bridge.eval()
        # The bridge attaches a few permanent hooks of its own on first use (norm modules); count those
        # once after a warm-up forward so attached_hooks() reports only what a call left behind.
        with torch.no_grad(), adapter_enabled(self._root, adapter):
            self._bridge(torch.zeros(1, 1, dtype=torch.long, device=self.device), return_type="logits")
        self._baseline_hooks = count_hooks(self._bridge)
        self._check_follows(model)

    def _check_follows(self, model: nn.Module) -> None:
        """Refuse a model the bridge would run wrongly: it rebuilds GPT-2, GPT-NeoX and Phi-3 attention from
        weight slices taken at boot, so a LoRA on their fused projections is silently ignored
        (families.md §4). One short forward of the bridge against the HF model itself decides."""
        vocab = self.dims.d_vocab
        ids = (torch.arange(8, device=self.device)[None] * 7919 + 3) % vocab
        with torch.no_grad(), adapter_enabled(self._root, self._adapter):
            ours = self._bridge(ids, return_type="logits").float()
        with torch.no_grad(), adapter_enabled(model, self._adapter):
            want = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits
        rel = 1e-3 if want.dtype == torch.float32 else 5e-2  # bf16/fp16 round at ~1e-2
        want = want.float().to(ours.device)
        err = float((ours - want).abs().max())
        tol = rel * (float(want.abs().max()) + 1.0)
        if not err <= tol:
            raise BackendError(
                f"TransformerBridge does not follow this {self.dims.architecture}: its logits differ from "
                f"the model's own forward by {err:.3g} (the bridge ignores a LoRA on the fused "
                "projections of GPT-2, GPT-NeoX and Phi-3); use backend='nnsight' "
                "(the model's own modules)"
            )

    @property
    def device(self) -> torch.device:
        return next(self._bridge.parameters()).device

    def attached_hooks(self) -> int:
        return count_hooks(self._bridge) - self._baseline_hooks

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
        acts: dict[Site, Tensor] = {}
        resid_pre: dict[int, Tensor] = {}
        hooks = []
        for whole in sites:

            def fn(act: Tensor, hook, whole: Site = whole) -> Tensor:
                if whole.kind == "attn_out":
                    return attn_out_step(
                        act, resid_pre.get(whole.layer), whole.layer, reads, writes, acts, grad
                    )
                new = apply_writes(act, whole, writes)
                if whole.kind == "resid_pre":
                    resid_pre[whole.layer] = new
                record(acts, reads, whole, new)
                return new

            hooks.append((bridge_hook_name(whole), fn))
        batch = batch.to(self.device)
        with ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            stack.enter_context(adapter_enabled(self._root, self._adapter))
            stack.enter_context(self._bridge.hooks(fwd_hooks=hooks))
            if logits or any(s.kind == "logits" for s in sites):
                out = self._bridge(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
            else:
                # Nothing downstream of the last hooked layer is needed: stop there (no unembedding either).
                if sites:
                    stop = max(s.layer for s in sites) + 1
                    self._bridge(batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=stop)
                out = None
        return RunOutput(logits=out, acts=acts)
