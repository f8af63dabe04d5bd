"""Hook hygiene (issue 9): after every public call that runs a model, including calls that raised in the
middle of a forward pass, no hook and no nnsight intervention is left on either model of the pair.

Each case runs once normally and, where it can fail mid-forward, once with an error raised from inside
the forward pass. The count is taken on the HF module of both models (a switch-mode LoRA pair shares
one module, so both roles are checked through it as well).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tunelens.backends.base import add, edit
from tunelens.backends.hooks import count_hooks
from tunelens.cache import CacheConfig, capture
from tunelens.models.pair import ModelPair
from tunelens.sites import Site
from tunelens.tasks.entity_tracking import EntityTrackingConfig, counterfactuals, generate


class Boom(RuntimeError):
    """Raised from inside a forward pass."""


def _boom(_: torch.Tensor) -> torch.Tensor:
    raise Boom("raised mid-forward")


@dataclass(frozen=True)
class Call:
    id: str
    run: Callable[[ModelPair, dict], object]
    raises: type[BaseException] | None = None


def _data(pair: ModelPair) -> dict:
    ds = generate(EntityTrackingConfig(n_boxes=2, n_contexts=3), seed=0)
    cf = counterfactuals(ds, "query", seed=1)
    return {"clean": ds.encode(pair.tokenizer), "corrupt": cf.encode(pair.tokenizer)}


def _run(kind: str, fail: bool):
    def go(pair: ModelPair, d: dict):
        write = edit(Site("resid_post", 0), _boom) if fail else add(Site("resid_post", 0), torch.tensor(0.5))
        for _, model in pair:
            model.backend(kind).run(
                d["clean"].tokens, reads=[Site("z", 1), Site("pattern", 0)], writes=[write]
            )

    return go


def _capture(pair: ModelPair, d: dict):
    cfg = CacheConfig(sites=(Site("resid_post", 1), Site("z", 0)), positions="last")
    for _, model in pair:
        capture(model, d["clean"], cfg)


def _patching(pair: ModelPair, d: dict):
    from circuits.patching.sweeps import SweepConfig, activation_patching

    cfg = SweepConfig(kind="resid_pre", by="layer_pos", positions=("last",))
    activation_patching(pair.tuned, d["clean"], d["corrupt"], cfg)


def _cmap(pair: ModelPair, d: dict):
    from circuits.patching.cmap import cmap_sweep

    cmap_sweep(pair, d["clean"])


def _attribution(pair: ModelPair, d: dict):
    from circuits.patching.attribution import target_gradients
    from circuits.patching.engine import trace
    from circuits.patching.metrics import Answers

    run = trace(pair.tuned, d["corrupt"].tokens)
    target_gradients(run, Answers.from_encoded(d["clean"]), ("z", "resid_pre"))


def _generate(fail: bool):
    def go(pair: ModelPair, d: dict):
        from tunelens.generation import generate_with_edit

        fn = _boom if fail else (lambda h: h + 0.1)
        generate_with_edit(pair.tuned, "Box F contains the", Site("resid_post", 1), fn, 3)

    return go


def _live(pair: ModelPair, d: dict):
    from circuits.patching.live import live_sweep

    prompt = "The apple is in Box F . The cup is in Box Q . Box F contains the"
    live_sweep(pair.tuned, prompt, prompt.replace("Box F contains", "Box Q contains"), top_k=3)


CALLS = [
    Call("bridge-run", _run("bridge", False)),
    Call("bridge-run-raises", _run("bridge", True), Boom),
    Call("nnsight-run", _run("nnsight", False)),
    Call("nnsight-run-raises", _run("nnsight", True), Exception),
    Call("capture", _capture),
    Call("activation-patching", _patching),
    Call("cmap-sweep", _cmap),
    Call("attribution", _attribution),
    Call("live-sweep", _live),
    Call("generate-with-edit", _generate(False)),
    Call("generate-with-edit-raises", _generate(True), Boom),
]


@pytest.fixture(params=["full", "lora"])
def any_pair(request) -> ModelPair:
    return request.getfixturevalue("tiny_pair" if request.param == "full" else "tiny_lora_pair")


def _hooks(pair: ModelPair) -> dict[str, int]:
    """Hooks on each model's HF module and inside both backends of each model (the bridge wraps a copy)."""
    counts = {}
    for role, model in pair:
        counts[role] = count_hooks(model.module)
        for kind in ("bridge", "nnsight"):
            counts[f"{role}/{kind}"] = model.backend(kind).attached_hooks()
    return counts


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.id)
def test_no_hook_survives_a_public_call(call: Call, any_pair: ModelPair):
    d = _data(any_pair)
    before = _hooks(any_pair)
    if call.raises is None:
        call.run(any_pair, d)
    else:
        with pytest.raises(call.raises):
            call.run(any_pair, d)
    assert _hooks(any_pair) == before
    assert all(n == 0 for n in before.values()), f"hooks before the call: {before}"
