"""Every bad input a user can give meets a specific TunelensError whose message names what was expected
and what arrived.

One table: each case has an id, a trigger (a function of :class:`Ctx`, which hands out the tiny fixtures
and a fresh temporary folder), the error class it must raise and a regex the message must match. Only
tiny in-memory models; nothing touches the network or SmolLM2.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import make_tiny
from tunelens.backends.base import add, replace
from tunelens.cache import CacheConfig, cache_to_store, capture
from tunelens.errors import (
    ConfigError,
    DeviceError,
    JobError,
    ModelLoadError,
    PairIncompatibleError,
    PromptError,
    ShapeError,
    SiteError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    TunelensError,
    ZooError,
)
from tunelens.faces import catalog
from tunelens.faces.cli import main
from tunelens.models import zoo
from tunelens.models.loaded import LoadedModel, ModelSource, check_device
from tunelens.models.loading import load_adapter_pair, load_gguf, load_hf_folder
from tunelens.models.pair import ModelPair
from tunelens.models.resolve import load_model
from tunelens.models.tiny import TinyConfig, tiny_vocab
from tunelens.paths import data_home
from tunelens.sites import Site, site
from tunelens.store import ActivationStore
from tunelens.tasks.entity_tracking import EntityTrackingConfig, generate

SITE = Site("resid_post", 1)
PROMPT = "The apple is in Box F . Box F contains the"


class Ctx:
    """What a trigger may use: the session's tiny fixtures (built on first use) and a fresh folder."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path, capsys: pytest.CaptureFixture[str]):
        self._request, self.tmp, self.capsys = request, tmp, capsys

    @property
    def tok(self):
        return self._request.getfixturevalue("tiny_tok")

    @property
    def model(self) -> LoadedModel:
        return self._request.getfixturevalue("tiny_model")

    @property
    def pair(self) -> ModelPair:
        return self._request.getfixturevalue("tiny_pair")

    @property
    def lora_pair(self) -> ModelPair:
        return self._request.getfixturevalue("tiny_lora_pair")


@dataclass(frozen=True)
class Case:
    id: str
    trigger: Callable[[Ctx], object]
    error: type[TunelensError]
    match: str | Callable[[Ctx], str]  # a regex, or a function of the context that makes one
    marks: tuple = ()


# --- helpers the triggers share ------------------------------------------------------------------------


def _folder(ctx: Ctx, name: str, files: dict[str, bytes]) -> Path:
    folder = ctx.tmp / name
    folder.mkdir()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    return folder


def _saved(ctx: Ctx, *, weights: bool = True, tokenizer: bool = True, name: str = "saved") -> Path:
    """The tiny model saved with ``save_pretrained`` (optionally without its weights or tokenizer)."""
    folder = ctx.tmp / name
    if weights:
        ctx.model.hf.save_pretrained(folder)
    else:
        ctx.model.hf.config.save_pretrained(folder)
    if tokenizer:
        ctx.tok.save_pretrained(folder)
    return folder


def _garbage_weights(ctx: Ctx) -> Path:
    folder = _saved(ctx, name="garbage-weights")
    (folder / "model.safetensors").write_bytes(os.urandom(500))
    return folder


def _unreadable_gguf(ctx: Ctx):
    gguf = ctx.tmp / "x.gguf"
    gguf.write_bytes(b"\x00garbage" + os.urandom(2000))
    converted = data_home() / "converted"
    try:
        load_gguf(gguf)
    finally:  # a failed conversion leaves nothing behind in the data folder
        assert not (converted.exists() and any(p.name.startswith("x-") for p in converted.iterdir()))


