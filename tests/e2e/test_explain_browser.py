"""attributions.html in a real browser: headless Chromium driven by Selenium opens the page that
`raylign explain` writes for a tiny reward model on a pair whose answer carries markup.

The markup must show as text (no element made from it, no script run), and every word's hover title
must carry its exact attribution. Uses the system Chromium and chromedriver (Debian: `apt-get install
-y chromium chromium-driver`); Selenium Manager is never asked to download anything. Skipped, with the
reason, where they are missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.test_annotation_browser import CHROMEDRIVER, CHROMIUM, make_driver, no_selenium_manager  # noqa: F401

pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium -c constraints-cpu.txt")
pytest.importorskip("captum", reason="captum is not installed: pip install 'raylign[explain]' -c constraints-cpu.txt")
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not Path(CHROMEDRIVER).is_file(),
    reason="Chromium or chromedriver is missing: apt-get install -y chromium chromium-driver")

MARKUP = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"><b>bold?</b>'


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    import torch

    from raylign.evaluation import explain as E

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("explain")
        target = E.load_target(E.TargetSpec("reward", "tiny:llama"), max_length=128, max_prompt_length=64)
        rows = [{"prompt": "Show me some HTML.", "chosen": f"Here it is: {MARKUP}", "rejected": "No."}]
        exs = E.explain_items(target, E.pair_items(rows), random_draws=2, progress=False, steps=16, max_steps=16)
        E.write_explanations(out, exs, {"model": "tiny:llama", "target": target.name, "kind": "reward"}, n_boot=20)
    finally:
        torch.set_num_threads(before)
    return out


def test_markup_token_shows_as_text_and_titles_carry_values(page):
    saved = json.loads((page / "explain.json").read_text())["explanations"]
    driver = make_driver()
    try:
        driver.get((page / "attributions.html").as_uri())
        assert driver.execute_script("return window.pwned") is None  # nothing of the answer ran
        sides = driver.find_elements(By.CSS_SELECTOR, ".sides > .side")
        assert [s.find_element(By.TAG_NAME, "h3").text for s in sides] == ["chosen", "rejected"]
        response = sides[0].find_element(By.CSS_SELECTOR, ".response")
        assert MARKUP in response.text  # the markup reads as text
        assert not response.find_elements(By.TAG_NAME, "script") and not response.find_elements(By.TAG_NAME, "img")
        assert not response.find_elements(By.TAG_NAME, "b")
        words = response.find_elements(By.CSS_SELECTOR, "span.w")
        expected = [w for w in saved[0]["words"] if w["response"]]
        assert len(words) == len(expected)
        for span, w in zip(words, expected, strict=True):
            title = span.get_attribute("title")
            value = float(re.search(r": ([+-][0-9.e+-]+) \(", title).group(1))
            assert value == pytest.approx(w["attribution"], rel=1e-5, abs=1e-9), title
        margin = driver.find_element(By.CSS_SELECTOR, ".card h2").text
        assert f"margin {saved[0]['score'] - saved[1]['score']:+.4f}" in margin
    finally:
        driver.quit()
