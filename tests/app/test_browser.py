"""The app in a real browser: every page opened in headless Chromium, screenshots kept in test-artifacts/."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.app import browser as b

pytestmark = pytest.mark.app

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# (url path, title, plots expected on the tiny results)
PAGES = [
    ("", "Pair", False),
    ("probes", "Probes", True),
    ("patching", "Patching & CMAP", True),
    ("circuit", "Circuit", True),
    ("knob", "Context knob", True),
    ("skills", "Skill localization", True),
    ("intruders", "Intruder dimensions", True),
    ("atlas", "Layer atlas", True),
    ("jobs", "Jobs", False),
]


def test_every_page_in_headless_chromium(app_results, app_pair_dirs):
    if b.chromium_path() is None:  # never a silent skip: the README's test command installs it
        pytest.fail(f"the real-browser test needs Chromium; {b.INSTALL_HINT}")
    with b.streamlit_app(app_results, app_pair_dirs) as url:
        browser = b.Browser()
        try:
            for path, title, plots in PAGES:
                browser.open(f"{url}/{path}")
                assert browser.wait_for(f"{b.TITLE} === {title!r}", 90), (
                    f"{path or 'pair'}: no title {title!r}"
                )
                if plots:
                    assert browser.wait_for(f"{b.PLOTS} > 0", 90), f"{path}: no plot drawn"
                assert browser.wait_for(b.IDLE, 90), f"{path or 'pair'}: still running"
                time.sleep(0.5)  # let plotly finish its transitions before the shot
                shot = browser.screenshot(ARTIFACTS / f"app-{path or 'pair'}.png")
                assert shot.stat().st_size > 10_000, f"{shot} looks blank"
                assert browser.eval(b.ERRORS) == [], f"{path or 'pair'} shows an error box"
                if plots:
                    assert browser.eval(b.PLOTS) > 0
                    browser.eval("document.querySelector('.js-plotly-plot').scrollIntoView()")
                    time.sleep(0.5)
                    browser.screenshot(ARTIFACTS / f"app-{path}-plot.png")
        finally:
            browser.close()


def test_jobs_page_shows_a_jobs_units_in_headless_chromium(job_results):
    """The Jobs page on a results folder holding real job folders, as a user sees it: each job's counts and
    progress, and its units' ids and states in the table (read from the grid's cells)."""
    from tests.app.conftest import PROBE_JOB_UNITS

    if b.chromium_path() is None:
        pytest.fail(f"the real-browser test needs Chromium; {b.INSTALL_HINT}")
    with b.streamlit_app(job_results) as url:
        browser = b.Browser(height=1600)
        try:
            browser.open(url)  # the app's first page registers the navigation; then the Jobs page's URL
            assert browser.wait_for(f"{b.TITLE} === 'Pair'", 90) and browser.wait_for(b.IDLE, 90)
            browser.open(f"{url}/jobs")
            assert browser.wait_for(f"{b.TITLE} === 'Jobs'", 90)
            assert browser.wait_for(b.IDLE, 90) and browser.wait_for(f"{GRID_CELLS}.length > 0", 30)
            time.sleep(1.0)  # the grids draw after their data arrives
            shot = browser.screenshot(ARTIFACTS / "app-jobs-units.png")
            assert shot.stat().st_size > 10_000, f"{shot} looks blank"
            assert browser.eval(b.ERRORS) == []
            text = browser.eval("document.body.innerText")
            assert "probe job in probe-job" in text and "reproduce job in reproduce" in text
            assert "3 of 5 units done, 1 failed" in text and "1 of 1 units done" in text
            cells = browser.eval(GRID_CELLS)
            for unit, state in PROBE_JOB_UNITS.items():
                assert unit in cells and state in cells, (unit, state)
            assert "study-environment" in cells
        finally:
            browser.close()


# The text of every cell of the page's data grids (Glide renders to a canvas and keeps an accessible table)
GRID_CELLS = (
    'Array.from(document.querySelectorAll(\'[data-testid="stDataFrame"] [role="gridcell"]\'))'
    ".map(c => c.innerText)"
)
