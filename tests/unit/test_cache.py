import pytest
import torch

from tunelens.cache import CacheConfig, cache_to_store, capture, capture_pair
from tunelens.errors import StoreMismatchError
from tunelens.sites import Site
from tunelens.store import ActivationStore
from tunelens.tasks import entity_tracking as et

SITES = (Site("resid_post", 0), Site("z", 1), Site("k", 0, head=1), Site("pattern", 1))


@pytest.fixture(scope="module")
def ds():
    return et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=5), seed=0)


def test_capture_equals_single_prompt_runs_at_each_position(tiny_model, ds):
    """Batching and padding change nothing: compare with one unpadded run per prompt."""
    enc = ds.encode(tiny_model.tokenizer)
    acts = capture(tiny_model, enc, CacheConfig(sites=SITES, positions="query_label", batch_size=4))
    backend = tiny_model.backend("bridge")
    for i in range(len(ds)):
        one = tiny_model.encode([ds.examples[i].prompt])
        full = backend.run(one, reads=list(SITES)).acts
        p = int(enc.positions["query_label"][i])
        for s in SITES:
            want = full[s][0, :, p] if s.kind == "pattern" else full[s][0, p]
            got = acts[s][i]
            if s.kind == "pattern":
                got = got[..., : want.shape[-1]]
            assert torch.allclose(got, want, atol=1e-5), (s, i)


def test_all_positions_are_padded_to_the_longest_prompt(tiny_model, ds):
    enc = ds.encode(tiny_model.tokenizer)
    acts = capture(tiny_model, enc, CacheConfig(sites=(Site("resid_pre", 1),), positions="all", batch_size=2))
    assert acts[Site("resid_pre", 1)].shape == (
        len(ds),
        enc.tokens.input_ids.shape[1],
        tiny_model.dims.d_model,
    )


def test_both_backends_cache_the_same(tiny_model, ds):
    enc = ds.encode(tiny_model.tokenizer)
    a = capture(tiny_model, enc, CacheConfig(sites=SITES[:3], backend="bridge"))
    b = capture(tiny_model, enc, CacheConfig(sites=SITES[:3], backend="nnsight"))
    for s in SITES[:3]:
        assert torch.allclose(a[s], b[s], atol=1e-5)


def test_pair_capture_differs_between_models(tiny_pair, ds):
    acts = capture_pair(tiny_pair, ds, CacheConfig(sites=(Site("resid_post", 1),)))
    assert not torch.allclose(acts["base"][Site("resid_post", 1)], acts["tuned"][Site("resid_post", 1)])


def test_store_round_trip_and_resume(tiny_pair, ds, tmp_path):
    cfg = CacheConfig(sites=(Site("resid_post", 0), Site("resid_post", 1)), positions="last")
    stores = cache_to_store(tiny_pair, ds, cfg, tmp_path / "s", shard_size=4)
    direct = capture_pair(tiny_pair, ds, cfg)
    for role, store in stores.items():
        assert store.is_complete and store.n_shards == 4
        back = ActivationStore.open(tmp_path / "s" / role).read()
        for s in cfg.sites:
            # the store captured in batches of its shard size, the direct capture in one batch: the
            # matmuls block differently, so the activations agree to float32 rounding of their scale
            want = direct[role][s]
            torch.testing.assert_close(back[str(s)], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # simulate a crash after two shards: forget the rest in the manifest, rerun, same result
    shard = stores["tuned"].shard_path(3)
    before = shard.read_bytes()
    shard.unlink()
    manifest = tmp_path / "s" / "tuned" / "manifest.json"
    import json

    m = json.loads(manifest.read_text())
    m["shards"] = {k: v for k, v in m["shards"].items() if k != "3"}
    manifest.write_text(json.dumps(m))
    again = cache_to_store(tiny_pair, ds, cfg, tmp_path / "s", shard_size=4)
    assert again["tuned"].is_complete
    assert shard.read_bytes() == before  # the same batch through the same kernels: bit-identical


def test_store_of_another_pair_is_refused(tiny_pair, tiny_lora_pair, ds, tmp_path):
    cfg = CacheConfig(sites=(Site("resid_post", 0),))
    cache_to_store(tiny_pair, ds, cfg, tmp_path / "s", shard_size=8)
    with pytest.raises(StoreMismatchError, match="model"):
        cache_to_store(tiny_lora_pair, ds, cfg, tmp_path / "s", shard_size=8)
