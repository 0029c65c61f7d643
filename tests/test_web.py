"""The live web view: its HTTP side in process (events resumable, actions guarded, text
escaped), and the whole of it in a real browser (Debian's chromium, headless, driven by
Selenium) against `tasktree serve` and real workers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tasktree.client import Client
from tasktree.models import TreeSpec
from tasktree.web import create_app, loopback
from tests.terminal import ROOT, cli

TASK = "Plan <b>a launch</b> & <img src=x onerror=window.__xss=1>."


def sse(text: str) -> list[tuple[str, str, str]]:
    """(event, id, data) of each message of a server-sent event stream."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        out.append((fields.get("event", "message"), fields.get("id", ""), fields.get("data", "")))
    return out


@pytest.fixture
def finished(client: Client, start_workers: Callable[..., object]) -> Iterator[str]:
    start_workers(1, {"TASKTREE_OFFLINE_FANOUT": "2"})
    with client:
        yield client.wait(client.submit(TreeSpec.build(client.settings, TASK, max_depth=1))).id


def test_events_replay_a_finished_tree_and_resume_after_last_event_id(
    client: Client, finished: str
) -> None:
    web = TestClient(create_app(client, "127.0.0.1"))
    whole = sse(web.get(f"/trees/{finished}/events").text)
    assert whole[-1][0] == "end"
    stored = client.store.events(finished)
    assert [i for _, i, _ in whole[:-1]] == [i for i, _ in stored]
    assert [json.loads(d) for _, _, d in whole[:-1]] == [f for _, f in stored]
    third = stored[2][0]
    rest = sse(web.get(f"/trees/{finished}/events", headers={"Last-Event-ID": third}).text)
    assert [i for _, i, _ in rest[:-1]] == [i for i, _ in stored[3:]]
    assert web.get(f"/trees/{finished}/events?since=nonsense").status_code == 400


def test_tree_json_has_budgets_left_and_result_previews(client: Client, finished: str) -> None:
    web = TestClient(create_app(client, "127.0.0.1"))
    doc = web.get(f"/api/trees/{finished}").json()
    assert doc["status"] == "completed"
    assert doc["terminal"] is True
    assert doc["left"]["nodes"] == doc["max_nodes"] - len(doc["nodes"])
    assert doc["left"]["tokens"] is None  # no token budget
    assert all(len(n["result"]) <= 300 for n in doc["nodes"])
    node = web.get(f"/api/trees/{finished}/nodes/0").json()
    assert node["result"] == client.store.node(finished, "0").result
    assert web.get("/api/trees/0123456789abcdef").status_code == 404
    page = web.get("/").text
    assert f'href="/trees/{finished}"' in page
    assert "<b>a launch</b>" not in page
    assert "&lt;b&gt;a launch&lt;/b&gt;" in page


def test_actions_need_the_header_and_beyond_loopback_a_token(client: Client, finished: str) -> None:
    url = f"/api/trees/{finished}/cancel"
    local = TestClient(create_app(client, "127.0.0.1"))
    assert local.post(url).status_code == 403  # no X-Tasktree: another site's form
    assert local.post(url, headers={"X-Tasktree": "1"}).json() == {"status": "completed"}
    open_no_token = TestClient(create_app(client, "0.0.0.0"))
    refused = open_no_token.post(url, headers={"X-Tasktree": "1"})
    assert refused.status_code == 403
    assert "read-only" in refused.json()["error"]
    guarded = TestClient(create_app(client, "0.0.0.0", token="s3cret"))
    assert guarded.post(url, headers={"X-Tasktree": "1"}).status_code == 401
    bearer = {"X-Tasktree": "1", "Authorization": "Bearer s3cret"}
    assert guarded.post(url, headers=bearer).status_code == 200
    bad = guarded.post(f"/api/trees/{finished}/budget", headers=bearer, json={"add_nodes": -1})
    assert bad.status_code == 400
    assert "positive" in bad.json()["error"]
    assert loopback("::1")
    assert loopback("localhost")
    assert not loopback("10.0.0.1")


# -- in a real browser ----------------------------------------------------------------------


def chromium() -> Any:
    """Headless Debian chromium through Debian's chromedriver (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture
def serve(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`python -m tasktree serve --port 0` on the test's Redis; yields its address."""
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasktree", "serve", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, said = time.monotonic() + 30, tmp_path / "serve.log"
        while not (m := re.search(r"web view on (http://\S+?);", said.read_text())):
            assert proc.poll() is None, said.read_text()
            assert time.monotonic() < deadline, said.read_text()
            time.sleep(0.1)
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.mark.timeout(240)
def test_a_browser_watches_a_tree_grow_clicks_a_result_and_cancels_a_subtree(
    env: dict[str, str],
    start_workers: Callable[..., object],
    serve: str,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start_workers(1, {"TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_OFFLINE_LATENCY": "1.5"})
    browser = chromium()
    try:
        tid = cli(env, "submit", TASK, "--max-depth", "2", "--no-wait").stdout.strip()
        browser.get(f"{serve}/trees/{tid}")
        wait = WebDriverWait(browser, 60, poll_frequency=0.1)

        def status(node: str) -> str:
            text = browser.execute_script(
                f"const e = document.querySelector('li[data-node=\"{node}\"] .status');"
                "return e ? e.textContent : '';"
            )
            return str(text)

        wait.until(lambda _: status("0"))
        browser.execute_script("window.__page = 'the same page';")  # a reload would drop it
        first = status("0")
        # Nodes appear and change status with no reload.
        wait.until(lambda _: status("0.2") in ("deciding", "delegated"))
        assert first != status("0")
        # Cancel a subtree from the page: its node turns cancelled.
        browser.find_element(By.CSS_SELECTOR, 'li[data-node="0.2"]').click()
        button = browser.find_element(By.ID, "cancel-node")
        wait.until(lambda _: button.is_displayed())
        button.click()
        wait.until(lambda _: status("0.2") == "cancelled")
        # The tree ends; the page says so and shows every node the store has.
        wait.until(lambda _: browser.find_element(By.ID, "status").text not in ("", "running"))
        tree = json.loads(cli(env, "tree", tid, "--json").stdout)
        wait.until(
            lambda _: (
                len(browser.find_elements(By.CSS_SELECTOR, "li[data-node]")) == len(tree["nodes"])
            )
        )
        assert browser.find_element(By.ID, "status").text == tree["status"]
        assert {n["id"]: n["status"] for n in tree["nodes"]}["0.2"] == "cancelled"
        # Click a finished node: its result, as text.
        browser.find_element(By.CSS_SELECTOR, 'li[data-node="0.1.1"]').click()
        wait.until(lambda _: "offline placeholder" in browser.find_element(By.ID, "d-text").text)
        # The task's markup is text on the page, never HTML.
        root_task = browser.find_element(By.CSS_SELECTOR, 'li[data-node="0"] .task').text
        assert "<b>a launch</b>" in root_task
        assert not browser.find_elements(By.CSS_SELECTOR, "#nodes b, #nodes img")
        assert browser.execute_script("return window.__xss") is None
        assert browser.execute_script("return window.__page") == "the same page"
        # Replay: the slider at the start shows the tree as it began (the root alone).
        browser.execute_script(
            "const s = document.getElementById('replay'); s.value = 2; s.dispatchEvent(new Event('input'));"
        )
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "li[data-node]")) == 1)
        shot = tmp_path / "tree.png"
        browser.execute_script(
            "const s = document.getElementById('replay'); s.value = s.max; s.dispatchEvent(new Event('input'));"
        )
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()
