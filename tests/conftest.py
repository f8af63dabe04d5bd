"""Shared fixtures: tiny models of the real architecture, built in memory in well under a second."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

from tunelens.models.loaded import LoadedModel, ModelSource
from tunelens.models.pair import ModelPair
from tunelens.models.tiny import TinyConfig, tiny_family, tiny_gemma, tiny_llama, tiny_tokenizer

ET_PROMPTS = [
    "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box Q contains the",
    "The pen is in Box C. Box C contains the",
    "The key is in Box D. The hat is in Box E. Box E contains the",
]


def bpe_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained in memory on ``texts`` (real subword behaviour, in ~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(autouse=True, scope="session")
def _data_home(tmp_path_factory):
    """Every test session builds its zoo in a fresh folder, never in the user's.

    ``TUNELENS_TEST_HOME=DIR`` keeps a zoo between local runs (the SmolLM2 builds take minutes).
    """
    home = os.environ.get("TUNELENS_TEST_HOME") or tmp_path_factory.mktemp("tunelens-home")
    old = os.environ.get("TUNELENS_HOME")
    os.environ["TUNELENS_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TUNELENS_HOME", None)
    else:
        os.environ["TUNELENS_HOME"] = old


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


def make_tiny(tok, seed: int = 0, cfg: TinyConfig | None = None, name: str = "tiny-random") -> LoadedModel:
    model = tiny_llama(cfg or TinyConfig(n_layers=2), len(tok.get_vocab()), seed=seed)
    return LoadedModel(model, tok, source=ModelSource(kind="memory", location=name), name=name)


@pytest.fixture(scope="session")
def tiny_model(tiny_tok) -> LoadedModel:
    return make_tiny(tiny_tok)


@pytest.fixture(scope="session")
def tiny_gemma_model(tiny_tok) -> LoadedModel:
    model = tiny_gemma(TinyConfig(n_layers=2), len(tiny_tok.get_vocab()), seed=0)
    return LoadedModel(
        model, tiny_tok, source=ModelSource(kind="memory", location="tiny-gemma"), name="tiny-gemma"
    )


OTHER_FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gpt2", "gpt_neox", "phi3", "olmo2")


@pytest.fixture(scope="session", params=["llama", "gemma", *OTHER_FAMILIES])
def arch_model(request, tiny_tok) -> LoadedModel:
    """A tiny model of each declared family: the Llama/SmolLM2 and Gemma-3 tiny models, and a random-init
    model of each other family built from its HF config (a sliding window of 4 where the family has one)."""
    if request.param == "llama":
        return request.getfixturevalue("tiny_model")
    if request.param == "gemma":
        return request.getfixturevalue("tiny_gemma_model")
    name = f"tiny-{request.param}"
    module = tiny_family(
        request.param, TinyConfig(n_layers=2), len(tiny_tok.get_vocab()), seed=0, sliding_window=4
    )
    return LoadedModel(module, tiny_tok, source=ModelSource(kind="memory", location=name), name=name)


@pytest.fixture(scope="session")
def tiny_pair(tiny_tok) -> ModelPair:
    """A base and a 'tuned' copy whose weights moved a little (a stand-in for a full fine-tune)."""
    base = make_tiny(tiny_tok, name="tiny-base")
    tuned_module = copy.deepcopy(base.module)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned_module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tuned = LoadedModel(
        tuned_module, tiny_tok, source=ModelSource(kind="memory", location="tiny-tuned"), name="tiny-tuned"
    )
    return ModelPair(base, tuned)


@pytest.fixture(scope="session")
def tiny_lora_pair(tiny_tok, tmp_path_factory) -> ModelPair:
    """A switch-mode LoRA pair: one set of base weights, adapter off for base and on for tuned."""
    from peft import LoraConfig, get_peft_model

    from tunelens.models.loading import load_adapter_pair

    base = make_tiny(tiny_tok, name="tiny-base")
    torch.manual_seed(3)
    peft_model = get_peft_model(
        copy.deepcopy(base.module),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return load_adapter_pair(base, folder, mode="switch")
