"""Bad input, table-driven: a one-line error and exit status 2 (CLI), or a node failed with the
reason (raw task messages); either way nothing else in Redis changes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
import redis

from tasktree.cli import main
from tasktree.models import TreeSpec
from tasktree.proto import TaskRequest, to_dict
from tests.helpers import ROOT

UNKNOWN = "0000000000000000"
LONG = "x" * 20_001


def snapshot(r: redis.Redis) -> dict[str, str]:
    """A digest of every key and value in the test database, but a worker's live index (what
    it holds right now, a heartbeat record that lists each message it receives)."""
    return {
        key: hashlib.sha256(r.dump(key) or b"").hexdigest()
        for key in r.keys("*")
        if not key.startswith("tasktree:live:")
    }


CLI_CASES = [
    ("empty task", ["submit", ""], {}, "task is empty"),
    ("blank task", ["submit", "   \n\t "], {}, "task is empty"),
    ("over-long task", ["submit", LONG], {}, "the limit is 20000"),
    ("control character", ["submit", "hello\x07world"], {}, "control character"),
    ("escape sequence", ["submit", "\x1b[31mred"], {}, "control character"),
    ("blank persona", ["submit", "t", "--persona", " "], {}, "persona is empty"),
    ("over-long persona", ["submit", "t", "--persona", "p" * 4001], {}, "the limit is 4000"),
    ("negative depth", ["submit", "t", "--max-depth", "-1"], {}, "--max-depth"),
    ("zero children", ["submit", "t", "--max-children", "0"], {}, "--max-children"),
    ("zero nodes", ["submit", "t", "--max-nodes", "0"], {}, "--max-nodes"),
    ("absurd nodes", ["submit", "t", "--max-nodes", "99999999999"], {}, "--max-nodes"),
    ("absurd depth", ["submit", "t", "--max-depth", "1000"], {}, "--max-depth"),
    ("word for a number", ["submit", "t", "--max-depth", "deep"], {}, "whole number"),
    ("zero cost", ["submit", "t", "--max-cost", "0"], {}, "--max-cost"),
    ("negative cost", ["submit", "t", "--max-cost", "-5"], {}, "--max-cost"),
    ("zero tokens", ["submit", "t", "--max-tokens", "0"], {}, "--max-tokens"),
    ("bad failure mode", ["submit", "t", "--on-child-failure", "explode"], {}, "invalid choice"),
    ("unknown command", ["frobnicate"], {}, "invalid choice"),
    ("missing task", ["submit"], {}, "no task: give it as an argument"),
    (
        "task file missing",
        ["submit", "--file", "/nonexistent/task.txt"],
        {},
        "cannot read /nonexistent/task.txt",
    ),
    ("task and file", ["submit", "t", "--file", "/etc/hostname"], {}, "not both"),
    ("zero limit", ["list", "--limit", "0"], {}, "--limit: must be from 1 to 10000"),
    ("negative limit", ["list", "--limit", "-2"], {}, "--limit: must be from 1 to 10000"),
    ("huge limit", ["list", "--limit", "99999999999999999999"], {}, "--limit: must be from 1"),
    ("zero timeout", ["watch", UNKNOWN, "--timeout", "0"], {}, "--timeout: must be greater than 0"),
    ("resume unknown tree", ["resume", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("unknown tree: tree", ["tree", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("unknown tree: result", ["result", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("unknown tree: status", ["status", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("unknown tree: cancel", ["cancel", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("unknown tree: export", ["export", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("unknown tree: watch", ["watch", UNKNOWN], {}, f"no tree {UNKNOWN}"),
    ("malformed tree id", ["tree", "../../etc/passwd"], {}, "invalid tree id"),
    ("key injection", ["tree", "*"], {}, "invalid tree id"),
    ("malformed node id", ["show", UNKNOWN, "0;FLUSHALL"], {}, "invalid node id"),
    ("unknown node", ["show", UNKNOWN, "0.9"], {}, "no node 0.9"),
    (
        "malformed Redis URL",
        ["tree", UNKNOWN],
        {"TASKTREE_REDIS_URL": "http://nope"},
        "TASKTREE_REDIS_URL",
    ),
    (
        "unreachable Redis",
        ["submit", "t"],
        {"TASKTREE_REDIS_URL": "redis://127.0.0.1:1/0"},
        "cannot reach Redis",
    ),
    ("bad setting", ["submit", "t"], {"TASKTREE_MAX_DEPTH": "-3"}, "TASKTREE_MAX_DEPTH"),
    (
        "bad latency setting",
        ["submit", "t"],
        {"TASKTREE_OFFLINE_LATENCY": "fast"},
        "TASKTREE_OFFLINE_LATENCY",
    ),
    ("bad limit", ["list", "--limit", "x"], {}, "whole number"),
    (
        "provider key missing",
        ["submit", "t"],
        {"TASKTREE_MODEL": "openai/gpt-4o-mini", "OPENAI_API_KEY": ""},
        "model openai/gpt-4o-mini needs OPENAI_API_KEY",
    ),
    (
        "API server unreachable",
        ["submit", "t"],
        {"TASKTREE_MODEL": "openai/local", "TASKTREE_API_BASE": "http://127.0.0.1:1/v1"},
        "cannot reach TASKTREE_API_BASE=http://127.0.0.1:1/v1",
    ),
    ("unknown model", ["submit", "t", "--model", "no-such-model-xyz"], {}, "unknown model"),
    (
        "cost budget on an unpriced model",
        ["submit", "t", "--max-cost", "0.5"],
        {},
        "--max-cost cannot be enforced: the offline model has no price",
    ),
    ("bad export format", ["export", UNKNOWN, "--format", "pdf"], {}, "invalid choice"),
]


@pytest.mark.parametrize(
    ("args", "extra_env", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_bad_input(env, r, args, extra_env, message, monkeypatch, capsys) -> None:
    """The CLI's own entry, in-process (test_newcomer and test_ctrl_c run it as a process)."""
    before = snapshot(r)
    for k, v in {**env, **extra_env}.items():
        if v == "":  # "" removes a variable
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    code = main(args)
    captured = capsys.readouterr()
    out = subprocess.CompletedProcess(args, code, captured.out, captured.err)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("tasktree: error: "), out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    assert snapshot(r) == before


