"""The dashboard in headless Chromium: the runs list, a curve that grows while a run writes, the comparison,
and a streamed side-by-side chat with a real ``tuneforge serve``. Screenshots go to the test's tmp dir."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the dashboard needs pip install 'tuneforge[ui]'")
from tuneforge.ui.app import create_app  # noqa: E402

from .conftest import Served  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"]
WAIT_S = 60  # generous: the machine may be busy; a test passes as soon as its condition holds


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go (kept with pytest's tmp dirs as test artifacts)."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def browser(tmp_path):
    driver_path = shutil.which("chromedriver")
    if not CHROMIUM.exists() or driver_path is None:
        pytest.skip("no browser: install one with `apt-get install -y chromium chromium-driver` (Debian/Ubuntu)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=what)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def points(driver, chart_id: str) -> int:
    found = css(driver, f"#{chart_id}")
    return int(found[0].get_attribute("data-points")) if found else 0


def test_runs_list_and_compare_view(runs_root, browser, shots):
    with Served(create_app(runs_root)) as ui:
        browser.get(ui.url + "/")
        wait_for(browser, lambda d: len(css(d, "#runs tr[data-run]")) == 2, "both runs listed")
        rows = {r.get_attribute("data-run"): r.text for r in css(browser, "#runs tr[data-run]")}
        assert set(rows) == {"lr-high", "lr-low"} and all("finished" in t and "lora" in t for t in rows.values())
        css(browser, "#filter")[0].send_keys("high")
        wait_for(browser, lambda d: len(css(d, "#runs tr[data-run]")) == 1, "the filter keeps one run")
        css(browser, "#filter")[0].clear()
        css(browser, "#filter")[0].send_keys(" ")  # clear() fires no input event; a space matches every row
        wait_for(browser, lambda d: len(css(d, "#runs tr[data-run]")) == 2, "the filter cleared")
        browser.save_screenshot(str(shots / "runs.png"))

        for box in css(browser, "#runs input[type=checkbox]"):
            box.click()
        css(browser, "#compare-btn")[0].click()
        wait_for(browser, lambda d: points(d, "cmp-loss") == 12, "overlaid loss curves")
        diff = css(browser, "#config-diff")[0].text
        assert "train.lr" in diff and "method.lora.r" in diff and "max_steps" not in diff
        assert len(css(browser, "#config-diff td.changed")) >= 2
        assert "0.3" in css(browser, "main")[0].text  # lr-high's eval table next to lr-low's "no eval results"
        browser.save_screenshot(str(shots / "compare.png"))


def test_a_curve_grows_while_the_run_writes(runs_root, browser, shots, tmp_path):
    root = tmp_path / "runs"
    live = root / "live"
    live.mkdir(parents=True)
    shutil.copy(runs_root / "lr-high" / "config.yaml", live)
    records = [json.loads(x) for x in (runs_root / "lr-high" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("final")]
    metrics = live / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in steps[:2]))
    stop = threading.Event()

    def write_more():  # the rest of the run, a record at a time, as `tuneforge train` would
        for r in steps[2:]:
            if stop.wait(0.4):
                return
            with metrics.open("a") as f:
                f.write(json.dumps(r) + "\n")

    with Served(create_app(root, poll_s=0.2)) as ui:
        browser.get(f"{ui.url}/#/run/live")
        wait_for(browser, lambda d: points(d, "chart-loss") >= 2, "the first points")
        assert css(browser, "h1 .badge")[0].get_attribute("data-status") == "running"
        writer = threading.Thread(target=write_more)
        writer.start()
        try:
            wait_for(browser, lambda d: points(d, "chart-loss") == len(steps), "every record plotted without reload")
        finally:
            stop.set()
            writer.join()
        browser.save_screenshot(str(shots / "live-run.png"))


def test_side_by_side_chat_streams_from_a_real_server(runs_root, model_dir, browser, shots, tmp_path):
    from tuneforge.serve import ServeOptions, Server

    adapters = tmp_path / "adapters"
    for name in ("lr-high", "lr-low"):
        shutil.copytree(runs_root / name / "adapter", adapters / name)
    options = ServeOptions(model=str(model_dir), adapters=str(adapters), port=0, scan_interval_s=0)
    with Served(create_app(runs_root)) as ui, Server(options).start() as serve:
        browser.get(f"{ui.url}/#/chat")
        url = wait_for(browser, lambda d: css(d, "#serve-url"), "the chat pane")[0]
        url.clear()
        url.send_keys(serve.url)
        css(browser, "#connect")[0].click()
        wait_for(browser, lambda d: len(css(d, "#models input")) == 3, "base and two adapters offered")
        css(browser, "#prompt")[0].send_keys("Upper-case the word: apple")
        css(browser, "#send")[0].click()
        wait_for(browser, lambda d: len(css(d, ".msg.assistant[data-done='1']")) == 3, "three answers finished")
        columns = {c.get_attribute("data-model"): c.text for c in css(browser, ".chat-col")}
        assert set(columns) == {css(browser, "#models input")[0].get_attribute("value"), "lr-high", "lr-low"}
        assert not css(browser, ".chat-col .error")
        base = css(browser, ".chat-col")[0].find_elements("css selector", ".msg.assistant")[0].text
        assert base.strip()  # the base model's streamed answer is on the page
        time.sleep(0.2)  # let the last paint land before the screenshot
        browser.save_screenshot(str(shots / "chat.png"))
