"""Operating trees: the event stream, cost and token budgets, cancellation, the CLI views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tasktree.client import Client
from tasktree.models import NODE_TERMINAL, TreeSpec
from tests.helpers import ROOT

RUNNING = {"deciding", "executing", "synthesizing"}


def cli(env, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "tasktree", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_event_stream_is_ordered_and_complete(client, start_workers) -> None:
    start_workers(2, extra_env={"TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_OFFLINE_LATENCY": "0.02"})
    tid = client.submit(TreeSpec.build(client.settings, "Map the field.", max_depth=2))
    tree = client.wait(tid)
    events = client.store.events(tid)
    ids = [eid for eid, _ in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert events[0][1]["tree"] == "running"
    assert events[-1][1]["tree"] == "completed"
    per_node: dict[str, list[str]] = {}
    for _, ev in events:
        if "node" in ev:
            per_node.setdefault(ev["node"], []).append(ev["status"])
    assert set(per_node) == {n.id for n in tree.nodes}
    assert len(tree.nodes) == 13
    for n in tree.nodes:
        seen = per_node[n.id]
        assert seen[0] == "queued"
        assert seen[-1] == n.status == "completed"
        assert sum(s in NODE_TERMINAL for s in seen) == 1  # closed exactly once
        expected = (
            ["queued", "deciding", "delegated", "synthesizing", "completed"] if n.children else None
        )
        if expected:
            assert [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]] == expected
    # Each node's parent was delegated before the child was queued.
    order = [(ev.get("node"), ev.get("status")) for _, ev in events]
    for n in tree.nodes[1:]:
        assert order.index((n.parent_id, "delegated")) < order.index((n.id, "queued"))


def test_cost_budget_stops_new_calls_and_keeps_results(settings_for, start_workers) -> None:
    # The submitter knows the price too: a budget it cannot price is refused at submit.
    client = Client(settings_for(input_cost_per_token=0.0001, output_cost_per_token=0.0002))
    start_workers(
        1,
        extra_env={
            "TASKTREE_OFFLINE_FANOUT": "3",
            "TASKTREE_CONCURRENCY": "1",
            "TASKTREE_INPUT_COST_PER_TOKEN": "0.0001",
            "TASKTREE_OUTPUT_COST_PER_TOKEN": "0.0002",
        },
    )
    full = client.wait(client.submit(TreeSpec.build(client.settings, "Price me.", max_depth=2)))
    assert full.status == "completed"
    assert not full.cost_unknown
    assert full.cost_usd > 0
    budget = full.cost_usd / 2
    tree = client.wait(
        client.submit(TreeSpec.build(client.settings, "Price me.", max_depth=2, max_cost=budget))
    )
    assert tree.status == "budget_exhausted"
    assert tree.calls < full.calls
    assert all(n.terminal for n in tree.nodes)
    exhausted = [n for n in tree.nodes if n.status == "budget_exhausted"]
    assert exhausted
    assert all(any("budget spent" in x for x in n.notes) for n in exhausted)
    # Completed leaves' outputs survive in the parents' kept results.
    done = [n for n in tree.nodes if n.status == "completed" and not n.children]
    assert done
    assert all(n.result in tree.result or n.parent_id != "0" for n in done)
    # Each call reserved its worst case before it started: the budget is never passed.
    assert tree.cost_usd <= budget


def test_token_budget(client, start_workers) -> None:
    start_workers(1, extra_env={"TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_CONCURRENCY": "1"})
    tree = client.wait(
        client.submit(TreeSpec.build(client.settings, "Count me.", max_depth=2, max_tokens=1500))
    )
    assert tree.status == "budget_exhausted"
    assert tree.cost_unknown
    assert tree.cost_usd == 0
    assert 1500 <= tree.tokens < 1500 + 1000
    assert any(n.status == "budget_exhausted" for n in tree.nodes)


def test_cancel_mid_tree_with_real_workers(env, client, start_workers) -> None:
    start_workers(
        2,
        extra_env={
            "TASKTREE_OFFLINE_FANOUT": "3",
            "TASKTREE_OFFLINE_LATENCY": "0.3",
            "TASKTREE_CONCURRENCY": "4",
        },
    )
    tid = client.submit(TreeSpec.build(client.settings, "Take your time.", max_depth=3))
    deadline = time.monotonic() + 30
    while client.tree(tid, with_nodes=False).done < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    out = cli(env, "cancel", tid)
    assert out.returncode == 0
    assert out.stdout.strip() == f"{tid} cancelling"
    tree = client.wait(tid)
    assert tree.status == "cancelled"
    assert all(n.terminal for n in tree.nodes)
    assert tree.calls < 13 * 2 + 27  # a whole tree of this shape makes 53 calls
    statuses = {n.status for n in tree.nodes}
    assert "cancelled" in statuses
    assert "completed" in statuses
    events = [ev for _, ev in client.store.events(tid)]
    at = next(i for i, ev in enumerate(events) if ev.get("tree") == "cancelling")
    assert not [ev for ev in events[at:] if ev.get("status") in RUNNING], (
        "a model call started after cancel"
    )
    assert cli(env, "cancel", tid).stdout.strip() == f"{tid} cancelled"


def test_cli_views_watch_list_show_export(env, client, start_workers, tmp_path) -> None:
    start_workers(1, extra_env={"TASKTREE_OFFLINE_LATENCY": "0.05"})
    task = "Write a guide. This includes setup, usage, and troubleshooting."
    out = cli(env, "submit", task, "--no-wait")
    assert out.returncode == 0
    tid = out.stdout.strip()
    watch = cli(env, "watch", tid)  # not a terminal: plain event lines, then the tree's exit status
    assert watch.returncode == 0, watch.stderr
    lines = watch.stdout.splitlines()
    assert lines[0].endswith("tree running")
    assert lines[-1].endswith("tree completed")
    assert any(" node 0.3 completed" in line for line in lines)
    again = cli(env, "watch", tid)  # attaching to a finished tree replays and exits at once
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1].endswith("tree completed")
    status = cli(env, "status", tid)
    assert f"tree {tid}  completed  nodes done 4 / total 4" in status.stdout
    listing = cli(env, "list", "--json")
    assert [t["tree_id"] for t in json.loads(listing.stdout)] == [tid]
    show = cli(env, "show", tid, "0", "--json")
    node = json.loads(show.stdout)
    assert node["decision"] == "delegate"
    assert node["deliveries"] >= 2
    assert len(node["context_keys"]) == 3
    assert node["calls"] == 2
    assert node["prompt_tokens"] > 0
    assert node["cost_unknown"] is True
    md = tmp_path / "tree.md"
    assert cli(env, "export", tid, "--format", "markdown", "-o", str(md)).returncode == 0
    doc = md.read_text()
    assert doc.index("## Task") < doc.index("## Result") < doc.index("## The tree")
    for n in client.tree(tid).nodes:
        assert f"### {n.id} · " in doc
        assert n.result.splitlines()[0] in doc
    data = json.loads(cli(env, "export", tid, "--format", "json").stdout)
    assert data["tree_id"] == tid
    assert len(data["nodes"]) == 4
    result = cli(env, "result", tid)
    assert result.returncode == 0
    assert "Synthesis of 3 parts" in result.stdout
