"""What a new user meets in the first ten minutes: the CLI's input, help and output, the Python
API, `.env`, and what a worker says when it starts. Each drives the real CLI or a real worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, WorkerProcess
from tests.terminal import cli, cli_json, embedded_env, stop_embedded

pytestmark = pytest.mark.integration

THREE_PARTS = "Write a guide. This includes setup, usage, and troubleshooting."


@pytest.fixture
def emb(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a CLI on the embedded default, its data in this test's directory."""
    yield embedded_env(tmp_path / "data")
    stop_embedded(tmp_path / "data")


def submitted(env: dict[str, str], *args: str, input: str | None = None) -> dict:
    out = cli(env, "submit", *args, "--json", input=input)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_task_comes_from_stdin_or_a_file(emb, tmp_path) -> None:
    tree = submitted(emb, "-", input="A task read from standard input.\n")
    assert tree["task"] == "A task read from standard input.\n"
    path = tmp_path / "task.txt"
    path.write_text(THREE_PARTS)
    tree = submitted(emb, "--file", str(path))
    assert tree["task"] == THREE_PARTS
    assert len(tree["nodes"]) == 4


def test_version_help_and_the_command_name(emb) -> None:
    from tasktree import __version__

    version = cli(emb, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"tasktree {__version__}"
    help_ = cli(emb, "submit", "--help").stdout
    assert help_.startswith("usage: python -m tasktree submit")
    flat = " ".join(help_.split())
    for text in ("(default: 3)", "(default: 6)", "(default: 60)", "(default: none)"):
        assert text in flat
    assert "--timeout SECONDS" in help_
    assert "--file PATH" in help_
    installed = subprocess.run(
        [str(Path(sys.executable).with_name("tasktree")), "--help"],
        env=emb,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert installed.stdout.startswith("usage: tasktree ")


def test_watch_json_prints_only_json(emb) -> None:
    tid = submitted(emb, THREE_PARTS)["tree_id"]
    out = cli(emb, "watch", tid, "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["tree_id"] == tid  # the whole of stdout is one document


@pytest.mark.parametrize(
    "args",
    [["list"], ["tree", "{tid}"], ["export", "{tid}"], ["show", "{tid}", "0"], ["--help"]],
)
def test_a_closed_pipe_ends_quietly(emb, args) -> None:
    tid = submitted(emb, THREE_PARTS)["tree_id"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasktree", *(a.format(tid=tid) for a in args)],
        cwd=ROOT,
        env={k: v for k, v in emb.items() if k != "PYTHONUNBUFFERED"},  # as in a shell
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader went away, as `| head` does
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 141
    assert err == ""


def test_list_json_carries_each_trees_result(emb) -> None:
    tree = submitted(emb, THREE_PARTS)
    [listed] = cli_json(emb, "list")
    assert listed["tree_id"] == tree["tree_id"]
    assert listed["status"] == "completed"
    preview = listed["result"]
    assert preview.endswith("…")
    assert len(preview) == 200
    assert " ".join(tree["result"].split()).startswith(preview.rstrip("…"))


def test_the_tree_view_shows_tasks_progress_and_clamps(emb) -> None:
    env = {**emb, "TASKTREE_OFFLINE_FANOUT": "5"}
    tree = submitted(env, "Split me five ways.", "--max-nodes", "4")
    assert len(tree["nodes"]) == 4  # 5 asked, 3 fit beside the root
    view = cli(env, "tree", tree["tree_id"]).stdout
    lines = view.splitlines()
    assert lines[0] == "node  persona — task  status  time  cost  worker"
    assert "Part 1 of 5: Split me five ways." in view  # what the node works on
    assert "clamped by budget" in lines[1]  # the root: 5 sub-tasks asked, 3 fit
    assert "running 0 / done 4 / total 4" in lines[-1]
    # ... and each child's own fan-out of 5: no room left, so it executed instead.
    assert "budgets clamped 4 decomposition(s)" in lines[-1]
    assert "unpriced" in lines[-1]
    assert "$" not in view


def test_show_prints_times_and_lists_for_people(emb) -> None:
    env = {**emb, "TASKTREE_OFFLINE_FANOUT": "5"}
    tid = submitted(env, "Split me five ways.", "--max-nodes", "4")["tree_id"]
    text = cli(env, "show", tid, "0").stdout
    assert re.search(r"^created_at: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", text, re.M)
    assert re.search(r"^- clamped: node budget allowed 3 of 5", text, re.M)
    assert not re.search(r"\d{10}\.\d", text)
    assert "['" not in text


def test_piped_output_is_not_wrapped(emb) -> None:
    task = "A long task " + "with many words " * 12 + ". This includes one part, and another."
    tid = submitted(emb, task)["tree_id"]
    view = cli(emb, "tree", tid).stdout
    assert max(len(line) for line in view.splitlines()) > 120
    assert all(not line.startswith(" ") or "──" in line for line in view.splitlines()[1:-1])


def test_event_lines_are_in_order(emb) -> None:
    env = {**emb, "TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_OFFLINE_LATENCY": "0-0.05"}
    out = cli(env, "submit", "Order matters.", "--max-depth", "2")
    lines = out.stdout.split("--- result ---")[0].splitlines()
    events = [line for line in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    stamps = [line[:12] for line in events]
    assert len(events) > 40
    assert stamps == sorted(stamps)
    for node in ("0", "0.1", "0.2"):
        mine = [line.split(f" node {node} ", 1)[1] for line in events if f" node {node} " in line]
        deciding = next(i for i, m in enumerate(mine) if m.startswith("deciding"))
        decided = next(i for i, m in enumerate(mine) if m.startswith("decided"))
        assert mine[0] == "queued", mine
        assert deciding < decided, mine
    leaf = [line.split(" node 0.1.1 ", 1)[1] for line in events if " node 0.1.1 " in line]
    assert leaf[0] == "queued", leaf
    assert leaf[1].startswith(
        "decided execute (depth limit: decision call skipped), executing worker="
    ), leaf


def test_the_python_api_runs_the_readme_example(emb) -> None:
    code = (
        "import tasktree\n"
        "tree = tasktree.submit('Plan a launch. This includes pricing, and channels.')\n"
        "print(tree.status, len(tree.nodes))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=emb, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "completed 3", out.stderr


def test_ctrl_c_in_the_python_api_interrupts_at_once(emb) -> None:
    env = {**emb, "TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_OFFLINE_LATENCY": "0.5"}
    code = (
        "import tasktree\n"
        "try:\n"
        "    tasktree.submit('Slow work.')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert out.strip() == "interrupted"
    assert "Traceback" not in err
    assert time.monotonic() - started < 5
    [tree] = cli_json(emb, "list")
    assert tree["status"] == "interrupted"


def test_dot_env_is_read_for_tasktree_settings(emb, tmp_path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / ".env").write_text("TASKTREE_MAX_DEPTH=0\n")
    out = subprocess.run(
        [sys.executable, "-m", "tasktree", "submit", THREE_PARTS, "--json"],
        cwd=work,
        env={k: v for k, v in emb.items() if k != "TASKTREE_ENV_FILE"},  # the real default
        capture_output=True,
        text=True,
        timeout=60,
    )
    tree = json.loads(out.stdout)
    assert tree["max_depth"] == 0
    assert len(tree["nodes"]) == 1


def test_a_worker_says_where_it_listens_and_logs_transitions_at_info(env, tmp_path) -> None:
    quiet = {k: v for k, v in env.items() if k != "TASKTREE_REDIS_URL"}
    default = WorkerProcess({**quiet}, "plain@%h", tmp_path, ["--loglevel", "WARNING"])
    try:
        default.wait_for_log("tasktree worker plain@")
    finally:
        default.stop()
    text = default.log.read_text()
    assert "starting: broker redis://127.0.0.1:6379/0" in text
    assert "TASKTREE_REDIS_URL is not set" in text

    worker = WorkerProcess(env, "info@%h", tmp_path)  # --loglevel INFO
    try:
        worker.wait_ready()
        tree = cli_json({**os.environ, **env}, "submit", THREE_PARTS)
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert f"starting: broker {env['TASKTREE_REDIS_URL']}" in log
    assert re.search(r"tasktree worker info@\S+ ready$", log, re.M)
    assert f"tree {tree['tree_id']} node 0 decided delegate into 3 sub-tasks" in log
    assert f"tree {tree['tree_id']} node 0.2 completed" in log
    for queue in (env["TASKTREE_NODE_QUEUE"], env["TASKTREE_SYNTH_QUEUE"]):
        assert re.search(
            rf"\.> {re.escape(queue)}\s+exchange={re.escape(queue)}\(direct\) key={re.escape(queue)}$",
            log,
            re.M,
        )
