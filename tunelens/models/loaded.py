"""A loaded model: an HF (or peft) module with its tokenizer, sizes, provenance and backends."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import nn

from tunelens.backends.base import Backend, TokenBatch
from tunelens.backends.hooks import adapter_enabled
from tunelens.dims import ModelDims
from tunelens.errors import ConfigError, DeviceError
from tunelens.families import family_of, family_of_config
from tunelens.tasks.base import encode_prompts
from tunelens.weights import content_hash

BackendKind = Literal["bridge", "nnsight"]
BACKENDS: tuple[str, ...] = ("bridge", "nnsight")


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a model came from, recorded with every result computed on it."""

    kind: Literal["zoo", "hf", "gguf", "adapter", "memory"]
    location: str
    adapter: str | None = None
    mode: Literal["switch", "merged"] | None = None

    def describe(self) -> str:
        text = f"{self.kind}:{self.location}"
        if self.adapter:
            text += f" + adapter {self.adapter} ({self.mode})"
        return text


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name (``float32``, ``bfloat16``, ``float16``), or :class:`ConfigError`."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def check_device(device: str | torch.device) -> torch.device:
    """The torch device, or :class:`DeviceError` if this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r}; expected 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was asked for, but this machine has no CUDA GPU; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices here")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported; expected 'cpu' or 'cuda[:N]'")
    return dev


class LoadedModel:
    """One model of a pair. ``adapter`` is ``False``/``True`` for the two views of a peft model."""

    def __init__(
        self,
        module: nn.Module,
        tokenizer,
        *,
        source: ModelSource,
        adapter: bool | None = None,
        name: str | None = None,
    ) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.adapter = adapter
        self.name = name or source.location
        self.dims = runtime_dims(self.hf.config)
        self.family = family_of(self.hf)
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {self.dims.architecture}, {self.dims.n_layers} layers)"

    @property
    def hf(self) -> nn.Module:
        """The HF causal LM (inside the peft wrapper, if any)."""
        return self.module.base_model.model if hasattr(self.module, "peft_config") else self.module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (its activations run in it; tunelens's own sums are float32)."""
        return next(self.module.parameters()).dtype

    @cached_property
    def content_hash(self) -> str:
        """Hash of the weights this view runs with (for a peft model: with or without the adapter)."""
        return content_hash(self.module, adapters=self.adapter is not False)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The module, with this view's adapter state switched on for the duration."""
        with adapter_enabled(self.module, self.adapter):
            yield self.module

    def backend(self, kind: BackendKind = "bridge") -> Backend:
        """The backend of this kind over this model (built once, then reused)."""
        if kind not in BACKENDS:
            raise ConfigError(f"unknown backend {kind!r}; expected one of {', '.join(BACKENDS)}")
        with self._lock:
            if kind not in self._backends:
                if kind == "bridge":
                    from tunelens.backends.bridge import BridgeBackend as cls
                else:
                    from tunelens.backends.nnsight import NNsightBackend as cls
                self._backends[kind] = cls(self.module, self.tokenizer, self.dims, adapter=self.adapter)
            return self._backends[kind]

    def encode(self, prompts: Sequence[str]) -> TokenBatch:
        """Right-padded tokens of ``prompts``; checks they are non-empty and fit the context."""
        return encode_prompts(self.tokenizer, prompts, max_len=self.dims.n_ctx)

    @torch.no_grad()
    def logits(self, batch: TokenBatch) -> torch.Tensor:
        """Plain HF forward (no backend): the reference the backends are checked against."""
        batch = batch.to(self.device)
        with self.active() as m:
            return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 16) -> str:
        """Greedy continuation of ``prompt`` (plain HF)."""
        batch = self.encode([prompt]).to(self.device)
        with self.active() as m:
            out = m.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True)


def runtime_dims(config: Any) -> ModelDims:
    """The sizes of a model tunelens can run, or a :class:`ModelLoadError` naming the known families and
    where to add one."""
    text = getattr(config, "text_config", None) or config  # Gemma-3's multimodal wrapper: its text model
    family_of_config(text)
    return ModelDims.from_hf_config(config)
