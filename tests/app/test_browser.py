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
