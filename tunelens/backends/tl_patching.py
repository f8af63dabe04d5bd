"""transformer-lens' own activation patching (``transformer_lens.patching``) over a bridge backend.

The reference the fast patching engine of ``circuits.patching.engine`` is tested and benchmarked against: one
full forward of the corrupted prompts per patched site, through the ``TransformerBridge`` of a
:class:`~tunelens.backends.bridge.BridgeBackend` (TL 4.x has no ``HookedTransformer``; the bridge offers
the ``cfg``, ``run_with_cache`` and ``run_with_hooks`` that the patching module needs).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Literal

import torch
from torch import Tensor

from tunelens.backends.bridge import BridgeBackend
from tunelens.backends.hooks import adapter_enabled
from tunelens.errors import BackendError

TLSweep = Literal["resid_pre", "attn_out", "mlp_out", "z_by_pos", "z_all_pos"]
_FUNCS = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
    "z_by_pos": "get_act_patch_attn_head_out_by_pos",
    "z_all_pos": "get_act_patch_attn_head_out_all_pos",
}


def tl_patch_sweep(
    backend: BridgeBackend,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Callable[[Tensor], Tensor],
    sweep: TLSweep,
    *,
    index: list[tuple[int, ...]] | None = None,
) -> Tensor:
    """``transformer_lens.patching.get_act_patch_*`` on the backend's bridge.

    ``metric`` maps the full logits ``[batch, pos, d_vocab]`` to a scalar. Returns TL's tensor:
    ``[layer, pos]`` for residual sweeps, ``[layer, pos, head]`` or ``[layer, head]`` for heads.
    """
    from transformer_lens import patching

    if not isinstance(backend, BridgeBackend):
        raise BackendError(
            f"transformer_lens.patching needs the bridge backend, got {type(backend).__name__}"
        )
    bridge = backend._bridge
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(adapter_enabled(backend._root, backend._adapter))
        clean_ids, corrupt_ids = clean_ids.to(backend.device), corrupt_ids.to(backend.device)
        _, cache = bridge.run_with_cache(clean_ids)
        fn = getattr(patching, _FUNCS[sweep])
        if index is None:
            return fn(bridge, corrupt_ids, cache, metric).detach().cpu()
        import pandas as pd

        names = ["layer", "pos", "head_index"][: len(index[0])]
        return (
            fn(
                bridge,
                corrupt_ids,
                cache,
                metric,
                index_axis_names=None,
                index_df=pd.DataFrame(index, columns=names),
            )
            .detach()
            .cpu()
        )
