"""What the packages' doctests may use without defining it (the unit tier runs ``--doctest-modules``).

Examples that need a model run on tiny models of the zoo's ``tiny`` architecture (Llama, 4 layers,
d_model 64, 4 query heads in 2 KV groups, the tasks' word-level tokenizer of 89 words), built in memory
once per session in a fraction of a second, as ``tests/conftest.py`` builds its own. The zoo's trained
``tiny`` pair (``zoo.load_pair("tiny")``) costs minutes of CPU time to build on a fresh machine; and an
example shows what a call returns, not what a trained model knows. The weights here are random, so the
examples print shapes, keys, counts and comparisons with a wide margin: facts of any weights and of any
float summation order.

* ``pair``: a :class:`~tunelens.models.pair.ModelPair` named ``"tiny"`` of ``tiny-base`` and
  ``tiny-tuned``, whose matrices and norms moved by about a tenth of their size (embeddings frozen),
  like a full fine-tune;
* ``model``: ``pair.base``, a :class:`~tunelens.models.loaded.LoadedModel`;
* ``family``: a :class:`~tunelens.models.pair.ModelFamily` of ``tiny-base`` with the variants ``full``
  (``tiny-tuned``) and ``lora`` (``tiny-lora``: a merged rank-2 update of every linear matrix);
* ``dataset``: an entity-tracking :class:`~tunelens.tasks.base.Dataset` of 4 worlds of 3 boxes: 12
  prompts of 25 tokens.

Examples must leave these objects as they found them. Doctests run with ``TUNELENS_HOME`` in a temporary
folder, so no example writes to the user's data folder.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest


def _low_rank_copy(module, rank: int, scale: float, seed: int):
    """``module`` with every linear matrix moved by a random rank-``rank`` update (a merged LoRA)."""
    import torch

    from tunelens.weights import matrix_names, read_matrix, replace_matrix

    out = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    for name in matrix_names(out):
        w = read_matrix(out, name)
        b = torch.randn(w.shape[0], rank, generator=gen)
        a = torch.randn(rank, w.shape[1], generator=gen)
        replace_matrix(out, name, w + scale * (b @ a) / rank**0.5)
    return out


@pytest.fixture(scope="session")
def doctest_objects() -> dict:
    """The doctests' names (see the module doc), built once per session and shared by every doctest."""
    import torch

    from tunelens.models.loaded import LoadedModel, ModelSource
    from tunelens.models.pair import ModelFamily, ModelPair
    from tunelens.models.tiny import TinyConfig, tiny_llama, tiny_tokenizer
    from tunelens.tasks import entity_tracking as et

    tok = tiny_tokenizer()

    def loaded(module, name: str) -> LoadedModel:
        return LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)

    base = loaded(tiny_llama(TinyConfig(), len(tok.get_vocab()), seed=0), "tiny-base")
    tuned_module = copy.deepcopy(base.module)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a full fine-tune's update: about a tenth of each matrix, embeddings frozen
        for name, p in tuned_module.named_parameters():
            if "embed_tokens" not in name and "lm_head" not in name:
                p.add_(0.002 * torch.randn(p.shape, generator=gen))
    tuned = loaded(tuned_module, "tiny-tuned")
    lora = loaded(_low_rank_copy(base.module, rank=2, scale=0.005, seed=2), "tiny-lora")
    pair = ModelPair(base, tuned, name="tiny")
    return {
        "pair": pair,
        "model": base,
        "family": ModelFamily(base=base, variants={"full": tuned, "lora": lora}, name="tiny"),
        "dataset": et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=4), seed=0),
    }


@pytest.fixture(autouse=True)
def _doctest_setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """For a doctest only: offer :func:`doctest_objects`, point the data folder at a temporary one, and run
    on one thread (the examples' tensors are tiny: on a busy machine spinning OpenMP threads made them ten
    times slower; one thread is what the unit tier's second run uses anyway)."""
    if getattr(request.node, "dtest", None) is None:  # not a doctest: nothing to build
        yield
        return
    import torch

    request.getfixturevalue("doctest_namespace").update(request.getfixturevalue("doctest_objects"))
    home = tmp_path_factory.getbasetemp() / "doctest-home"
    home.mkdir(exist_ok=True)
    request.getfixturevalue("monkeypatch").setenv("TUNELENS_HOME", str(home))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
