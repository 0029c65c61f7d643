"""Ctrl-C, abandoned trees and waits that never hang, on the embedded default and a real Redis.

Each test drives the real CLI: on a pseudo-terminal where the prompt and ^C matter, as a
plain subprocess otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.terminal import Terminal, cli, cli_json, embedded_env, kill_group, stop_embedded

pytestmark = pytest.mark.integration

SLOW = {"TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_OFFLINE_LATENCY": "0.4"}
#: Calls of the fan-out-3, depth-3 offline tree: 13 decisions, 27 leaves, 13 syntheses.
FULL_TREE_CALLS = 53


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "data"
    yield d
    stop_embedded(d)


def latest(env: dict[str, str]) -> dict:
    trees = cli_json(env, "list", "--limit", "1")
    return cli_json(env, "tree", trees[0]["tree_id"])


def store_stopped(data_dir: Path) -> bool:
    return not (data_dir / "redis.port").exists()


def at_the_prompt(data_dir: Path) -> tuple[Terminal, dict[str, str]]:
    """A slow embedded tree running on a terminal, Ctrl-C pressed, its question on screen."""
    env = embedded_env(data_dir, **SLOW)
    term = Terminal(["submit", "Slow work."], env)
    term.read_until(b"executing")
    term.ctrl_c()
    term.read_until(b"Stop tree")
    return term, env


def test_ctrl_c_then_cancel_ends_the_tree_cancelled(data_dir: Path) -> None:
    term, env = at_the_prompt(data_dir)
    try:
        started = time.monotonic()
        term.type("c\n")
        assert term.wait(20) == 1, term.text[-3000:]
        assert time.monotonic() - started < 10
    finally:
        term.close()
    assert "Traceback" not in term.text
    assert "CRITICAL" not in term.text
    assert "cancelled" in term.text.splitlines()[-1]
    assert store_stopped(data_dir)  # the last user shut the embedded Redis down
    tree = latest(env)
    assert tree["status"] == "cancelled"
    assert all(n["status"] in ("completed", "cancelled") for n in tree["nodes"])


def test_ctrl_c_then_keep_interrupts_and_resume_reuses_every_result(data_dir: Path) -> None:
    env = embedded_env(data_dir, **SLOW)
    term = Terminal(["submit", "Slow work."], env)
    try:
        term.read_until(b"executing")
        time.sleep(1.0)
        term.ctrl_c()
        term.read_until(b"Stop tree")
        term.type("k\n")
        assert term.wait(15) == 130
    finally:
        term.close()
    assert "Traceback" not in term.text
    assert "tasktree resume" in term.text
    before = latest(env)
    assert before["status"] == "interrupted"
    done_before = {n["id"]: n for n in before["nodes"] if n["status"] == "completed"}
    assert done_before, "some nodes finished before the interrupt"
    assert before["calls"] < FULL_TREE_CALLS

    out = cli(env, "resume", before["tree_id"], "--json")
    assert out.returncode == 0, out.stderr
    after = latest(env)
    assert after["status"] == "completed"
    # Stored results are reused, not recomputed: no node calls the model twice for one step.
    assert after["calls"] == FULL_TREE_CALLS
    nodes = {n["id"]: n for n in after["nodes"]}
    for nid, node in done_before.items():
        assert nodes[nid]["result"] == node["result"]
        assert nodes[nid]["calls"] == node["calls"]


def test_second_ctrl_c_forces_the_exit_and_leaves_the_tree_interrupted(data_dir: Path) -> None:
    term, env = at_the_prompt(data_dir)
    try:
        started = time.monotonic()
        term.ctrl_c()
        assert term.wait(10) == 130
        assert time.monotonic() - started < 5
    finally:
        term.close()
    assert "Traceback" not in term.text
    assert latest(env)["status"] == "interrupted"


def test_a_second_terminal_on_the_same_store_survives_the_first_ones_ctrl_c(
    data_dir: Path,
) -> None:
    first = Terminal(["submit", "Slow work."], embedded_env(data_dir, **SLOW))
    second_env = embedded_env(data_dir, TASKTREE_OFFLINE_LATENCY="1.0")
    second = Terminal(["submit", "Second tree. This includes a, b, and c."], second_env)
    try:
        first.read_until(b"executing")
        second.read_until(b"executing")
        first.ctrl_c()
        first.read_until(b"Stop tree")
        first.type("c\n")
        assert first.wait(20) == 1
        assert not store_stopped(data_dir)  # the second terminal still uses it
        assert second.wait(60) == 0
    finally:
        first.close()
        second.close()
    assert "Traceback" not in first.text + second.text
    assert "completed" in second.text
    assert store_stopped(data_dir)
    statuses = sorted(t["status"] for t in cli_json(embedded_env(data_dir), "list"))
    assert statuses == ["cancelled", "completed"]


def test_sigint_without_a_terminal_interrupts_at_once(data_dir: Path) -> None:
    env = embedded_env(data_dir, **SLOW)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasktree", "submit", "Slow work."],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen = b""
    while b"executing" not in seen:
        line = proc.stdout.readline()
        assert line, "the CLI ended before any node ran"
        seen += line
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert time.monotonic() - started < 5
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err
    assert "interrupted, nothing lost" in lines[0], err
    assert latest(env)["status"] == "interrupted"


def test_an_abandoned_tree_is_never_run_by_another_process(data_dir: Path) -> None:
    env = embedded_env(data_dir, **SLOW)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasktree", "submit", "Slow work."],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    while b"executing" not in proc.stdout.readline():
        pass
    kill_group(proc)  # kill -9: no chance to mark anything; its Redis lives on
    abandoned = latest(env)  # the first process on the store after it marks its trees
    assert abandoned["status"] == "interrupted"

    out = cli(env, "submit", "Another tree. This includes a, and b.")
    assert out.returncode == 0, out.stderr
    again = cli_json(env, "tree", abandoned["tree_id"])
    assert again["status"] == "interrupted"
    assert again["calls"] == abandoned["calls"]  # nobody spent a call on it


def test_watch_says_when_no_worker_takes_the_tree_and_honours_timeout(env, r) -> None:
    env = {**os.environ, **env, "TASKTREE_QUIET_SECONDS": "1"}
    tid = cli(env, "submit", "Nobody will run this.", "--no-wait").stdout.strip()
    started = time.monotonic()
    out = cli(env, "watch", tid, "--timeout", "2.5")
    assert out.returncode == 1
    assert 2.5 <= time.monotonic() - started < 30
    assert f"no worker consumes queue '{env['TASKTREE_NODE_QUEUE']}'" in out.stderr
    assert "celery -A workers worker" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"tasktree: error: gave up waiting after 2.5 s: tree {tid} is still running"
    )
    assert "Traceback" not in out.stderr