def _adapter(ctx: Ctx, model: LoadedModel, name: str) -> Path:
    """A LoRA adapter of ``model`` saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(model.module),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(ctx.tmp / name)
    return ctx.tmp / name


def _foreign_adapter(ctx: Ctx):
    """A LoRA adapter trained on a d_model-32 tiny, loaded onto the d_model-64 one."""
    cfg = TinyConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64)
    folder = _adapter(ctx, make_tiny(ctx.tok, cfg=cfg, name="tiny-32"), "adapter-32")
    return load_adapter_pair(ctx.model, folder)


def _damaged_adapter(ctx: Ctx, file: str, data: Callable[[bytes], bytes]):
    folder = _adapter(ctx, ctx.model, "damaged")
    (folder / file).write_bytes(data((folder / file).read_bytes()))
    return load_adapter_pair(ctx.model, folder)


def _with_tokenizer(ctx: Ctx, tok, name: str) -> LoadedModel:
    module = copy.deepcopy(ctx.model.module)
    return LoadedModel(module, tok, source=ModelSource(kind="memory", location=name), name=name)


def _extra_token(ctx: Ctx):
    tok = copy.deepcopy(ctx.tok)
    tok.add_tokens(["zebra"])
    return ModelPair(ctx.model, _with_tokenizer(ctx, tok, "extra-token"))


def _swapped_ids(ctx: Ctx):
    vocab = {w: i for i, w in enumerate(tiny_vocab())}
    vocab["apple"], vocab["bag"] = vocab["bag"], vocab["apple"]
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    return ModelPair(ctx.model, _with_tokenizer(ctx, tok, "swapped"))


def _run(ctx: Ctx, kind: str, **kw):
    """A backend run on one prompt; whatever it raises, no hook may stay attached."""
    backend = ctx.model.backend(kind)  # type: ignore[arg-type]
    try:
        return backend.run(ctx.model.encode([PROMPT]), **kw)
    finally:
        assert backend.attached_hooks() == 0


def _long_prompt() -> str:
    words = [w for w in tiny_vocab() if not w.startswith("<")]
    return " ".join(words[i % len(words)] for i in range(300))


def _dataset():
    return generate(EntityTrackingConfig(n_boxes=2, n_contexts=4), seed=0)


def _store(ctx: Ctx) -> Path:
    """A complete two-shard store of ``tiny_pair``'s activations."""
    folder = ctx.tmp / "store"
    cache_to_store(ctx.pair, _dataset(), CacheConfig(sites=(SITE,)), folder, shard_size=4)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _store_of_other_models(ctx: Ctx):
    folder = _store(ctx)
    before = _snapshot(folder)
    try:
        cache_to_store(ctx.lora_pair, _dataset(), CacheConfig(sites=(SITE,)), folder, shard_size=4)
    finally:
        assert _snapshot(folder) == before, "a refused store must be left byte for byte as it was"


def _hashes_pattern(ctx: Ctx) -> str:
    ours, theirs = ctx.pair.hashes(), ctx.lora_pair.hashes()
    role = next(r for r in ("base", "tuned") if ours[r] != theirs[r])
    return rf"made from {role} model '{ours[role]}' but you asked for '{theirs[role]}'"


