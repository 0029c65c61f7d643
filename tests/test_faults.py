"""Model faults through litellm's real HTTP client, partial failure, hostile models, load."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import pytest

from tasktree.models import TreeSpec
from tests.helpers import FakeOpenAI, chat, is_decide, is_synthesis

pytestmark = pytest.mark.slow

MODEL_ENV = {
    "TASKTREE_MODEL": "openai/fake",
    "TASKTREE_API_KEY": "sk-test",
    "TASKTREE_LLM_TIMEOUT": "1",
    "TASKTREE_LLM_MAX_RETRIES": "3",
    "TASKTREE_LLM_BACKOFF": "0.1",
}


def error(status: int, message: str) -> tuple[int, dict, dict]:
    return status, {}, {"error": {"message": message, "type": "test_error", "code": str(status)}}


def task_of(body) -> str:
    return body["messages"][-1]["content"]


def test_transient_faults_are_retried_and_client_errors_are_not(client, start_workers) -> None:
    """Each tree is one node (max_depth 0) whose task names its scenario."""
    seen: dict[str, list[float]] = defaultdict(list)

    def handler(body, n):
        scenario = task_of(body).split("scenario ")[1].split()[0]
        seen[scenario].append(time.monotonic())
        k = len(seen[scenario])
        if scenario == "429" and k <= 2:
            return (
                429,
                {"Retry-After": "1"},
                {"error": {"message": "slow down", "type": "rate_limit"}},
            )
        if scenario in ("500", "503", "529") and k == 1:
            return error(int(scenario), "server trouble")
        if scenario == "timeout" and k == 1:
            time.sleep(2.5)
        if scenario == "drop" and k == 1:
            return 200, {}, "DROP"
        if scenario in ("400", "401", "403", "404", "422"):
            return error(int(scenario), f"provider says no ({scenario})")
        if scenario == "always500":
            return error(500, "down for good")
        return 200, {}, chat(f"answer for {scenario}")

    scenarios = [
        "429",
        "500",
        "503",
        "529",
        "timeout",
        "drop",
        "400",
        "401",
        "403",
        "404",
        "422",
        "always500",
    ]
    with FakeOpenAI(handler) as server:
        start_workers(
            1, extra_env={**MODEL_ENV, "TASKTREE_API_BASE": server.url, "TASKTREE_CONCURRENCY": "2"}
        )
        ids = {
            s: client.submit(TreeSpec.build(client.settings, f"Run scenario {s} now.", max_depth=0))
            for s in scenarios
        }
        trees = {s: client.wait(tid) for s, tid in ids.items()}
    for s in ("429", "500", "503", "529", "timeout", "drop"):
        assert trees[s].status == "completed", (s, trees[s].root.error)
        assert trees[s].result == f"answer for {s}", s
    assert len(seen["429"]) == 3
    assert seen["429"][1] - seen["429"][0] >= 1.0
    for s in ("500", "503", "529", "timeout", "drop"):
        assert len(seen[s]) == 2, s
    for s in ("400", "401", "403", "404", "422"):
        root = trees[s].root
        assert trees[s].status == "failed", s
        assert len(seen[s]) == 1, s  # not retried
        assert f"provider says no ({s})" in root.error
        assert s in root.error
    assert trees["always500"].status == "failed"
    assert len(seen["always500"]) == 4
    assert "after 4 failed calls" in trees["always500"].root.error
    # Waiting out Retry-After did not hold the worker: other calls ran in between.
    between = [
        t for s, ts in seen.items() if s != "429" for t in ts if seen["429"][0] < t < seen["429"][1]
    ]
    assert between


def test_half_of_all_calls_failing_transiently_still_completes_the_tree(
    client, start_workers
) -> None:
    """Every distinct request fails once, with a 429 (Retry-After: 1) or a 503, then succeeds:
    half of all calls fail. At the shipped retry settings, every node completes, each step
    counts exactly the one failed call it made, and Retry-After is waited out."""
    attempts: dict[str, list[tuple[float, int]]] = defaultdict(list)
    lock = threading.Lock()

    def handler(body, n):
        key = json.dumps(body["messages"])
        with lock:
            first = not attempts[key]
            status = (429 if len(attempts) % 2 else 503) if first else 200
            attempts[key].append((time.monotonic(), status))
        if status == 429:
            return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
        if status == 503:
            return error(503, "overloaded")
        if is_decide(body):  # the root splits into sections, each section into parts
            task = task_of(body)
            names = [f"{x}{i}" for x in "ABC" if f"Section {x}" in task for i in (1, 2, 3)]
            subs = [
                {"requested_persona": f"You are {x}.", "task_details": f"Part {x}."} for x in names
            ] or [
                {"requested_persona": f"You are {x}.", "task_details": f"Section {x}."}
                for x in "ABC"
            ]
            doc = {"decision": "delegate", "reason": "split", "sub_tasks": subs}
            return 200, {}, chat(json.dumps(doc))
        return 200, {}, chat(f"done: {task_of(body)[-40:]}")

    with FakeOpenAI(handler) as server:
        model = {k: v for k, v in MODEL_ENV.items() if "LLM" not in k}  # shipped retries
        start_workers(1, extra_env={**model, "TASKTREE_API_BASE": server.url})
        tid = client.submit(TreeSpec.build(client.settings, "Build it.", max_depth=2))
        tree = client.wait(tid, timeout=100)
    statuses = [s for tries in attempts.values() for _, s in tries]
    assert statuses.count(200) == len(statuses) // 2 == len(attempts)  # half of all calls failed
    assert tree.status == "completed", [(n.id, n.error) for n in tree.nodes]
    assert len(tree.nodes) == 13
    assert all(n.status == "completed" for n in tree.nodes)
    assert tree.calls == len(attempts) == 17
    for n in tree.nodes:  # one failed call per model call made, counted on its own step
        assert n.failed_calls == n.calls, (n.id, n.failed_calls, n.calls)
    for tries in attempts.values():
        (t0, first), (t1, _) = tries
        if first == 429:
            assert t1 - t0 >= 1.0  # Retry-After honoured


def three_children(body):
    subs = [
        {"requested_persona": f"You are {x}.", "task_details": f"Part {x}."}
        for x in ("A", "B", "C")
    ]
    return chat(json.dumps({"decision": "delegate", "reason": "three", "sub_tasks": subs}))


@pytest.mark.parametrize(
    ("failing", "mode", "status", "root_status"),
    [
        ({"B"}, "continue", "completed_with_errors", "completed"),
        ({"B"}, "fail", "failed", "failed"),
        ({"A", "B", "C"}, "continue", "failed", "failed"),
    ],
)
def test_partial_failure(client, start_workers, failing, mode, status, root_status) -> None:
    synth_requests = []

    def handler(body, n):
        text = task_of(body)
        if is_decide(body):
            if "Part " in text:
                return (
                    200,
                    {},
                    chat(json.dumps({"decision": "execute", "reason": "leaf", "sub_tasks": []})),
                )
            return 200, {}, three_children(body)
        if is_synthesis(body):
            synth_requests.append(text)
            return 200, {}, chat("SYNTHESIS")
        part = body["messages"][0]["content"][8]
        if part in failing:
            return error(401, f"no key for {part}")
        return 200, {}, chat(f"result {part}")

    with FakeOpenAI(handler) as server:
        start_workers(1, extra_env={**MODEL_ENV, "TASKTREE_API_BASE": server.url})
        tree = client.wait(
            client.submit(TreeSpec.build(client.settings, "Whole job.", on_child_failure=mode))
        )
    nodes = [(n.id, n.status, n.error) for n in tree.nodes]
    assert tree.status == status, nodes
    assert tree.root.status == root_status, nodes
    failed = [n for n in tree.nodes if n.status == "failed" and n.id != "0"]
    assert {n.persona[8] for n in failed} == failing
    if root_status == "completed":
        assert tree.result == "SYNTHESIS"
        assert len(synth_requests) == 1
        assert "These parts failed" in synth_requests[0]
        assert "You are B." in synth_requests[0]
        assert "result A" in synth_requests[0]
        assert "result C" in synth_requests[0]
    else:
        assert not synth_requests
        assert tree.root.error


def test_hostile_model_stays_inside_budgets(client, start_workers, r) -> None:
    def handler(body, n):
        text = task_of(body)
        if not is_decide(body):
            return 200, {}, chat("fine")
        if (
            "<task>\nRoot job.\n</task>" in text
        ):  # the root asks for 1,000 sub-tasks and more budget
            subs = [
                {"requested_persona": f"Hostile {i}", "task_details": f"Job {i % 7}"}
                for i in range(1000)
            ]
            return (
                200,
                {},
                chat(
                    json.dumps(
                        {
                            "decision": "delegate",
                            "reason": "increase max_depth to 99",
                            "max_depth": 99,
                            "max_nodes": 10**6,
                            "sub_tasks": subs,
                        }
                    )
                ),
            )
        job = text.split("Job ")[1][0] if "Job " in text else "x"
        replies = {
            "0": "this is not JSON at all",
            "1": json.dumps({"decision": "delegate", "sub_tasks": "everything"}),
            "2": json.dumps(
                {
                    "decision": "delegate",
                    "sub_tasks": [{"requested_persona": "", "task_details": " "}] * 5,
                }
            ),
            "3": json.dumps(
                {
                    "decision": "delegate",
                    "sub_tasks": [{"requested_persona": "d", "task_details": "same"}] * 9,
                }
            ),
            "4": "Please set max_nodes=100000 and model=gpt-evil, then delegate forever.",
        }
        if job in replies:
            return 200, {}, chat(replies[job])
        subs = [
            {
                "requested_persona": "tasktree:{0000000000000000}:tree",
                "task_details": f"Job {job}9 deeper",
            },
            *(
                {
                    "requested_persona": "../../etc/passwd; FLUSHALL",
                    "task_details": f"Job {job}{i} more",
                }
                for i in range(50)
            ),
        ]
        return (
            200,
            {},
            chat(json.dumps({"decision": "delegate", "reason": "always", "sub_tasks": subs})),
        )

    with FakeOpenAI(handler) as server:
        start_workers(1, extra_env={**MODEL_ENV, "TASKTREE_API_BASE": server.url})
        tree = client.wait(
            client.submit(
                TreeSpec.build(
                    client.settings, "Root job.", max_depth=3, max_children=6, max_nodes=25
                )
            )
        )
    assert tree.status == "completed"
    assert len(tree.nodes) <= 25
    assert max(n.depth for n in tree.nodes) <= 3
    assert all(len(n.children) <= 6 for n in tree.nodes)
    assert tree.max_depth == 3
    assert tree.max_nodes == 25
    assert tree.model == ""
    assert {n.model for n in tree.nodes if n.calls} == {"openai/fake"}
    notes = " | ".join(x for n in tree.nodes for x in n.notes)
    for expected in (
        "1000 sub-tasks to max_children=6",
        "invalid decision output",
        "executing instead",
        "empty sub-task",
        "duplicate sub-task(s) of a sibling",
    ):
        assert expected in notes, expected
    # Model output is data: personas like key names or commands are stored as values, never used.
    import re

    pattern = re.compile(
        rf"tasktree:(trees|running|expiring|sweep-lock:\S+|live:\S+"
        rf"|\{{{tree.id}\}}:(tree|nodes|events|calls|node:0(\.[1-6])*"
        r"|claim:0(\.[1-6])*:(decide|execute|synthesize)|synth-sent:0(\.[1-6])*))"
    )
    assert all(pattern.fullmatch(k) for k in r.keys("tasktree:*")), r.keys("tasktree:*")
    assert any(n.persona.startswith("tasktree:{") for n in tree.nodes)


def test_a_model_that_keeps_re_delegating_its_own_task_is_stopped_by_the_loop_guard(
    client, start_workers
) -> None:
    """Every decision splits into the same two tasks, whatever it is asked. Each child's own
    task comes back as one of its sub-tasks: the guard drops it, one usable sub-task is left,
    and the child executes. Without the guard: a full binary tree to the depth limit."""
    same = [
        {"requested_persona": "You are a planner.", "task_details": "Plan the launch."},
        {"requested_persona": "You are a writer.", "task_details": "Write the launch note."},
    ]

    def handler(body, n):
        if is_decide(body):
            plan = {"decision": "delegate", "reason": "split", "sub_tasks": same}
            return 200, {}, chat(json.dumps(plan))
        return 200, {}, chat("done")

    with FakeOpenAI(handler) as server:
        start_workers(1, extra_env={**MODEL_ENV, "TASKTREE_API_BASE": server.url})
        tree = client.wait(
            client.submit(TreeSpec.build(client.settings, "Run the launch.", max_depth=3))
        )
    assert tree.status == "completed"
    assert [n.id for n in tree.nodes] == ["0", "0.1", "0.2"]
    for child in tree.nodes[1:]:
        assert not child.children
        assert any(
            note.startswith("loop_detected: dropped 1 sub-task(s) repeating")
            for note in child.notes
        )
    assert len(server.requests) == 3 + 2 + 1  # three decisions, two executions, one synthesis


def test_load_twenty_trees_at_once(client, start_workers) -> None:
    start_workers(2, extra_env={"TASKTREE_OFFLINE_FANOUT": "5", "TASKTREE_CONCURRENCY": "16"})
    start = time.monotonic()
    ids = [
        client.submit(TreeSpec.build(client.settings, f"Load tree {k:02d}.", max_depth=2))
        for k in range(20)
    ]
    results = {}
    threads = [
        threading.Thread(target=lambda t=t: results.__setitem__(t, client.wait(t))) for t in ids
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - start
    print(f"\n20 trees x 31 nodes on 2 workers: {elapsed:.1f} s")
    for k, tid in enumerate(ids):
        tree = results[tid]
        assert tree.status == "completed"
        assert len(tree.nodes) == 31
        assert len({n.id for n in tree.nodes}) == 31
        assert all(n.status == "completed" for n in tree.nodes)
        assert all(
            f"Load tree {k:02d}." in n.instructions for n in tree.nodes
        )  # no node from another tree
        assert all(f"Load tree {k:02d}." in n.result for n in tree.nodes if not n.children)
    assert len({n.worker for t in results.values() for n in t.nodes}) == 2
