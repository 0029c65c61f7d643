"""Whole trees on a real Redis and real `celery -A workers worker` processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tasktree.client import Client
from tasktree.models import TreeSpec
from tests.helpers import ROOT

DESIGN = (
    "Design a web application for a community library. This includes database schema, "
    "backend API design, and frontend component structure."
)


def run_tree(client: Client, task: str = DESIGN, **budgets):
    spec = TreeSpec.build(client.settings, task, **budgets)
    tid = client.submit(spec)
    return client.wait(tid)


def test_three_level_tree_completes_with_every_node_stored(client, start_workers) -> None:
    start_workers(1, extra_env={"TASKTREE_OFFLINE_FANOUT": "2"})
    tree = run_tree(client, "Plan a conference.", max_depth=2)
    assert tree.status == "completed"
    assert len(tree.nodes) == 7
    assert {n.depth for n in tree.nodes} == {0, 1, 2}
    for n in tree.nodes:
        assert n.status == "completed"
        assert n.result
        assert n.worker
        assert n.started_at
        assert n.finished_at
    leaves = [n for n in tree.nodes if n.depth == 2]
    assert all(n.decision == "execute" and "depth limit" in n.notes[0] for n in leaves)
    assert all(n.calls == 1 for n in leaves)  # no decision call at the depth limit
    inner = [n for n in tree.nodes if n.depth < 2]
    assert all(n.decision == "delegate" and n.calls == 2 for n in inner)


def test_synthesis_receives_every_childs_output(client, start_workers) -> None:
    start_workers(1)
    tree = run_tree(client)
    root = tree.root
    children = [n for n in tree.nodes if n.parent_id == "0"]
    assert len(children) == 3
    # Keyed by node id and persona, so two children with the same persona cannot collide.
    assert sorted(root.context_keys) == sorted(f"{c.id} {c.persona}" for c in children)
    for c in children:
        assert f"- {c.id} {c.persona}:" in root.result
    assert "Synthesis of 3 parts" in tree.result


def test_budgets_clamp_an_always_delegating_model(client, start_workers) -> None:
    start_workers(1, extra_env={"TASKTREE_OFFLINE_FANOUT": "5"})
    tree = run_tree(client, "anything", max_depth=2, max_children=3, max_nodes=10)
    assert tree.status == "completed"
    assert len(tree.nodes) <= 10
    assert max(n.depth for n in tree.nodes) <= 2
    assert all(len(n.children) <= 3 for n in tree.nodes)
    notes = [note for n in tree.nodes for note in n.notes]
    assert any("max_children=3" in x for x in notes)
    assert any("node budget" in x for x in notes)


def test_node_budget_holds_under_parallel_siblings(client, start_workers) -> None:
    start_workers(2, extra_env={"TASKTREE_OFFLINE_FANOUT": "6", "TASKTREE_OFFLINE_LATENCY": "0.05"})
    tree = run_tree(client, "anything", max_depth=3, max_children=6, max_nodes=25)
    assert tree.status == "completed"
    assert len(tree.nodes) == tree.reserved <= 25
    assert len({n.id for n in tree.nodes}) == len(tree.nodes)


def test_two_workers_share_a_tree_and_cli_json_reports_it(env, start_workers) -> None:
    w = start_workers(
        2,
        extra_env={
            "TASKTREE_OFFLINE_FANOUT": "4",
            "TASKTREE_OFFLINE_LATENCY": "0.1",
            "TASKTREE_CONCURRENCY": "4",
        },
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasktree",
            "submit",
            "Survey the field.",
            "--max-depth",
            "2",
            "--json",
        ],
        cwd=ROOT,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "completed"
    assert len(doc["nodes"]) == 21
    names = {x.name.replace("%h", "") for x in w}
    workers = {n["worker"] for n in doc["nodes"]}
    assert len(workers) == 2
    assert all(any(re.match(re.escape(p), wk) for p in names) for wk in workers)
    for key in (
        "id",
        "parent_id",
        "depth",
        "persona",
        "instructions",
        "status",
        "decision",
        "result",
        "error",
        "children",
        "worker",
        "started_at",
        "finished_at",
    ):
        assert key in doc["nodes"][0]


def test_single_call_mode_answers_leaves_in_one_call(client, start_workers) -> None:
    start_workers(1)
    normal = run_tree(client)
    single = run_tree(client, single_call=True)
    assert normal.status == single.status == "completed"
    leaves = lambda t: [n for n in t.nodes if not n.children]  # noqa: E731
    assert all(n.calls == 2 for n in leaves(normal))  # decide, then execute
    assert all(n.calls == 1 and n.result and n.decision == "execute" for n in leaves(single))
    assert single.calls == normal.calls - 3
    assert single.tokens < normal.tokens
