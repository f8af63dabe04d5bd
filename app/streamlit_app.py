"""tunelens workbench: ``tunelens app [RESULTS_DIR]`` runs this with Streamlit, bound to 127.0.0.1.

One page per analysis (st.navigation); pages hold UI only and read saved Results from the results folder
chosen in the sidebar (``$TUNELENS_RESULTS``, default results/demo) or run live parts on the pair chosen on
the Pair page.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `streamlit run app/streamlit_app.py` from a checkout that is not installed
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from app import common  # noqa: E402

st.set_page_config(page_title="tunelens", page_icon=":material/biotech:", layout="wide")
common.init_state()

_HERE = Path(__file__).resolve().parent / "pages"
PAGES = [
    ("pair.py", "Pair", ":material/compare_arrows:", True),
    ("probes.py", "Probes", ":material/show_chart:", False),
    ("patching.py", "Patching & CMAP", ":material/healing:", False),
    ("circuit.py", "Circuit", ":material/hub:", False),
    ("knob.py", "Context knob", ":material/tune:", False),
    ("skills.py", "Skill localization", ":material/my_location:", False),
    ("intruders.py", "Intruder dimensions", ":material/explore:", False),
    ("atlas.py", "Layer atlas", ":material/map:", False),
    ("jobs.py", "Jobs", ":material/work_history:", False),
]
common.sidebar()
nav = st.navigation(
    [st.Page(_HERE / f, title=t, icon=i, default=d, url_path=f.removesuffix(".py")) for f, t, i, d in PAGES]
)
nav.run()
