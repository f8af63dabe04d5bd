"""Context knob: layer curve and dose-response from saved results, and live steering with a slider for c."""

from __future__ import annotations

import streamlit as st

from app import common, live
from circuits.knob.steering import steer
from tunelens.errors import TunelensError
from tunelens.faces.atlas import directions_in

entries = common.analysis_page("knob")

st.divider()
st.header("Live steering")
st.caption(
    "Set the projection of the last token's residual onto the knob direction to c (at the direction's "
    "site, on every generated token) and compare the answers of base and tuned, unsteered and steered."
)
pair = common.current_pair()
if pair is None:
    st.info("Load a pair on the Pair page to steer live.")
    st.stop()
if not entries:
    st.info("Live steering needs a saved knob result (its direction); none is in this results folder.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=256)
def _answer(spec: tuple[str, str], role: str, prompt: str, entry: str, mtime: float, name: str, c, n: int):
    model = common.load_pair(spec[0], spec[1] or "")[role]
    if c is None:
        return model.generate(prompt, max_new_tokens=n)
    direction = {d.name: d for d in directions_in(common._load_result(entry, mtime))}[name]
    return steer(model, direction, prompt, float(c), max_new_tokens=n)


names = [e.name for e in entries]
entry = next(
    e
    for e in entries
    if e.name == (st.selectbox("Knob result", names, key="steer_result") if len(names) > 1 else names[0])
)
own = common.own_pair(entry)
if own is not None:
    st.info(
        f"{entry.name} was found on pair **{own}**, not on the loaded pair: its direction and its range of c "
        "belong to that pair's models. Load it to steer with this knob."
    )
    if st.button(f"Load {own} for steering", key="steer_load_own"):
        st.session_state["pair_spec"] = (own, "")
        st.rerun()
    st.stop()
directions = {d.name: d for d in directions_in(common.load(entry))}
if not directions:
    st.info(f"{entry.name} holds no direction to steer with.")
    st.stop()
name = st.selectbox("Direction", list(directions), key="steer_direction")
d = directions[name]
lo, hi = live.c_range(common.load(entry), name, d)
st.caption(
    f"{name} at {d.site}; c from the projections of context- and prior-intent prompts: {lo:.1f} … {hi:.1f}"
)
prompt = st.text_input(
    "Prompt",
    "Context: The capital of France is Rome. Question: What is the capital of France? Answer:",
    key="steer_prompt",
)
c = st.slider("c (the value uᵀh is set to)", float(lo), float(hi), float((lo + hi) / 2), key="steer_c")
n_new = st.slider("New tokens", 1, 24, 6, key="steer_tokens")
try:
    live.encode_live(pair, prompt)
    spec = tuple(st.session_state["pair_spec"])
    rows = {}
    for role in ("base", "tuned"):
        args = (spec, role, prompt, str(entry.path), entry.mtime, name)
        rows[role] = (_answer(*args, None, n_new), _answer(*args, round(c, 4), n_new))
except TunelensError as exc:
    st.error(str(exc))
else:
    st.table(
        {
            "model": list(rows),
            "unsteered answer": [r[0] for r in rows.values()],
            f"steered answer (c = {c:.2f})": [r[1] for r in rows.values()],
        }
    )