def test_invalid_utf8_task(env, r) -> None:
    before = snapshot(r)
    out = subprocess.run(
        [sys.executable.encode(), b"-m", b"tasktree", b"submit", b"caf\xff\xfe"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert b"not valid UTF-8" in out.stderr
    assert b"Traceback" not in out.stderr
    assert snapshot(r) == before


@pytest.mark.integration
def test_no_wait_needs_a_shared_redis(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TASKTREE_REDIS_URL"}
    env["TASKTREE_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "tasktree", "submit", "t", "--no-wait"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--no-wait needs TASKTREE_REDIS_URL" in out.stderr


def test_unwritable_export_path(env, r, client, start_workers) -> None:
    start_workers(1)
    tid = client.submit(TreeSpec.build(client.settings, "Say hi."))
    client.wait(tid)
    out = subprocess.run(
        [sys.executable, "-m", "tasktree", "export", tid, "-o", "/proc/nope/x.md"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "cannot write /proc/nope/x.md" in out.stderr


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_raw_messages_that_do_not_validate(env, r, client, start_workers) -> None:
    """Malformed task messages: rejected once (never redelivered); a message that names a real
    node fails that node with the reason; nothing else changes."""
    start_workers(1)
    tid = client.store.create_tree(TreeSpec.build(client.settings, "a real tree"))
    app = client.app
    good = TaskRequest(
        task_id=f"{tid}/0", persona_prompt="p", task_instructions="i", tree_id=tid, node_id="0"
    )
    unnamed = [
        "not an object",
        ["a", "list"],
        {"task_instructions": 5},
        {"depth": "deep", "tree_id": UNKNOWN, "node_id": "0"},
        {**to_dict(good), "tree_id": UNKNOWN, "unknown": 1},
        {**to_dict(good), "tree_id": "NOT-HEX"},
        {**to_dict(good), "tree_id": UNKNOWN},  # well-formed, but no such tree: dropped
    ]
    before = snapshot(r)
    results = [app.send_task("tasktree.node", args=[p]) for p in unnamed]
    wait_for(lambda: all(r.exists(f"celery-task-meta-{x.id}") for x in results))
    wait_for(lambda: not r.exists("unacked", "unacked_index"))  # acked (in batches, 0.1 s)
    stored = {k: v for k, v in ((k, r.get(k)) for k in r.keys("celery-task-meta-*"))}
    for k in stored:
        r.delete(k)
    assert snapshot(r) == before
    # Names a real node, but the persona is empty: that node fails with the reason.
    app.send_task("tasktree.node", args=[{**to_dict(good), "persona_prompt": ""}])
    wait_for(lambda: client.store.node(tid, "0").status == "failed")
    node = client.store.node(tid, "0")
    assert "invalid message" in node.error
    assert "persona_prompt is empty" in node.error
    assert client.store.tree(tid).status == "failed"
    assert r.llen(env["TASKTREE_NODE_QUEUE"]) == 0  # nothing left to redeliver