def _truncated_shard(ctx: Ctx):
    folder = _store(ctx) / "base"
    shard = ActivationStore.open(folder).shard_path(1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return ActivationStore.open(folder).read()


def _unknown_position(ctx: Ctx):
    cfg = CacheConfig(sites=(SITE,), positions="nowhere")
    return capture(ctx.model, _dataset().encode(ctx.tok), cfg)


def _cli(ctx: Ctx, *argv: str):
    """The CLI prints one error line and exits 2; with ``--debug`` the same call raises the library error."""
    ctx.capsys.readouterr()
    code = main(list(argv))
    err = ctx.capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelens: error: "), err
    main(["--debug", *argv])


def _cli_cache(ctx: Ctx, sites: str):
    saved = str(_saved(ctx))
    out = str(ctx.tmp / "out")
    _cli(ctx, "cache", saved, "--tuned", saved, "--task", "entity_tracking", "--sites", sites, "--out", out)


# --- the analyses, job files and results folders -----------------------------------------------------

EXAMPLE_JOB = Path(__file__).resolve().parents[2] / "examples" / "tiny-probe-job.yaml"


def _job(ctx: Ctx, change: dict, name: str = "job.yaml") -> Path:
    import yaml

    spec = yaml.safe_load(EXAMPLE_JOB.read_text())
    spec.update(change)
    path = ctx.tmp / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _load_job(ctx: Ctx, change: dict):
    from tunelens.faces.jobs import JobSpec

    return JobSpec.from_file(_job(ctx, change))


def _job_text(ctx: Ctx, text: str):
    from tunelens.faces.jobs import JobSpec

    (ctx.tmp / "list.yaml").write_text(text)
    return JobSpec.from_file(ctx.tmp / "list.yaml")


def _probe_acts(n: int = 120, d: int = 4, layers: int = 2):
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(layers, n, d, generator=gen)
    return {"base": acts, "tuned": acts.clone()}


def _fit(acts, labels, n: int = 120):
    from probes import ProbeConfig, fit_probes

    return fit_probes(acts, labels, [f"item{i}" for i in range(n)], ProbeConfig(min_test_items=10))


def _nan_acts():
    acts = _probe_acts()
    acts["tuned"][1, 7, 2] = float("nan")
    return acts


def _knob_direction(ctx: Ctx, width: int):
    from tunelens.directions import Direction

    return Direction(site=Site("resid_post", 1), vector=torch.ones(width))


def _steer(ctx: Ctx, width: int, c: float):
    from circuits.knob.steering import steer

    return steer(ctx.model, _knob_direction(ctx, width), "Box F contains the", c, max_new_tokens=2)


def _live(ctx: Ctx, prompt: str, counterfactual: str):
    from circuits.patching.live import live_sweep

    return live_sweep(ctx.model, prompt, counterfactual, top_k=2)


def _app_results_of_other_pair(ctx: Ctx):
    """A results folder of the tiny pair, checked against the LoRA pair the app has loaded."""
    from tunelens.faces import catalog
    from tunelens.faces.atlas import AtlasConfig, compute_atlas

    compute_atlas(ctx.pair, AtlasConfig(layer=0, k=2)).save(ctx.tmp / "results" / "atlas")
    return catalog.check_pair(catalog.scan(ctx.tmp / "results"), ctx.lora_pair.hashes(), "the loaded one")


def _app_not_a_model(ctx: Ctx):
    from tunelens.models.resolve import load_pair

    folder = _folder(ctx, "notes", {"notes.txt": b"not a model"})
    return load_pair(str(folder), str(folder))


def _app(name: str):
    """A function of the app's input checks (app/live.py: no Streamlit needed to call it)."""
    import app.live

    return getattr(app.live, name)


def _family_folder(ctx, family: str) -> Path:
    """A tiny random-init model of a declared family, saved as an HF folder with the tiny tokenizer."""
    from tunelens.models.tiny import tiny_family

    folder = ctx.tmp / f"family-{family}"
    if not folder.exists():
        tiny_family(family, vocab_size=len(ctx.tok.get_vocab())).save_pretrained(folder)
        ctx.tok.save_pretrained(folder)
    return folder


def _config_of_another_family(ctx) -> Path:
    """A folder whose config.json says Llama while its weights are GPT-2's."""
    import shutil

    from tunelens.models.tiny import tiny_family

    folder = ctx.tmp / "llama-config-gpt2-weights"
    if not folder.exists():
        shutil.copytree(_family_folder(ctx, "gpt2"), folder)
        tiny_family("llama", vocab_size=len(ctx.tok.get_vocab())).config.save_pretrained(folder)
    return folder


def _runtime_dims_of(model_type: str):
    from transformers import AutoConfig

    from tunelens.models.loaded import runtime_dims

    return runtime_dims(AutoConfig.for_model(model_type))


def _intruders(**kw):
    from spectral.intruders import IntruderConfig

    return IntruderConfig(**kw)


NO_CUDA = (pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),)

# --- the table -----------------------------------------------------------------------------------------

