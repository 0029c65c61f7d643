"""Sibling dependencies: a sub-task that depends on siblings starts when they are done and
gets their results as context; the rest of the fan-out runs in parallel as before."""

from __future__ import annotations

import json

from tasktree import agent
from tasktree.models import TreeSpec
from tests.test_agent import decide, scripted


def test_then_orders_siblings_and_hands_results_on(client, start_workers) -> None:
    start_workers(1, extra_env={"TASKTREE_OFFLINE_LATENCY": "0.3"})
    task = "Build a site. This includes a design, then the code, and the docs."
    tree = client.wait(client.submit(TreeSpec.build(client.settings, task)))
    assert tree.status == "completed"
    nodes = {n.id: n for n in tree.nodes}
    design, code, docs = nodes["0.1"], nodes["0.2"], nodes["0.3"]
    assert (design.after, code.after, docs.after) == ([], ["0.1"], [])
    assert code.started_at
    assert design.finished_at
    assert code.started_at >= design.finished_at  # it waited for the design
    assert docs.started_at
    assert docs.started_at < design.finished_at
    assert code.context_keys == ["0.1 You are an expert in design."]
    assert sorted(k.split()[0] for k in nodes["0"].context_keys) == ["0.1", "0.2", "0.3"]
    assert tree.calls == 1 + 3 + 3 + 1  # decisions, parts, synthesis: none spent on waiting


def plan_with(depends: list[list[int]]) -> agent.Plan:
    subs = [
        {"requested_persona": f"p{i}", "task_details": f"t{i}", "depends_on": d}
        for i, d in enumerate(depends, 1)
    ]
    call, _ = scripted(json.dumps({"decision": "delegate", "reason": "", "sub_tasks": subs}))
    return decide(call)


def test_dependencies_are_checked_and_bad_ones_run_in_parallel() -> None:
    plan = plan_with([[], [1], [1, 2]])
    assert [s.get("after") for s in plan.sub_tasks] == [None, [1], [1, 2]]
    assert plan.notes == []
    cycle = plan_with([[3], [1], [2]])
    assert all("after" not in s for s in cycle.sub_tasks)
    assert cycle.notes == ["invalid dependencies (a cycle): running them in parallel"]
    out_of_range = plan_with([[], [7]])
    assert all("after" not in s for s in out_of_range.sub_tasks)
    assert out_of_range.notes == ["invalid dependencies (no sub-task 7): running them in parallel"]
    assert plan_with([[2], []]).sub_tasks[0]["after"] == [2]  # an earlier one may wait too
    assert "after" not in plan_with([[1], []]).sub_tasks[0]  # on itself: nothing to wait for
