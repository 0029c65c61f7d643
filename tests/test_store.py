"""The tree store's own logic on fakeredis (with Lua): creation, budgets, transitions, events."""

from __future__ import annotations

import threading

import fakeredis
import pytest

from tasktree import keys
from tasktree.errors import InputError
from tasktree.models import TreeSpec
from tasktree.settings import load
from tasktree.store import Store, check_node_id, check_tree_id


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None))


def spec(**kw) -> TreeSpec:
    base = {"task": "t", "max_depth": 3, "max_children": 6, "max_nodes": 60}
    return TreeSpec(**{**base, **kw})


def subs(n: int) -> list[dict[str, str]]:
    return [{"requested_persona": f"p{i}", "task_details": f"d{i}"} for i in range(n)]


def test_create_tree_writes_tree_root_index_and_events(store: Store) -> None:
    tid = store.create_tree(spec(task="the task"))
    tree = store.tree(tid)
    assert tree.status == "running" and tree.reserved == 1
    assert [n.id for n in tree.nodes] == ["0"]
    assert tree.root.instructions == "the task" and tree.root.status == "queued"
    assert store.r.zscore(keys.TREES, tid) is not None
    assert [e.get("tree") or e.get("status") for _, e in store.events(tid)] == ["running", "queued"]


def test_all_keys_of_a_tree_share_its_hash_tag(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    tree_keys = [k for k in store.r.keys("*") if k not in (keys.TREES, keys.RUNNING)]
    assert tree_keys and all(f"{{{tid}}}" in k for k in tree_keys)


def test_decide_creates_children_and_is_written_once(store: Store) -> None:
    tid = store.create_tree(spec())
    decision, children = store.decide(tid, "0", "delegate", "broad", subs(3), ["n1"], "w")
    assert decision == "delegate" and children == ["0.1", "0.2", "0.3"]
    again = store.decide(tid, "0", "execute", "other", [], [], "w")
    assert again == ("delegate", ["0.1", "0.2", "0.3"])  # the stored decision wins
    tree = store.tree(tid)
    assert tree.reserved == 4
    assert [n.persona for n in tree.nodes[1:]] == ["p0", "p1", "p2"]
    assert all(n.depth == 1 and n.parent_id == "0" for n in tree.nodes[1:])
    assert tree.root.status == "delegated" and tree.root.notes == ["n1"]


def test_node_budget_clamps_children(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=4))
    _, children = store.decide(tid, "0", "delegate", "r", subs(6), [], "w")
    assert children == ["0.1", "0.2", "0.3"]
    root = store.node(tid, "0")
    assert any("node budget allowed 3 of 6" in n for n in root.notes)


def test_fewer_than_two_children_left_means_execute(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=2))
    decision, children = store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    assert (decision, children) == ("execute", [])
    assert store.tree(tid).reserved == 1


def test_node_budget_holds_under_parallel_deciders(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=20))
    _, level1 = store.decide(tid, "0", "delegate", "r", subs(6), [], "w")
    barrier = threading.Barrier(len(level1))

    def decide(nid: str) -> None:
        barrier.wait()
        store.decide(tid, nid, "delegate", "r", subs(6), [], "w")

    threads = [threading.Thread(target=decide, args=(n,)) for n in level1]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tree = store.tree(tid)
    assert tree.reserved == len(tree.nodes) <= 20
    assert len(tree.nodes) >= 19  # the budget was used, not just respected


def test_gate_claims_once_and_reports_busy_done_cancelled(store: Store) -> None:
    tid = store.create_tree(spec())
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"
    busy = store.gate(tid, "0", "decide", "b", "deciding", "w")
    assert busy.verdict == "BUSY" and int(busy.detail) > 0
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"  # holder again
    store.decide(tid, "0", "execute", "r", [], [], "w")
    assert store.gate(tid, "0", "decide", "b", "deciding", "w").verdict == "DONE"
    store.cancel(tid)
    assert store.gate(tid, "0", "execute", "b", "executing", "w").verdict == "CANCELLED"