CASES = [
    # 1. missing model paths
    Case(
        "load_model-missing-path",
        lambda ctx: load_model("/nonexistent"),
        ModelLoadError,
        r"'/nonexistent' is neither a zoo model \(tiny, .*\) nor an existing folder or \.gguf file",
    ),
    Case(
        "load_hf_folder-missing-path",
        lambda ctx: load_hf_folder("/nonexistent"),
        ModelLoadError,
        r"model folder '/nonexistent' does not exist; expected an existing folder",
    ),
    Case(
        "load_gguf-missing-file",
        lambda ctx: load_gguf("/nonexistent/x.gguf"),
        ModelLoadError,
        r"GGUF file '/nonexistent/x\.gguf' does not exist; expected a path to a \.gguf file",
    ),
    # 2. folders that are not models
    Case(
        "empty-folder",
        lambda ctx: load_hf_folder(_folder(ctx, "empty", {})),
        ModelLoadError,
        r"'.*/empty' is not a model folder: expected a config\.json .*found \[\]",
    ),
    Case(
        "config-of-another-family",
        lambda ctx: load_model(_config_of_another_family(ctx)),
        ModelLoadError,
        r"the weights in '.*llama-config-gpt2-weights' do not fit its config\.json: \d+ weights the config's "
        r"LlamaForCausalLM needs are not in the checkpoint .*it holds \d+ it does not use",
    ),
    Case(
        "pair-of-two-families",
        lambda ctx: ModelPair(
            load_model(_family_folder(ctx, "gpt2")), load_model(_family_folder(ctx, "llama"))
        ),
        PairIncompatibleError,
        r"architecture differs: base '.*family-gpt2' has GPT2LMHeadModel, tuned '.*family-llama' has "
        r"LlamaForCausalLM; a pair needs two models of the same architecture and sizes",
    ),
    Case(
        "model-unknown-family",
        lambda ctx: _runtime_dims_of("t5"),
        ModelLoadError,
        r"unsupported model family 't5' \(architectures: none\); tunelens knows llama, mistral, .*, olmo2: a "
        r"decoder-only family is added by a small declaration in tunelens/families/",
    ),
    Case(
        "folder-of-random-files",
        lambda ctx: load_model(_folder(ctx, "random", {"notes.txt": b"hi", "data.bin": os.urandom(64)})),
        ModelLoadError,
        r"'.*/random' is not a model folder: expected a config\.json .*found \['data\.bin', 'notes\.txt'\]",
    ),
    Case(
        "folder-without-weights",
        lambda ctx: load_hf_folder(_saved(ctx, weights=False)),
        ModelLoadError,
        r"could not load the model in '.*/saved': expected a config\.json and readable weights "
        r"\(model\.safetensors\).*found \['config\.json', .*'tokenizer\.json'",
    ),
    Case(
        "folder-without-tokenizer",
        lambda ctx: load_hf_folder(_saved(ctx, tokenizer=False)),
        ModelLoadError,
        r"could not load the tokenizer in '.*/saved': expected tokenizer files .*"
        r"found \['config\.json', .*'model\.safetensors'\]",
    ),
    Case(
        "folder-with-garbage-weights",
        lambda ctx: load_hf_folder(_garbage_weights(ctx)),
        ModelLoadError,
        r"could not load the model in '.*/garbage-weights': expected a config\.json and readable weights",
    ),
    # 3. an unreadable GGUF file
    Case(
        "unreadable-gguf",
        _unreadable_gguf,
        ModelLoadError,
        r"could not read GGUF file '.*/x\.gguf': expected the magic bytes b'GGUF' at its start, "
        r"found b'\\x00gar'",
    ),
    # 4. an adapter made for another base
    Case(
        "adapter-for-another-base",
        _foreign_adapter,
        PairIncompatibleError,
        r"adapter '.*/adapter-32' does not fit base model 'tiny-random' \(d_model 64\): "
        r"\S+lora_A\S+ has shape \[4, 32\] in the adapter, but the base model expects \[4, 64\]",
    ),
    Case(
        "adapter-folder-without-config",
        lambda ctx: load_adapter_pair(ctx.model, _folder(ctx, "not-adapter", {"a.bin": b"x"})),
        ModelLoadError,
        r"'.*/not-adapter' is not a peft adapter folder: no adapter_config\.json",
    ),
    Case(
        "adapter-with-truncated-weights",
        lambda ctx: _damaged_adapter(ctx, "adapter_model.safetensors", lambda b: b[: len(b) // 2]),
        ModelLoadError,
        r"could not read the adapter weights in '.*/damaged': expected a readable "
        r"adapter_model\.safetensors .*found \[.*'adapter_model\.safetensors'\]",
    ),
    Case(
        "adapter-with-malformed-config",
        lambda ctx: _damaged_adapter(ctx, "adapter_config.json", lambda b: b"{oops"),
        ModelLoadError,
        r"'.*/damaged/adapter_config\.json' cannot be read: expected the JSON peft writes",
    ),
    # 5. pairs of incomparable models
    Case(
        "tokenizer-with-extra-token",
        _extra_token,
        PairIncompatibleError,
        r"tokenizers differ: token 'zebra' is only in the tuned tokenizer \(\d+ vs \d+ tokens\)",
    ),
    Case(
        "tokenizer-with-other-ids",
        _swapped_ids,
        PairIncompatibleError,
        r"tokenizers differ: token 'apple' has id \d+ in base but \d+ in tuned",
    ),
    Case(
        "models-of-different-depth",
        lambda ctx: ModelPair(ctx.model, make_tiny(ctx.tok, cfg=TinyConfig(n_layers=3), name="three")),
        PairIncompatibleError,
        r"n_layers differs: base 'tiny-random' has 2, tuned 'three' has 3",
    ),
    Case(
        "models-of-different-width",
        lambda ctx: ModelPair(
            ctx.model, make_tiny(ctx.tok, cfg=TinyConfig(n_layers=2, d_model=32), name="narrow")
        ),
        PairIncompatibleError,
        r"d_model differs: base 'tiny-random' has 64, tuned 'narrow' has 32",
    ),
    # 6. sites out of range
    Case(
        "site-layer-out-of-range",
        lambda ctx: site(ctx.model.dims, "resid_post", 99),
        SiteError,
        r"site resid_post\.99: layer 99 out of range; this model has layers 0\.\.1",
    ),
    Case(
        "site-head-out-of-range",
        lambda ctx: site(ctx.model.dims, "z", 0, head=9),
        SiteError,
        r"site z\.0\.9: head 9 out of range; this model has heads 0\.\.3",
    ),
    Case(
        "site-kv-head-out-of-range",
        lambda ctx: site(ctx.model.dims, "k", 0, head=2),
        SiteError,
        r"site k\.0\.2: kv_head 2 out of range; this model has kv_heads 0\.\.1",
    ),
    Case(
        "site-unknown-kind",
        lambda ctx: site(ctx.model.dims, "resid_psot", 0),
        SiteError,
        r"unknown site kind 'resid_psot'; expected one of resid_pre, resid_mid, resid_post",
    ),
    Case(
        "bridge-read-layer-out-of-range",
        lambda ctx: _run(ctx, "bridge", reads=[Site("z", 99)]),
        SiteError,
        r"site z\.99: layer 99 out of range; this model has layers 0\.\.1",
    ),
    Case(
        "nnsight-read-kv-head-out-of-range",
        lambda ctx: _run(ctx, "nnsight", reads=[Site("v", 0, head=5)]),
        SiteError,
        r"site v\.0\.5: kv_head 5 out of range; this model has kv_heads 0\.\.1",
    ),
    Case(
        "bridge-write-head-out-of-range",
        lambda ctx: _run(ctx, "bridge", writes=[add(Site("z", 1, head=4), torch.ones(16))]),
        SiteError,
        r"site z\.1\.4: head 4 out of range; this model has heads 0\.\.3",
    ),
    # 7. empty prompts
    Case(
        "empty-prompt-list",
        lambda ctx: ctx.model.encode([]),
        PromptError,
        r"expected at least one prompt, got an empty list",
    ),
    Case(
        "empty-prompt",
        lambda ctx: ctx.model.encode([""]),
        PromptError,
        r"prompt 0 is empty; expected non-empty text, got ''",
    ),
    Case(
        "blank-prompt-among-others",
        lambda ctx: ctx.model.encode([PROMPT, "   "]),
        PromptError,
        r"prompt 1 is empty; expected non-empty text, got '   '",
    ),
    # 8. a prompt longer than the context
    Case(
        "prompt-longer-than-context",
        lambda ctx: ctx.model.encode([_long_prompt()]),
        PromptError,
        r"prompt 0 has 300 tokens; this model's context is 128 tokens",
    ),
    # 9. devices this machine lacks
    Case(
        "check_device-cuda",
        lambda ctx: check_device("cuda"),
        DeviceError,
        r"device 'cuda' was asked for, but this machine has no CUDA GPU; use 'cpu'",
        marks=NO_CUDA,
    ),
    Case(
        "load_hf_folder-on-cuda",
        lambda ctx: load_hf_folder(_saved(ctx), device="cuda"),
        DeviceError,
        r"device 'cuda' was asked for, but this machine has no CUDA GPU; use 'cpu'",
        marks=NO_CUDA,
    ),
    Case(
        "unknown-device",
        lambda ctx: check_device("gpu"),
        DeviceError,
        r"unknown device 'gpu'; expected 'cpu' or 'cuda\[:N\]'",
    ),
    # 10-11. stores
    Case("store-of-other-models", _store_of_other_models, StoreMismatchError, _hashes_pattern),
    Case(
        "truncated-shard",
        _truncated_shard,
        StoreCorruptError,
        r"shard file .*/store/base/shard-00001\.safetensors has \d+ bytes, the manifest says \d+",
    ),
    Case(
        "not-a-store",
        lambda ctx: ActivationStore.open(_folder(ctx, "plain", {"a.txt": b"x"})),
        StoreCorruptError,
        r"no activation store at .*/plain: .*manifest\.json is missing",
    ),
    # 12. write values, names and configs
    Case(
        "replace-with-wrong-width",
        lambda ctx: _run(ctx, "bridge", writes=[replace(Site("resid_post", 0), torch.zeros(63))]),
        ShapeError,
        r"replace at site resid_post\.0: value of shape \(63,\) does not fit the selected activation "
        r"of shape \(1, \d+, 64\)",
    ),
    Case(
        "add-nan",
        lambda ctx: _run(ctx, "nnsight", writes=[add(Site("resid_pre", 1), torch.full((64,), torch.nan))]),
        ShapeError,
        r"value of the add write at site resid_pre\.1 contains 64 non-finite values \(NaN or Inf\); "
        r"expected finite numbers",
    ),
    Case(
        "write-position-outside-prompt",
        lambda ctx: _run(
            ctx, "bridge", writes=[replace(Site("resid_post", 0), torch.zeros(64), positions=50)]
        ),
        ShapeError,
        r"position 50 outside the prompt \(0\.\.\d+\) at site resid_post\.0",
    ),
    Case(
        "unknown-backend",
        lambda ctx: ctx.model.backend("foo"),  # type: ignore[arg-type]
        ConfigError,
        r"unknown backend 'foo'; expected one of bridge, nnsight",
    ),
    Case(
        "unknown-zoo-model",
        lambda ctx: zoo.load("tiny-nope"),
        ZooError,
        r"unknown zoo model 'tiny-nope'; the zoo has tiny, tiny-full, tiny-lora, smollm2",
    ),
    Case(
        "unknown-zoo-pair",
        lambda ctx: zoo.load_pair("tiny-nope"),
        ZooError,
        r"unknown zoo pair 'tiny-nope'; pairs: tiny, tiny-lora",
    ),
    Case(
        "cache-config-without-sites",
        lambda ctx: CacheConfig(sites=()),
        ConfigError,
        r"CacheConfig\.sites is empty; expected at least one site",
    ),
    Case(
        "cache-config-bad-dtype",
        lambda ctx: CacheConfig(sites=(SITE,), dtype="int8"),
        ConfigError,
        r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'",
    ),
    Case(
        "cache-position-the-task-lacks",
        _unknown_position,
        ConfigError,
        r"position 'nowhere' is not defined by this task; it has \[.*'last'.*'query_label'.*\] or 'all'",
    ),
    # 13. the CLI: one line on stderr, exit status 2
    Case(
        "cli-unknown-pair",
        lambda ctx: _cli(ctx, "info", "no-such-pair"),
        ModelLoadError,
        r"'no-such-pair' is not a zoo pair \(tiny, tiny-lora, .*\)",
    ),
    Case(
        "cli-site-layer-out-of-range",
        lambda ctx: _cli_cache(ctx, "resid_post.99"),
        SiteError,
        r"site resid_post\.99: layer 99 out of range; this model has layers 0\.\.1",
    ),
    Case(
        "cli-unparsable-site",
        lambda ctx: _cli_cache(ctx, "z.one"),
        SiteError,
        r"cannot parse site 'z\.one'; expected 'kind\.layer' or 'kind\.layer\.head'",
    ),
    # 14. job files (validated before anything runs; paths stay inside the output folder)
    Case(
        "job-unknown-key",
        lambda ctx: _load_job(ctx, {"colour": "red"}),
        JobError,
        r"job\.yaml: unknown key 'colour'",
    ),
    Case(
        "job-bad-task-size",
        lambda ctx: _load_job(ctx, {"task": {"name": "entity_tracking", "n": 0}}),
        JobError,
        r"task\.n.*integer >= 1",
    ),
    Case(
        "job-path-escapes-output",
        lambda ctx: _load_job(ctx, {"results": "../../elsewhere"}),
        JobError,
        r"results: expected a (relative path|path without)",
    ),
    Case(
        "job-yaml-not-a-mapping", lambda ctx: _job_text(ctx, "- a\n- list\n"), JobError, r"expected a mapping"
    ),
    Case(
        "cli-jobs-run-bad-executor",
        lambda ctx: _cli(ctx, "jobs", "run", str(_job(ctx, {"executor": {"kind": "slurm"}}))),
        JobError,
        r"executor\.kind.*'slurm'",
    ),
    # 15. probes
    Case(
        "probe-labels-wrong-length",
        lambda ctx: _fit(_probe_acts(), torch.zeros(119, dtype=torch.long)),
        ShapeError,
        r"119.*120|120.*119",
    ),
    Case(
        "probe-single-class",
        lambda ctx: _fit(_probe_acts(), torch.zeros(120, dtype=torch.long)),
        ConfigError,
        r"(one|single) class|2 classes|two classes",
    ),
    Case(
        "probe-nan-activations",
        lambda ctx: _fit(_nan_acts(), torch.arange(120) % 2),
        ShapeError,
        r"(?i)nan",
    ),
    # 16. circuits and the knob
    Case(
        "live-sweep-lengths-differ",
        lambda ctx: _live(ctx, "Box F contains the", "Box F contains"),
        PromptError,
        r"tokens but the counterfactual has",
    ),
    Case("live-sweep-empty-prompt", lambda ctx: _live(ctx, "", "Box F"), PromptError, r"(?i)empty"),
    Case(
        "steer-direction-wrong-width",
        lambda ctx: _steer(ctx, 7, 1.0),
        ShapeError,
        r"width 7",
    ),
    Case(
        "steer-c-not-finite",
        lambda ctx: _steer(ctx, 64, float("inf")),
        ConfigError,
        r"c must be finite, got inf",
    ),
    # 17. weight space
    Case(
        "intruders-epsilon-out-of-range", lambda ctx: _intruders(epsilon=1.5), ConfigError, r"(?i)epsilon|ε"
    ),
    Case("intruders-k-not-positive", lambda ctx: _intruders(k=0), ConfigError, r"\bk\b"),
    # 18. results folders
    Case(
        "results-folder-missing",
        lambda ctx: __import__("tunelens.results").results.load_result(ctx.tmp / "none"),
        StoreError,
        r"is not a tunelens result folder \(no result\.json\)",
    ),
    # 19. the app (what the pages check before running anything; the page shows the message and goes on)
    Case(
        "app-results-folder-missing",
        lambda ctx: catalog.scan(ctx.tmp / "nowhere"),
        StoreError,
        r"results folder '.*nowhere' does not exist; expected a folder written by `tunelens demo",
    ),
    Case(
        "app-results-folder-is-a-file",
        lambda ctx: catalog.scan(_folder(ctx, "r", {"x.txt": b"x"}) / "x.txt"),
        StoreError,
        r"results folder '.*x\.txt' is a file; expected a folder",
    ),
    Case(
        "app-results-of-another-pair",
        _app_results_of_other_pair,
        PairIncompatibleError,
        r"results of another pair than the loaded one: atlas was computed on pair .* not on the loaded pair "
        r".*; expected results computed on base [0-9a-f]+ and tuned [0-9a-f]+",
    ),
    Case(
        "app-prompt-empty",
        lambda ctx: _app("encode_live")(ctx.pair, "   "),
        PromptError,
        r"the prompt is empty \(got '   '\); expected some text",
    ),
    Case(
        "app-prompt-too-long",
        lambda ctx: _app("encode_live")(ctx.pair, "Box " * 300),
        PromptError,
        r"the prompt has 300 tokens; live analyses take at most 128 tokens \(this model's context is 128",
    ),
    Case(
        "app-counterfactual-other-length",
        lambda ctx: _app("encode_with_counterfactual")(ctx.pair, PROMPT, "Box F contains the"),
        PromptError,
        r"the counterfactual has \d+ tokens but the prompt has \d+; .* need the same token length",
    ),
    Case(
        "app-pair-reference-missing",
        lambda ctx: _app("pair_refs")("smollm2", "  "),
        ConfigError,
        r"expected both a base and a tuned model reference .* got base 'smollm2' and tuned ''",
    ),
    Case(
        "app-pair-folder-not-a-model",
        _app_not_a_model,
        ModelLoadError,
        r"'.*notes' is not a model folder: expected a config\.json .*found \['notes\.txt'\]",
    ),
]


@pytest.fixture
def ctx(request, tmp_path, capsys) -> Ctx:
    return Ctx(request, tmp_path, capsys)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


SEEN: dict[str, str] = {}  # case id -> the message it produced, for the catalogue in docs/


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_raises_a_clear_error(case: Case, ctx: Ctx):
    with pytest.raises(case.error) as info:
        case.trigger(ctx)
    message = str(info.value)
    pattern = case.match(ctx) if callable(case.match) else case.match
    assert re.search(pattern, message), f"message {message!r} does not match {pattern!r}"
    assert "\n" not in message, f"an error message is one line (the CLI prints it as one): {message!r}"
    SEEN[case.id] = re.sub(re.escape(str(ctx.tmp)), "TMP", message)


def _catalogue_rows() -> list[tuple[str, str, str]]:
    lines = CATALOGUE.read_text().splitlines() if CATALOGUE.exists() else []
    rows = [line.split(" | ") for line in lines if line.startswith("| `")]
    return [(r[0].strip("| `"), r[1].strip("` "), r[2].strip(" |")) for r in rows]


def test_catalogue_in_the_docs_is_current():
    """docs/bad-inputs.md lists every case with its error class and the message a user sees.

    Regenerate it with ``TUNELENS_WRITE_CATALOGUE=1 pytest tests/unit/test_bad_inputs.py``.
    """
    if os.environ.get("TUNELENS_WRITE_CATALOGUE") == "1":
        missing = [c.id for c in CASES if c.id not in SEEN]
        assert not missing, f"run the whole file to write the catalogue; not run: {missing}"
        head = CATALOGUE_HEAD.format(n=len(CASES))
        body = "".join(
            f"| `{c.id}` | `{c.error.__name__}` | {SEEN[c.id].replace('|', '/')} |\n" for c in CASES
        )
        CATALOGUE.write_text(head + body)
    rows = _catalogue_rows()
    assert [(r[0], r[1]) for r in rows] == [(c.id, c.error.__name__) for c in CASES], (
        "docs/bad-inputs.md is out of date: TUNELENS_WRITE_CATALOGUE=1 pytest tests/unit/test_bad_inputs.py"
    )


CATALOGUE = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
CATALOGUE_HEAD = """# Bad inputs and what tunelens says

Every row is a case of the parametrised test `tests/unit/test_bad_inputs.py` ({n} cases): the input, the
`TunelensError` subclass it raises, and the one-line message the user sees (in the CLI: on stderr, exit
status 2, no traceback). Generated from the test; regenerate with
`TUNELENS_WRITE_CATALOGUE=1 .venv/bin/python -m pytest tests/unit/test_bad_inputs.py`.

| case | error | message |
|---|---|---|
"""
