"""The annotation pages in a real browser: headless Chromium driven by Selenium, against `annotate serve`.

Uses the system Chromium and chromedriver (Debian: `apt-get install -y chromium chromium-driver`);
Selenium Manager is never asked to download anything. Skipped, with the reason, where they are missing.
Writes the screenshot the README shows to docs/annotation.png.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.annotation_server import Server, add_annotator, cli, write_task

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: "
                                "pip install selenium -c constraints-cpu.txt")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not Path(CHROMEDRIVER).is_file(),
    reason="Chromium or chromedriver is missing: apt-get install -y chromium chromium-driver")

MARKUP = '<script>window.pwned = 1; alert("pwned")</script><img src="x" onerror="window.pwned = 2"><b>bold?</b>'
ITEMS = [
    {"item_id": "showcase", "kind": "pairwise",
     "prompt": [{"role": "system", "content": "You are a friendly gardening assistant."},
                {"role": "user", "content": "The lower leaves of my tomato plants are turning yellow. What should I do?"}],
     "response_a": "Yellow lower leaves usually mean the plant is short of nitrogen or the leaves touch wet soil.\n\n"
                   "1. Pinch off the yellow leaves and any that touch the ground.\n"
                   "2. Water at the base in the morning, not over the leaves.\n"
                   "3. Feed with a balanced fertiliser every two weeks.\n\n"
                   "If brown spots with rings appear, it is early blight: remove those leaves and mulch the soil.",
     "response_b": "Tomatoes do that sometimes. Maybe give them more water and see what happens.",
     "source_a": "policy-step-400", "source_b": "reference"},
    {"item_id": "markup", "kind": "pairwise", "prompt": "Show me some HTML.", "response_a": MARKUP,
     "response_b": "A plain answer without markup."},
    {"item_id": "plain1", "kind": "pairwise", "prompt": "Name a colour.", "response_a": "Blue.", "response_b": "Seven."},
    {"item_id": "plain2", "kind": "pairwise", "prompt": "Say hello.", "response_a": "Hello!", "response_b": "Go away."},
    {"item_id": "hvm", "kind": "human-vs-model", "prompt": "Describe rain.", "response_a": "Wet drops falling from clouds.",
     "response_b": "It smells of dust and relief when it finally comes.", "source_a": "model", "source_b": "human"},
]
BY_ID = {item["item_id"]: item for item in ITEMS}


@pytest.fixture(autouse=True)
def no_selenium_manager(monkeypatch):
    """Download nothing: the system chromedriver is given, so Selenium Manager must never run."""
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def refuse(*args, **kwargs):
        raise AssertionError("Selenium Manager was called; the test must use the system chromedriver")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)


def make_driver(javascript: bool = True):
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1", "--no-first-run"):
        options.add_argument(arg)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    task = write_task(root / "task.jsonl", ITEMS, overlap=2, seed=1,
                      instructions="Which answer would help the person more?")
    db = root / "db.sqlite"
    server = Server(task, db).start()
    yield server, db
    server.stop()


def shown(driver) -> str | None:
    """The item id of the page shown, or None on the "all done" page."""
    forms = driver.find_elements(By.ID, "judge-form")
    return forms[0].get_attribute("data-item") if forms else None


def wait_for_other_page(driver, before: str | None) -> str | None:
    """Wait until the browser shows another item (or the "all done" page) than `before`."""
    WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_elements(By.ID, "done") or shown(d) != before)
    return shown(driver)


def side_choice(driver, side: str) -> str:
    """The item answer ("a" / "b") a click on `side` ("left" / "right") chooses, read from the page."""
    text = driver.find_element(By.CSS_SELECTOR, f"#answer-{side} .content").text
    item = BY_ID[shown(driver)]
    assert text in (item["response_a"].strip(), item["response_b"].strip()), text
    return "a" if text == item["response_a"].strip() else "b"


def check_item_page(driver, item_id: str) -> None:
    item = BY_ID[item_id]
    turns = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#prompt .turn .content")]
    expected = [t["content"] for t in item["prompt"]] if isinstance(item["prompt"], list) else [item["prompt"]]
    assert turns == expected
    answers = {driver.find_element(By.CSS_SELECTOR, f"#answer-{s} .content").text for s in ("left", "right")}
    assert answers == {item["response_a"].strip(), item["response_b"].strip()}


def test_annotating_in_a_browser(served):
    server, db = served
    link_ada, _ = add_annotator(db, "Ada", server.url)
    link_bo, _ = add_annotator(db, "Bo", server.url)
    expected: dict[tuple[str, str], str] = {}
    driver = make_driver()
    try:
        driver.get(link_ada)
        first = shown(driver)
        assert first in BY_ID and driver.current_url == f"{server.url}/"
        assert driver.find_element(By.CLASS_NAME, "who").text == "Ada"
        assert driver.find_element(By.ID, "progress-text").text == "0 / 5 done"
        check_item_page(driver, first)

        # the README's screenshot: the showcase item, as an annotator sees it
        driver.get(f"{server.url}/item/showcase")
        check_item_page(driver, "showcase")
        driver.find_element(By.CSS_SELECTOR, ".strength input[value='2']").click()
        (REPO / "docs").mkdir(exist_ok=True)
        assert driver.save_screenshot(str(REPO / "docs" / "annotation.png"))

        # choose with a click: the next item appears
        driver.get(f"{server.url}/")
        current = shown(driver)
        expected[("Ada", current)] = side_choice(driver, "left")
        driver.find_element(By.ID, "choose-left").click()
        after_click = wait_for_other_page(driver, current)
        assert after_click not in (None, current)
        assert driver.find_element(By.ID, "progress-text").text == "1 / 5 done"

        # a reload keeps the place
        driver.refresh()
        assert shown(driver) == after_click

        # choose with a key: "2" = B (right) is better
        expected[("Ada", after_click)] = side_choice(driver, "right")
        driver.find_element(By.TAG_NAME, "body").send_keys("2")
        after_key = wait_for_other_page(driver, after_click)
        assert after_key != after_click
        assert driver.find_element(By.ID, "progress-text").text == "2 / 5 done"

        # a completion containing markup shows as text, and runs nothing
        driver.get(f"{server.url}/item/markup")
        texts = [driver.find_element(By.CSS_SELECTOR, f"#answer-{s} .content").text for s in ("left", "right")]
        assert MARKUP in texts
        assert not driver.find_elements(By.CSS_SELECTOR, ".answer img, .answer b, .answer script")
        assert driver.execute_script("return typeof window.pwned") == "undefined"
        driver.find_element(By.TAG_NAME, "body").send_keys("3")  # about the same (a correction if answered)
        wait_for_other_page(driver, "markup")
        expected[("Ada", "markup")] = "tie"
        assert driver.execute_script("return typeof window.pwned") == "undefined"

        # a human-vs-model item also asks which answer a person wrote
        driver.get(f"{server.url}/item/hvm")
        check_item_page(driver, "hvm")
        written_by = side_choice(driver, "right")
        driver.find_element(By.ID, "written-right").click()
        expected[("Ada", "hvm")] = side_choice(driver, "left")
        driver.find_element(By.ID, "choose-left").click()
        wait_for_other_page(driver, "hvm")
    finally:
        driver.quit()

    # without JavaScript: keys do nothing, the buttons submit the same form
    plain = make_driver(javascript=False)
    try:
        plain.get(link_bo)
        first = shown(plain)
        assert plain.find_element(By.ID, "progress-text").text == "0 / 5 done"
        plain.find_element(By.TAG_NAME, "body").send_keys("1")
        time.sleep(0.5)  # with JavaScript the key would have sent the form by now
        plain.refresh()
        assert shown(plain) == first and plain.find_element(By.ID, "progress-text").text == "0 / 5 done"
        plain.find_element(By.ID, "choose-tie").click()
        second = wait_for_other_page(plain, first)
        assert second != first and plain.find_element(By.ID, "progress-text").text == "1 / 5 done"
        expected[("Bo", first)] = "tie"
        expected[("Bo", second)] = side_choice(plain, "right")
        plain.find_element(By.CSS_SELECTOR, ".strength input[value='3']").click()
        plain.find_element(By.CSS_SELECTOR, "textarea[name=reason]").send_keys("more <useful>")
        plain.find_element(By.ID, "choose-right").click()
        wait_for_other_page(plain, second)
    finally:
        plain.quit()

    # the export holds exactly those judgments
    out = db.parent / "judgments.jsonl"
    cli("export", str(db), "--kind", "judgments", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["annotator"], r["item_id"]): r["choice"] for r in rows} == expected
    assert len(rows) == len(expected)
    assert {(r["annotator"], r["item_id"]): r["written_by"] for r in rows if r["written_by"]} == {("Ada", "hvm"): written_by}
    bo = next(r for r in rows if r["annotator"] == "Bo" and r["item_id"] == second)
    assert bo["strength"] == 3 and bo["reason"] == "more <useful>" and bo["shown_left"] in ("a", "b")
    assert (REPO / "docs" / "annotation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
