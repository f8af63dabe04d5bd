"""Patching & CMAP: saved heat-maps and recovery by head group, and a live sweep on a typed prompt."""

from __future__ import annotations

import streamlit as st

from app import common, live
from circuits.patching.live import live_sweep
from tunelens.errors import TunelensError

common.analysis_page("patching")

st.divider()
st.header("Live sweep")
st.caption(
    "Attribution patching over every site at once (one forward and one backward pass per model), then exact "
    "activation patching of the top sites. The counterfactual must have the same token length."
)
pair = common.current_pair()
if pair is None:
    st.info("Load a pair on the Pair page to run a live sweep.")
    st.stop()

prompt = st.text_input(
    "Prompt",
    "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box Q contains the",
    key="sweep_prompt",
)
counter = st.text_input(
    "Counterfactual (same token length)",
    "The apple is in Box F. The cup is in Box Q. The dog is in Box B. Box B contains the",
    key="sweep_counter",
)
top_k = st.slider("Sites to patch exactly", 1, 20, 5, key="sweep_topk")
role = st.radio("Model", ["tuned", "base"], horizontal=True, key="sweep_role")
if st.button("Run the sweep", type="primary", key="sweep_run"):
    try:
        live.encode_with_counterfactual(pair, prompt, counter)
        with st.spinner("attribution over every site, then exact patching of the top sites ..."):
            result = live_sweep(pair[role], prompt, counter, top_k=top_k)
        common.show_summary(result.summary())
        st.plotly_chart(result.figure(), width="stretch", key="sweep_fig")
    except TunelensError as exc:
        st.error(str(exc))
