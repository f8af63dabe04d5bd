"""Hook bookkeeping shared by the backends: counting attached hooks and switching LoRA adapters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def count_hooks(module: nn.Module) -> int:
    """Number of forward/backward hooks attached anywhere in ``module``.

    transformers installs permanent output-capturing hooks of its own the first time a model is asked for
    hidden states; those are not ours and are not counted.
    """
    total = 0
    for m in module.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):
            total += sum(1 for fn in hooks.values() if not _is_transformers_hook(fn))
    return total


def _is_transformers_hook(fn) -> bool:
    inner = getattr(fn, "__wrapped__", fn)
    return getattr(inner, "__module__", "").startswith("transformers.")


@contextmanager
def adapter_enabled(module: nn.Module, enabled: bool | None) -> Iterator[None]:
    """Switch every peft adapter layer inside ``module`` on or off for the duration; ``None`` leaves it.

    Works on any copy of a peft model (also one a backend has rewritten), because it walks the module
    tree instead of calling ``PeftModel.disable_adapter``.
    """
    if enabled is None:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [not m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(enabled)
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.enable_adapters(was)
