"""Pair: choose a zoo pair, model folders or an adapter; sizes, sources, hashes, accuracies, generations."""

from __future__ import annotations

import streamlit as st

from app import common, live
from tunelens.errors import TunelensError
from tunelens.models import zoo
from tunelens.readout import answer_accuracy
from tunelens.tasks import entity_tracking as et

st.title("Pair")
st.caption("The base model and its fine-tune that every page compares.")

loaded = st.session_state.get("pair_spec") or ("", "")
if "pair_source" not in st.session_state:
    st.session_state["pair_source"] = "Model folders or adapter" if loaded[1] else "Zoo pair"
    st.session_state["base_ref"], st.session_state["tuned_ref"] = loaded
source = st.radio("Source", ["Zoo pair", "Model folders or adapter"], horizontal=True, key="pair_source")
if source == "Zoo pair":
    names = zoo.pair_names()
    built = {n: all(zoo.is_built(m) for m in zoo.PAIRS[n]) for n in names}
    spec0 = st.session_state.get("pair_spec") or ("", "")
    produced = common.folder_pair(common.results_dir())
    # the loaded zoo pair, else the pair that produced the results folder, else the first
    first = spec0[0] if spec0[0] in names and not spec0[1] else produced or names[0]
    if produced:
        st.caption(f"The results in `{common.results_dir()}` were computed on the zoo pair **{produced}**.")
    name = st.selectbox(
        "Zoo pair",
        names,
        index=names.index(first),
        format_func=lambda n: (
            f"{n}  ({zoo.PAIRS[n][0]} → {zoo.PAIRS[n][1]})" + ("" if built[n] else "  — not built")
        ),
        key="zoo_pair",
    )
    want = (name, "")
    extra = live.zoo_extra(name)
    note = live.missing_extra(extra, f"The zoo pair {name}") if extra else None
    if note:
        st.info(note)
    elif not built[name]:
        st.info(
            f"{name} is not built yet; loading it builds it (minutes for SmolLM2): "
            f"`tunelens zoo build {zoo.PAIRS[name][1]}`"
        )
else:
    base_ref = st.text_input(
        "Base model", placeholder="zoo model name, HF model folder or .gguf file", key="base_ref"
    )
    tuned_ref = st.text_input(
        "Tuned model", placeholder="zoo model name, HF model folder or peft adapter folder", key="tuned_ref"
    )
    want = (base_ref.strip(), tuned_ref.strip())

if st.button("Load pair", type="primary", key="load_pair"):
    try:
        if source != "Zoo pair":
            want = live.pair_refs(*want)
        common.load_pair(want[0], want[1])
    except TunelensError as exc:
        st.error(f"Cannot load {common.pair_label(want) or 'the pair'!r}: {exc}")
    else:
        st.session_state["pair_spec"] = want

pair = common.current_pair()
if pair is None:
    st.info(
        "No pair loaded. Choose one above and press **Load pair**; pages on saved results work without one."
    )
    st.stop()

desc = pair.describe()
st.subheader(f"Loaded: {common.pair_label(st.session_state['pair_spec'])}")
st.table({"size": list(desc["dims"]), "value": [str(v) for v in desc["dims"].values()]})
st.table(
    {
        "role": list(desc["models"]),
        "name": [m["name"] for m in desc["models"].values()],
        "source": [m["source"] for m in desc["models"].values()],
        "content hash": [m["hash"] for m in desc["models"].values()],
    }
)

st.subheader("Task accuracy")
spec = st.session_state["pair_spec"]
reports = {}
if not spec[1] and spec[0] in zoo.PAIRS:
    tuned_name = zoo.PAIRS[spec[0]][1]
    if zoo.is_built(tuned_name):
        rec = zoo.report(tuned_name)
        for split, acc in rec.get("tuned_accuracy", {}).items():
            before = rec["base_accuracy"][split]
            reports[f"{rec['recipe']['task']} ({split}, n={acc['n']})"] = (
                before["accuracy"],
                acc["accuracy"],
            )
if reports:
    st.table(
        {
            "task (held-out split)": list(reports),
            "base accuracy": [f"{b:.2f}" for b, _ in reports.values()],
            "tuned accuracy": [f"{t:.2f}" for _, t in reports.values()],
        }
    )
    st.caption("From the zoo's build record: accuracy among each prompt's candidate answers.")
n_eval = st.number_input("Entity-tracking prompts to score now", 3, 300, 30, step=3, key="n_eval")
if st.button("Measure entity-tracking accuracy", key="measure"):
    try:
        data = et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=max(1, int(n_eval) // 3)), seed=123)
        enc = data.encode(pair.tokenizer, max_len=pair.dims.n_ctx)
        accs = {}
        for role, m in pair:
            with m.active() as module:
                accs[role] = answer_accuracy(module, enc)
        st.table(
            {
                "model": list(accs),
                "accuracy among candidates": [f"{a[0]:.2f}" for a in accs.values()],
                "argmax accuracy": [f"{a[1]:.2f}" for a in accs.values()],
            }
        )
    except TunelensError as exc:
        st.error(str(exc))

st.subheader("Sample generations")
prompt = st.text_area(
    "Prompt",
    "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box Q contains the",
    key="gen_prompt",
)
n_new = st.slider("New tokens", 1, 64, 12, key="gen_tokens")
if st.button("Generate with both models", key="generate"):
    try:
        texts = {role: m.generate(prompt, max_new_tokens=n_new) for role, m in pair}
    except TunelensError as exc:
        st.error(str(exc))
    else:
        cols = st.columns(2)
        for col, (role, text) in zip(cols, texts.items(), strict=True):
            col.markdown(f"**{role}**")
            col.code(text or "(nothing)", language=None)
