"""Every page of the app under Streamlit's AppTest, on a results folder made from a tiny pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.app

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
PAGES = ["pair", "probes", "patching", "circuit", "knob", "skills", "intruders", "atlas", "jobs"]


def open_app(monkeypatch, results: Path | str, pair_dirs: tuple[str, str] | None = None, page: str = "pair"):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("TUNELENS_RESULTS", str(results))
    if pair_dirs is None:
        monkeypatch.delenv("TUNELENS_APP_PAIR", raising=False)
    else:
        monkeypatch.setenv("TUNELENS_APP_PAIR", "|".join(pair_dirs))
    at = AppTest.from_file(APP, default_timeout=120).run()
    if page != "pair":
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_the_tiny_results(monkeypatch, app_results, app_pair_dirs, page):
    at = open_app(monkeypatch, app_results, app_pair_dirs, page)
    assert not at.error, texts(at.error)
    assert at.title, "every page has a title"
    if page in ("probes", "patching", "intruders", "atlas"):
        figs = charts(at)
        assert figs and all(f["data"] for f in figs)
        assert all(f["layout"].get("xaxis", {}).get("title", {}).get("text") for f in figs)
    elif page in ("circuit", "knob", "skills"):
        # no results of this kind in the folder yet: the page says so and how to produce them
        assert "tunelens demo" in texts(at.info)
    if page == "jobs":
        assert any("atlas" in str(df.value) for df in at.dataframe)


def test_patching_widgets_change_the_figure(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "patching")
    pick = at.selectbox(key="pick:patching")
    assert set(pick.options) == {"patching/resid_pre_layer_pos", "patching/z_layer_head"}
    pick.set_value("patching/resid_pre_layer_pos").run()
    first = charts(at)[0]
    assert first["layout"]["yaxis"]["title"]["text"] == "pos"
    at.checkbox(key="w:patching/resid_pre_layer_pos:normalise").uncheck().run()
    raw = charts(at)[0]
    assert raw["data"][0]["z"] != first["data"][0]["z"]
    pick.set_value("patching/z_layer_head").run()
    assert charts(at)[0]["layout"]["yaxis"]["title"]["text"] == "head"


def test_atlas_widgets_change_the_figure(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "atlas")
    delta = charts(at)[0]
    at.radio(key="atlas_model").set_value("tuned").run()
    tuned = charts(at)[0]
    assert "tuned weights" in tuned["layout"]["title"]["text"] and tuned["data"] != delta["data"]
    at.slider(key="atlas_layer").set_value(0).run()
    assert "Layer 0" in charts(at)[0]["layout"]["title"]["text"]
    assert not at.error, texts(at.error)
    # the findings of the folder's other results at this layer are listed
    assert any("patching/" in str(m.value) for m in at.markdown)


def test_pair_page_describes_the_pair_and_generates(monkeypatch, app_results, app_pair_dirs, app_pair):
    at = open_app(monkeypatch, app_results, app_pair_dirs)
    shown = "\n".join(str(t.value) for t in at.table)
    for h in app_pair.hashes().values():
        assert h in shown
    at.button(key="generate").click().run()
    assert len(at.code) == 2 and not at.error
    at.button(key="measure").click().run()
    assert "accuracy among candidates" in "\n".join(str(t.value) for t in at.table)


# -- bad input: the page says what is wrong, the app keeps running -----------------------------------------
def test_missing_results_folder_is_named(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path / "nowhere", page="probes")
    assert "does not exist" in texts(at.error)
    # the sidebar's folder box (AppTest shows the sidebar on the first page only) fixes it for every page
    at = open_app(monkeypatch, tmp_path / "nowhere")
    at.text_input(key="results_dir_input").set_value(str(tmp_path)).run()
    at.switch_page("pages/probes.py").run()
    assert not at.exception and not at.error
    assert "No Probes results" in texts(at.info)


def test_results_of_another_pair_are_flagged(monkeypatch, other_pair_results, app_pair_dirs):
    at = open_app(monkeypatch, other_pair_results, app_pair_dirs, "atlas")
    assert "another pair" in texts(at.error) or "computed on pair 'other'" in texts(at.error)


def test_bad_prompts_are_explained(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "patching")
    at.text_input(key="sweep_prompt").set_value("   ").run()
    at.button(key="sweep_run").click().run()
    assert "empty" in texts(at.error)
    at.text_input(key="sweep_prompt").set_value("The apple is in Box F . Box F contains the").run()
    at.text_input(key="sweep_counter").set_value("The apple is in Box F contains the").run()
    at.button(key="sweep_run").click().run()
    assert "same token length" in texts(at.error)
    at.text_input(key="sweep_prompt").set_value("Box " * 400).run()
    at.text_input(key="sweep_counter").set_value("Box " * 400).run()
    at.button(key="sweep_run").click().run()
    assert "tokens" in texts(at.error) and not at.exception


def test_a_folder_that_is_not_a_model_is_explained(monkeypatch, app_results, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    at = open_app(monkeypatch, app_results)
    at.radio(key="pair_source").set_value("Model folders or adapter").run()
    at.text_input(key="base_ref").set_value(str(tmp_path)).run()
    at.text_input(key="tuned_ref").set_value(str(tmp_path)).run()
    at.button(key="load_pair").click().run()
    assert "not a model folder" in texts(at.error) and not at.exception
    assert "No pair loaded" in texts(at.info)