def test_gate_stops_calls_when_cost_or_token_budget_is_spent(store: Store) -> None:
    tid = store.create_tree(spec(max_cost=0.01, max_tokens=1000))
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"
    store.record_call(tid, "0", "decide", "m", 100, 50, 0.004, True, 0.1)
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"
    store.record_call(tid, "0", "decide", "m", 100, 50, 0.007, True, 0.1)
    g = store.gate(tid, "0", "decide", "a", "deciding", "w")
    assert (g.verdict, g.detail) == ("EXHAUSTED", "cost")
    tid2 = store.create_tree(spec(max_tokens=100))
    store.record_call(tid2, "0", "decide", "m", 80, 20, 0.0, False, 0.1)
    g = store.gate(tid2, "0", "decide", "a", "deciding", "w")
    assert (g.verdict, g.detail) == ("EXHAUSTED", "tokens")
    tree = store.tree(tid2)
    assert tree.cost_unknown and tree.tokens == 100 and tree.root.lat_decide == pytest.approx(0.1)


def test_finish_is_once_and_root_closes_tree_with_derived_status(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    assert store.finish(tid, "0.1", "completed", result="a") == "OK"
    assert store.finish(tid, "0.1", "failed", error="late") == "ALREADY"
    store.finish(tid, "0.2", "failed", error="boom")
    assert store.tree(tid).status == "running"
    store.finish(tid, "0", "completed", result="synth")
    tree = store.tree(tid)
    assert tree.status == "completed_with_errors" and tree.result == "synth"
    assert tree.nodes[1].result == "a" and tree.nodes[2].error == "boom"
    assert [e.get("tree") for _, e in store.events(tid)][-1] == "completed_with_errors"


def test_cancel_closes_queued_nodes_at_once_and_keeps_results(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    store.gate(tid, "0.1", "decide", "a", "deciding", "w")
    store.finish(tid, "0.2", "completed", result="kept")
    assert store.cancel(tid) == "cancelling"
    tree = store.tree(tid)
    statuses = {n.id: n.status for n in tree.nodes}
    assert statuses == {"0": "delegated", "0.1": "deciding", "0.2": "completed", "0.3": "cancelled"}
    assert tree.nodes[2].result == "kept"
    assert store.cancel(tid) == "cancelling"  # idempotent


def test_events_follow_every_state_change_in_order(store: Store) -> None:
    tid = store.create_tree(spec())
    store.gate(tid, "0", "decide", "a", "deciding", "w")
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.finish(tid, "0.1", "completed", result="x")
    store.finish(tid, "0.2", "completed", result="y")
    store.gate(tid, "0", "synthesize", "a", "synthesizing", "w")
    store.finish(tid, "0", "completed", result="z", step="synthesize")
    seen = [(e.get("node"), e.get("status") or e.get("tree")) for _, e in store.events(tid)]
    assert seen == [
        (None, "running"),
        ("0", "queued"),
        ("0", "deciding"),
        ("0", "delegated"),
        ("0.1", "queued"),
        ("0.2", "queued"),
        ("0.1", "completed"),
        ("0.2", "completed"),
        ("0", "synthesizing"),
        ("0", "completed"),
        (None, "completed"),
    ]
    # Every event's state is the stored state at that point: the last per node is the current.
    tree = store.tree(tid)
    last = {}
    for node, status in seen:
        if node:
            last[node] = status
    assert last == {n.id: n.status for n in tree.nodes}


def test_delete_tree_leaves_nothing(store: Store) -> None:
    tid = store.create_tree(spec())
    store.delete_tree(tid)
    assert store.r.keys("*") == []


@pytest.mark.parametrize("bad", ["", "zz", "0" * 15, "../etc", "1a20a2d82ab4e9cZ"])
def test_tree_ids_are_checked_before_use(bad: str) -> None:
    with pytest.raises(InputError):
        check_tree_id(bad)


@pytest.mark.parametrize("bad", ["", "1", "0.0", "0..1", "0.1.", "0.a", "0.12345"])
def test_node_ids_are_checked_before_use(bad: str) -> None:
    with pytest.raises(InputError):
        check_node_id(bad)


def test_sweeper_finds_quiet_trees_and_due_syntheses(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.finish(tid, "0.1", "completed", result="a")
    assert store.stalled_trees(quiet_for=60) == []  # it just moved
    assert store.stalled_trees(quiet_for=-1) == [tid]
    assert store.orphaned_parents(tid) == []  # 0.2 still open
    store.finish(tid, "0.2", "failed", error="x")
    assert store.orphaned_parents(tid) == ["0"]
    store.finish(tid, "0", "completed", result="s")
    assert store.stalled_trees(quiet_for=-1) == [] and store.r.zcard(keys.RUNNING) == 0
