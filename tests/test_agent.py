"""The agent's decision handling over a scripted model: repair, fallback, clamping, cleaning."""

from __future__ import annotations

import json

from tasktree import agent
from tasktree.models import Reply


def scripted(*texts: str):
    calls: list[tuple[str, list[dict[str, str]], bool]] = []

    def call(step: str, messages: list[dict[str, str]], json_mode: bool) -> Reply:
        calls.append((step, messages, json_mode))
        return Reply(texts[len(calls) - 1], "m", 1, 1, 0.0, False, 0.0)

    return call, calls


def decide(call, **kw):
    return agent.decide(
        call,
        "persona",
        "task",
        max_children=kw.get("max_children", 4),
        persona_limit=100,
        task_limit=200,
        single_call=kw.get("single", False),
        lineage=kw.get("lineage", set),
    )


def delegation(n: int, **extra) -> str:
    subs = [{"requested_persona": f"p{i}", "task_details": f"d{i}"} for i in range(n)]
    return json.dumps({"decision": "delegate", "reason": "r", "sub_tasks": subs, **extra})


def test_valid_delegation_in_json_mode() -> None:
    call, calls = scripted(delegation(3))
    plan = decide(call)
    assert plan.decision == "delegate"
    assert [s["task_details"] for s in plan.sub_tasks] == [
        "d0",
        "d1",
        "d2",
    ]
    assert calls[0][2] is True
    assert calls[0][0] == "decide"


def test_code_fenced_json_is_accepted() -> None:
    call, _ = scripted("```json\n" + delegation(2) + "\n```")
    assert decide(call).decision == "delegate"


def test_malformed_output_gets_one_repair() -> None:
    call, calls = scripted("I think we should split it", delegation(2))
    plan = decide(call)
    assert plan.decision == "delegate"
    assert len(calls) == 2
    assert "asked for a repair" in plan.notes[0]
    assert calls[1][1][-2]["content"] == "I think we should split it"


def test_repair_failure_falls_back_to_execute() -> None:
    call, calls = scripted("nope", json.dumps({"decision": "maybe"}))
    plan = decide(call)
    assert plan.decision == "execute"
    assert len(calls) == 2
    assert "executing instead" in plan.notes[-1]


def test_wrong_shape_is_invalid() -> None:
    call, _ = scripted(json.dumps({"decision": "delegate", "sub_tasks": [{"persona": 1}]}), "x")
    plan = decide(call)
    assert plan.decision == "execute"
    assert "wrong shape" in plan.notes[0]


def test_thousand_sub_tasks_are_clamped() -> None:
    call, _ = scripted(delegation(1000))
    plan = decide(call, max_children=5)
    assert len(plan.sub_tasks) == 5
    assert any("1000 sub-tasks to max_children=5" in n for n in plan.notes)


def test_empty_and_duplicate_sub_tasks_are_dropped() -> None:
    subs = [
        {"requested_persona": "a", "task_details": "x"},
        {"requested_persona": "a", "task_details": "x"},
        {"requested_persona": "b", "task_details": "  "},
        {"requested_persona": "c", "task_details": "y"},
    ]
    call, _ = scripted(json.dumps({"decision": "delegate", "reason": "", "sub_tasks": subs}))
    plan = decide(call)
    assert [s["task_details"] for s in plan.sub_tasks] == ["x", "y"]
    assert any("empty" in n for n in plan.notes)
    assert any("duplicate" in n for n in plan.notes)


def test_one_usable_sub_task_means_execute() -> None:
    call, _ = scripted(delegation(1))
    plan = decide(call)
    assert plan.decision == "execute"
    assert "1 usable" in plan.notes[-1]


def test_requests_for_bigger_budgets_are_just_text() -> None:
    hostile = delegation(3, max_depth=99, max_nodes=100000, model="gpt-evil")
    call, _ = scripted(hostile)
    plan = decide(call, max_children=2)
    # Only a persona and a task survive per sub-task, and the clamp to 2 is recorded; the
    # budget fields the model asked for reach nothing.
    assert plan.sub_tasks == [
        {"requested_persona": "p0", "task_details": "d0"},
        {"requested_persona": "p1", "task_details": "d1"},
    ]
    assert plan.notes == ["clamped: 3 sub-tasks to max_children=2"]


def test_overlong_sub_tasks_are_trimmed() -> None:
    subs = [
        {"requested_persona": "p" * 500, "task_details": "d" * 500},
        {"requested_persona": "q", "task_details": "e"},
    ]
    call, _ = scripted(json.dumps({"decision": "delegate", "sub_tasks": subs}))
    plan = decide(call)
    assert len(plan.sub_tasks[0]["requested_persona"]) == 100
    assert len(plan.sub_tasks[0]["task_details"]) == 200


def test_single_call_answer_is_kept() -> None:
    call, calls = scripted(json.dumps({"decision": "execute", "answer": "42", "sub_tasks": []}))
    plan = decide(call, single=True)
    assert plan.answer == "42"
    assert calls[0][1][0]["content"].startswith("[tasktree:single]")


def test_assemble_keeps_every_child_result() -> None:
    text = agent.assemble("obj", {"0.1 a": "A!"}, {"0.2 b": "boom"}, "tree cancelled")
    assert "A!" in text
    assert "boom" in text
    assert "obj" in text


def test_a_sub_task_repeating_this_node_or_an_ancestor_is_a_loop() -> None:
    subs = [
        {"requested_persona": "You are a Planner", "task_details": "plan  the launch"},
        {"requested_persona": "You are a writer.", "task_details": "Write the note."},
        {"requested_persona": "You are an editor.", "task_details": "Edit the note."},
    ]
    call, _ = scripted(json.dumps({"decision": "delegate", "reason": "", "sub_tasks": subs}))
    lineage = {agent.same_task_key("You are a planner.", "Plan the launch.")}
    plan = decide(call, lineage=lambda: lineage)
    assert [s["task_details"] for s in plan.sub_tasks] == ["Write the note.", "Edit the note."]
    assert plan.notes == [
        "loop_detected: dropped 1 sub-task(s) repeating this node's or an ancestor's"
    ]
