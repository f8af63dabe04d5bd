import pytest

from tunelens.errors import ConfigError
from tunelens.tasks import entity_tracking as et


@pytest.fixture(scope="module")
def ds():
    return et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=20), seed=0)


def test_reproducible_and_seed_dependent(ds):
    again = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=20), seed=0)
    other = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=20), seed=1)
    assert ds.content_hash() == again.content_hash() != other.content_hash()
    assert ds.prompts == again.prompts


def test_answer_is_the_object_in_the_queried_box(ds):
    for e in ds:
        q = e.meta["query_index"]
        assert f"The{e.answer} is in Box {e.meta['labels'][q]}." in e.prompt
        assert e.prompt.endswith(f"Box {e.meta['labels'][q]} contains the")
        assert e.answer in e.candidates and len(set(e.candidates)) == 3


def test_marks_land_on_the_right_tokens(ds, tiny_tok):
    enc = ds.encode(tiny_tok)
    ids = enc.tokens.input_ids
    for i, e in enumerate(ds.examples[:12]):

        def tok(name, i=i):
            return tiny_tok.decode([int(ids[i, enc.positions[name][i]])]).strip()

        label = e.meta["labels"][e.meta["query_index"]]
        assert tok("query_label") == label == tok("prev_query_label")
        assert enc.positions["query_label"][i] == enc.positions["last"][i] - 2
        assert tok("query_object") == e.answer.strip()
        assert tok("object_1") == e.meta["objects"][1]


def test_splits_keep_a_world_together(ds):
    parts = ds.split({"train": 0.5, "test": 0.5}, seed=0)
    train_worlds = {e.item_id for e in parts["train"]}
    test_worlds = {e.item_id for e in parts["test"]}
    assert not train_worlds & test_worlds
    assert len(parts["train"]) + len(parts["test"]) == len(ds)


@pytest.mark.parametrize("kind", ["query", "context"])
def test_counterfactuals_have_the_same_token_length(ds, tiny_tok, kind):
    corrupt = et.counterfactuals(ds, kind, seed=0)
    a, b = ds.encode(tiny_tok), corrupt.encode(tiny_tok)
    assert (a.tokens.lengths == b.tokens.lengths).all()
    for clean_e, bad_e in zip(ds, corrupt, strict=True):
        if kind == "query":
            assert bad_e.meta["objects"] == clean_e.meta["objects"] and bad_e.answer != clean_e.answer
        else:
            assert bad_e.meta["query_label"] not in bad_e.meta["labels"] and bad_e.label is None


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="n_boxes"):
        et.EntityTrackingConfig(n_boxes=1)
    with pytest.raises(ConfigError, match="counterfactual kind"):
        et.counterfactuals(et.generate(et.EntityTrackingConfig(n_contexts=1), seed=0), "other", seed=0)


def test_context_counterfactual_marks_a_random_box_label(ds, tiny_tok):
    corrupt = et.counterfactuals(ds, "context", seed=0)
    enc = corrupt.encode(tiny_tok)
    vocab = {i: w for w, i in tiny_tok.get_vocab().items()}
    chosen = set()
    for i, e in enumerate(corrupt):
        pos = int(enc.positions["random_label"][i])
        word = vocab[int(enc.tokens.input_ids[i, pos])]
        assert word in e.meta["labels"]  # a box label of the corrupt world ...
        assert pos == int(enc.positions[f"label_{e.meta['labels'].index(word)}"][i])  # ... at its own mark
        chosen.add(e.meta["labels"].index(word))
    assert chosen == {0, 1, 2}  # drawn, not always the same segment
