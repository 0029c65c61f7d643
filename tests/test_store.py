"""The tree store's own logic on fakeredis (with Lua): creation, budgets, transitions, events."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import fakeredis
import pytest

from tasktree import keys
from tasktree.connection import connect
from tasktree.control import Control
from tasktree.errors import FencedError, InputError
from tasktree.keys import check_node_id, check_tree_id
from tasktree.models import Reply, TreeSpec
from tasktree.recovery import Recovery
from tasktree.settings import load
from tasktree.states import NodeStatus, Step, TreeStatus, lua_prelude
from tasktree.store import CallRecord, Gate, Store
from tests.helpers import record_call


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
    assert tree.status == "running"
    assert tree.reserved == 1
    assert [n.id for n in tree.nodes] == ["0"]
    assert tree.root.instructions == "the task"
    assert tree.root.status == "queued"
    assert store.r.zscore(keys.TREES, tid) is not None
    assert [e.get("tree") or e.get("status") for _, e in store.events(tid)] == ["running", "queued"]


def test_all_keys_of_a_tree_share_its_hash_tag(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    tree_keys = [k for k in store.r.keys("*") if k not in (keys.TREES, keys.RUNNING)]
    assert tree_keys
    assert all(f"{{{tid}}}" in k for k in tree_keys)


def test_decide_creates_children_and_is_written_once(store: Store) -> None:
    tid = store.create_tree(spec())
    decision, children, fresh = store.decide(tid, "0", "delegate", "broad", subs(3), ["n1"], "w")
    assert (decision, children, fresh) == ("delegate", ["0.1", "0.2", "0.3"], True)
    again = store.decide(tid, "0", "execute", "other", [], [], "w")
    assert again == ("delegate", ["0.1", "0.2", "0.3"], False)  # the stored decision wins
    tree = store.tree(tid)
    assert tree.reserved == 4
    assert [n.persona for n in tree.nodes[1:]] == ["p0", "p1", "p2"]
    assert all(n.depth == 1 and n.parent_id == "0" for n in tree.nodes[1:])
    assert tree.root.status == "delegated"
    assert tree.root.notes == ["n1"]


def test_results_read_what_a_synthesis_needs_and_skip_missing_nodes(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "broad", subs(3), [], "w")
    store.finish(tid, "0.1", NodeStatus.COMPLETED, result="one")
    store.finish(tid, "0.3", NodeStatus.FAILED, error="boom")
    results = store.results(tid, ["0.1", "0.2", "0.3", "0.9"])
    assert [tuple(r) for r in results] == [
        ("0.1", "p0", "completed", "one", ""),
        ("0.2", "p1", "queued", "", ""),
        ("0.3", "p2", "failed", "", "boom"),
    ]
    assert [(r.label, r.terminal) for r in results] == [
        ("0.1 p0", True),
        ("0.2 p1", False),
        ("0.3 p2", True),
    ]


def test_node_budget_clamps_children(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=4))
    _, children, _ = store.decide(tid, "0", "delegate", "r", subs(6), [], "w")
    assert children == ["0.1", "0.2", "0.3"]
    root = store.node(tid, "0")
    assert any("node budget allowed 3 of 6" in n for n in root.notes)


def test_fewer_than_two_children_left_means_execute(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=2))
    decision, children, _ = store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    assert (decision, children) == ("execute", [])
    assert store.tree(tid).reserved == 1


def test_node_budget_holds_under_parallel_deciders(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=20))
    _, level1, _ = store.decide(tid, "0", "delegate", "r", subs(6), [], "w")
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
    claim = keys.claim(tid, "0", "decide")
    assert store.r.get(claim) == "a"
    assert 0 < store.r.pttl(claim) <= store.settings.lease_seconds * 1000
    busy = store.gate(tid, "0", "decide", "b", "deciding", "w")
    assert busy.verdict == "BUSY"
    assert int(busy.detail) > 0
    store.r.pexpire(claim, 50)
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"  # holder again
    assert store.r.pttl(claim) > 50  # a lease anew
    store.decide(tid, "0", "execute", "r", [], [], "w")
    assert store.gate(tid, "0", "decide", "b", "deciding", "w").verdict == "DONE"
    Control(store).cancel(tid)
    assert store.gate(tid, "0", "execute", "b", "executing", "w").verdict == "CANCELLED"


def test_gate_stops_calls_when_cost_or_token_budget_is_spent(store: Store) -> None:
    tid = store.create_tree(spec(max_cost=0.01, max_tokens=1000))
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"
    record_call(store, tid, "0", "decide", "m", 100, 50, 0.004, True, 0.1, token="a")
    assert store.gate(tid, "0", "decide", "a", "deciding", "w").verdict == "OK"
    record_call(store, tid, "0", "decide", "m", 100, 50, 0.007, True, 0.1, token="a")
    g = store.gate(tid, "0", "decide", "a", "deciding", "w")
    assert (g.verdict, g.detail) == ("EXHAUSTED", "cost budget")
    tid2 = store.create_tree(spec(max_tokens=100))
    record_call(store, tid2, "0", "decide", "m", 80, 20, 0.0, False, 0.1)
    g = store.gate(tid2, "0", "decide", "a", "deciding", "w")
    assert (g.verdict, g.detail) == ("EXHAUSTED", "token budget")
    assert not store.r.exists(keys.claim(tid2, "0", "decide"))  # a refusal holds no claim
    assert store.r.get(keys.claim(tid, "0", "decide")) == "a"  # nor drops one held before
    tree = store.tree(tid2)
    assert tree.cost_unknown
    assert tree.tokens == 100
    assert tree.root.lat_decide == pytest.approx(0.1)


def test_finish_is_once_and_root_closes_tree_with_derived_status(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    assert store.finish(tid, "0.1", "completed", result="a") == "OK"
    assert store.finish(tid, "0.1", "failed", error="late") == "ALREADY"
    store.finish(tid, "0.2", "failed", error="boom")
    assert store.tree(tid).status == "running"
    store.finish(tid, "0", "completed", result="synth")
    tree = store.tree(tid)
    assert tree.status == "completed_with_errors"
    assert tree.result == "synth"
    assert tree.nodes[1].result == "a"
    assert tree.nodes[2].error == "boom"
    assert [e.get("tree") for _, e in store.events(tid)][-1] == "completed_with_errors"


def test_cancel_closes_queued_nodes_at_once_and_keeps_results(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    store.gate(tid, "0.1", "decide", "a", "deciding", "w")
    store.finish(tid, "0.2", "completed", result="kept")
    assert Control(store).cancel(tid) == "cancelling"
    tree = store.tree(tid)
    statuses = {n.id: n.status for n in tree.nodes}
    assert statuses == {"0": "delegated", "0.1": "deciding", "0.2": "completed", "0.3": "cancelled"}
    assert tree.nodes[2].result == "kept"
    assert Control(store).cancel(tid) == "cancelling"  # idempotent


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


def test_delete_takes_the_nodes_a_decision_adds_while_it_lists_them(store, monkeypatch) -> None:
    tid = store.create_tree(spec())
    listed = []
    of_tree = keys.of_tree

    def decide_meanwhile(tree_id: str, ids: list[str]) -> list[str]:
        listed.append(list(ids))
        if len(listed) == 1:  # a worker stores the root's decision right after the listing
            store.decide(tid, "0", "delegate", "broad", subs(2), [], "w")
        return of_tree(tree_id, ids)

    monkeypatch.setattr(keys, "of_tree", decide_meanwhile)
    freed = store.delete_tree(tid)
    assert listed == [["0"], ["0", "0.1", "0.2"]]  # the first try was abandoned
    assert store.r.keys("*") == []
    assert freed.keys > 4


@pytest.mark.parametrize(
    "bad", ["", "zz", "0" * 15, "../etc", "1a20a2d82ab4e9cZ", "1a20a2d82ab4e9c0\n"]
)
def test_tree_ids_are_checked_before_use(bad: str) -> None:
    with pytest.raises(InputError):
        check_tree_id(bad)


@pytest.mark.parametrize("bad", ["", "1", "0.0", "0..1", "0.1.", "0.a", "0.12345", "0\n", "0.1\n"])
def test_node_ids_are_checked_before_use(bad: str) -> None:
    with pytest.raises(InputError):
        check_node_id(bad)


def test_recovery_finds_quiet_trees_and_due_syntheses(store: Store) -> None:
    recovery = Recovery(store)
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.finish(tid, "0.1", "completed", result="a")
    assert recovery.quiet_trees(quiet_for=60) == ([], [])  # it just moved
    assert recovery.quiet_trees(quiet_for=-1) == ([tid], [])
    assert recovery.stuck(tid, redrive_after=0).due == []  # 0.2 still open
    store.finish(tid, "0.2", "failed", error="x")
    assert recovery.stuck(tid, redrive_after=0).due == ["0"]
    store.finish(tid, "0", "completed", result="s")
    assert recovery.quiet_trees(quiet_for=-1) == ([], [tid])
    recovery.forget([tid])
    assert store.r.zcard(keys.RUNNING) == 0


def snapshot(store: Store) -> dict[str, bytes | None]:
    return {k: store.r.dump(k) for k in store.r.keys("*")}


def test_recovery_queries_do_not_write(store: Store) -> None:
    recovery = Recovery(store)
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    before = snapshot(store)
    assert recovery.quiet_trees(quiet_for=-1) == ([tid], [])
    stuck = recovery.stuck(tid, redrive_after=0)
    assert [n.id for n in stuck.lost] == ["0.1", "0.2"]
    assert snapshot(store) == before
    recovery.mark_redriven(tid, stuck.lost)  # the write, named as one
    assert recovery.stuck(tid, redrive_after=60).lost == []


@pytest.mark.integration
def test_recovery_uses_redis_clock_not_the_workers(r, redis_url, monkeypatch) -> None:
    """A worker whose clock runs an hour ahead must not see a tree that just moved as quiet
    (a real Redis: fakeredis answers TIME from Python's clock)."""
    store = Store(connect(redis_url), load(redis_url=None))
    recovery = Recovery(store)
    tid = store.create_tree(spec())
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert recovery.quiet_trees(quiet_for=60) == ([], [])
    assert store.tree(tid).status == "running"


def test_trees_of_another_queue_are_left_to_their_own_workers(store: Store) -> None:
    other = Store(store.r, load(redis_url=None, node_queue="qb"))
    tid = other.create_tree(spec())
    assert Recovery(other).quiet_trees(quiet_for=-1) == ([tid], [])
    assert Recovery(store).quiet_trees(quiet_for=-1) == ([], [])


def test_release_deletes_only_its_own_claim(store: Store) -> None:
    tid = store.create_tree(spec())
    assert store.gate(tid, "0", "decide", "mine", "deciding", "w").verdict == "OK"
    store.r.set(keys.claim(tid, "0", "decide"), "theirs")  # my lease ran out; another took it
    store.release(tid, "0", "decide", "mine")
    assert store.r.get(keys.claim(tid, "0", "decide")) == "theirs"
    store.release(tid, "0", "decide", "theirs")
    assert store.r.get(keys.claim(tid, "0", "decide")) is None


def test_interrupt_stops_the_gate_and_resume_clears_abandoned_claims(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    assert store.gate(tid, "0.1", "decide", "lost", "deciding", "w").verdict == "OK"
    for token in ("r1", "r2", "r3"):  # runs that died with their process
        store.begin_run(tid, "0.1", token)
    assert Control(store).interrupt(tid) == "interrupted"
    assert store.gate(tid, "0.2", "decide", "t", "deciding", "w").verdict == "INTERRUPTED"
    assert Control(store).resume(tid) == 3  # the root and both children are open
    tree = store.tree(tid)
    assert tree.status == "running"
    assert tree.queue == store.settings.node_queue
    assert store.r.get(keys.claim(tid, "0.1", "decide")) is None
    assert store.r.hget(keys.node(tid, "0.1"), "open_runs") == "0"
    with pytest.raises(InputError, match="not interrupted"):
        Control(store).resume(tid)


def test_settle_ends_a_cancelling_tree_keeping_what_finished(store: Store) -> None:
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.finish(tid, "0.1", "completed", result="kept")
    Control(store).cancel(tid)
    assert Control(store).settle(tid) == "cancelled"
    tree = store.tree(tid)
    assert tree.status == "cancelled"
    assert tree.done == 3
    assert {n.id: n.status for n in tree.nodes} == {
        "0": "cancelled",
        "0.1": "completed",
        "0.2": "cancelled",
    }
    assert store.node(tid, "0.1").result == "kept"


def test_lua_gets_the_status_sets_from_states() -> None:
    from importlib import resources

    known = {*NodeStatus, *TreeStatus, *Step, "delegate", "execute", "table"}  # + a Lua type
    prelude = lua_prelude()
    for name in ("completed", "failed", "cancelled", "budget_exhausted"):
        assert f"{name} = true" in prelude.splitlines()[1]
    assert "interrupted = true" in prelude.splitlines()[2]
    for script in resources.files("tasktree.lua").iterdir():
        if not script.name.endswith(".lua"):
            continue
        text = script.read_text()
        assert "local TERMINAL" not in text, script.name
        assert "local TREE_IDLE" not in text, script.name
        # Every literal a script compares with, assigns as a status, or stores as one.
        for word in re.findall(r"(?:[=~]= |final = |'status', )'([a-z_]+)'", text):
            assert word in known, (script.name, word)


def test_a_run_that_lost_its_claim_is_fenced_and_its_usage_is_waste(store: Store) -> None:
    tid = store.create_tree(spec())
    assert store.gate(tid, "0", "execute", "frozen", "executing", "w1").verdict == "OK"
    store.r.delete(keys.claim(tid, "0", "execute"))  # its lease ran out while it was frozen
    assert store.gate(tid, "0", "execute", "alive", "executing", "w2").verdict == "OK"
    usage = ("execute", "m", 10, 5, 0.5, True, 0.1)
    assert record_call(store, tid, "0", *usage, token="frozen", call_id="frozen:1") == 2
    assert record_call(store, tid, "0", *usage, token="alive", call_id="alive:1") == 1
    assert store.finish(tid, "0", "completed", result="late", token="frozen") == "FENCED"
    assert store.finish(tid, "0", "completed", result="on time", token="alive") == "OK"
    node, tree = store.node(tid, "0"), store.tree(tid, with_nodes=False)
    assert (node.calls, node.tokens, node.result) == (1, 15, "on time")
    assert (node.waste_calls, node.waste_tokens) == (1, 15)
    assert (tree.calls, tree.waste_calls) == (1, 1)
    assert tree.cost_usd == pytest.approx(0.5)
    assert tree.waste_cost_usd == pytest.approx(0.5)


def test_a_decision_from_a_fenced_run_is_refused(store: Store) -> None:
    tid = store.create_tree(spec())
    assert store.gate(tid, "0", "decide", "alive", "deciding", "w2").verdict == "OK"
    with pytest.raises(FencedError):
        store.decide(tid, "0", "delegate", "r", subs(2), [], "w1", token="frozen")
    assert store.decide(tid, "0", "execute", "r", [], [], "w2", token="alive") == (
        "execute",
        [],
        True,
    )


def test_a_call_is_recorded_once_when_its_script_is_sent_again(store: Store) -> None:
    tid = store.create_tree(spec())
    usage = ("decide", "m", 100, 50, 0.0, False, 0.2)
    assert record_call(store, tid, "0", *usage, token="t", call_id="t:1") == 1
    assert record_call(store, tid, "0", *usage, token="t", call_id="t:1") == 0  # a re-send
    assert store.node(tid, "0").calls == 1
    assert store.tree(tid, with_nodes=False).tokens == 150
    # The node knows its last 32 calls' ids: a re-send comes right after its first.
    for i in range(2, 40):
        assert record_call(store, tid, "0", *usage, token="t", call_id=f"t:{i}") == 1
    assert record_call(store, tid, "0", *usage, token="t", call_id="t:39") == 0
    assert record_call(store, tid, "0", *usage, token="t", call_id="t:8") == 0
    assert store.node(tid, "0").calls == 39
    ids = store.r.hget(keys.node(tid, "0"), "call_ids").split(",")
    assert len(ids) == 32
    assert ids[-1] == "0:t:39"


def test_a_failed_call_counts_once_when_its_script_is_sent_again(store: Store) -> None:
    tid = store.create_tree(spec())
    assert store.call_failed(tid, "0", "execute", "503", 0.0, call_id="t:1") == 1
    assert store.call_failed(tid, "0", "execute", "503", 0.0, call_id="t:1") == 1  # a re-send
    assert store.call_failed(tid, "0", "execute", "429", 0.0, call_id="t:2") == 2
    assert (store.node(tid, "0").failed_execute, store.node(tid, "0").failed_calls) == (2, 2)


def test_nothing_is_written_for_a_tree_that_no_longer_exists(store: Store) -> None:
    tid = store.create_tree(spec())
    store.r.flushall()  # Redis restarted without persistence
    assert record_call(store, tid, "0", "execute", "m", 1, 1, 0.0, False, 0.1, token="t") == -1
    store.end_run(tid, "0", "t")
    assert store.finish(tid, "0", "completed", result="x") == "MISSING"
    assert store.call_failed(tid, "0", "execute", "boom", 0.0) == -1
    assert store.r.keys("*") == []


def test_a_late_reply_after_the_step_was_finished_by_another_run_is_waste(store: Store) -> None:
    tid = store.create_tree(spec())
    store.gate(tid, "0", "execute", "frozen", "executing", "w1")
    store.r.delete(keys.claim(tid, "0", "execute"))  # lease expired while frozen
    store.gate(tid, "0", "execute", "alive", "executing", "w2")
    usage = ("execute", "m", 10, 5, 0.0, False, 0.1)
    assert record_call(store, tid, "0", *usage, token="alive", call_id="a:1") == 1
    assert store.finish(tid, "0", "completed", result="done", token="alive") == "OK"
    assert record_call(store, tid, "0", *usage, token="frozen", call_id="f:1") == 2  # no holder now
    node = store.node(tid, "0")
    assert (node.calls, node.waste_calls) == (1, 1)


def test_finish_records_the_call_whose_reply_it_stores_in_the_same_script(store: Store) -> None:
    tid = store.create_tree(spec(max_depth=0))
    assert store.gate(tid, "0", "execute", "t", "executing", "w").verdict == "OK"
    call = CallRecord("execute", Reply("x", "m", 10, 5, 0.25, True, 0.3), "t", "t:1")
    assert store.finish(tid, "0", "completed", result="x", token="t", call=call) == "OK"
    node, tree = store.node(tid, "0"), store.tree(tid, with_nodes=False)
    assert (node.calls, node.tokens, node.cost_usd, node.lat_execute) == (1, 15, 0.25, 0.3)
    assert (node.status, tree.status, tree.tokens, tree.cost_usd) == (
        "completed",
        "completed",
        15,
        0.25,
    )
    assert not [f for f in store.r.hkeys(keys.node(tid, "0")) if f.startswith("kept_")]
    # Sent again (its reply lost in a timeout): the call counts once and the node stays closed.
    assert store.finish(tid, "0", "completed", result="x", token="t", call=call) == "ALREADY"
    assert store.node(tid, "0").calls == 1


def test_finish_with_a_call_that_lost_its_claim_records_waste_and_closes_nothing(
    store: Store,
) -> None:
    tid = store.create_tree(spec(max_depth=0))
    store.gate(tid, "0", "execute", "frozen", "executing", "w1")
    store.r.delete(keys.claim(tid, "0", "execute"))  # its lease ran out while it was frozen
    store.gate(tid, "0", "execute", "alive", "executing", "w2")
    late = CallRecord("execute", Reply("late", "m", 10, 5, 0.0, True, 0.1), "frozen", "f:1")
    assert store.finish(tid, "0", "completed", result="late", token="frozen", call=late) == "FENCED"
    node = store.node(tid, "0")
    assert (node.status, node.calls, node.waste_calls, node.result) == ("executing", 0, 1, "")


def test_the_execute_gate_of_a_node_at_the_depth_limit_stores_its_decision(store: Store) -> None:
    tid = store.create_tree(spec(max_depth=0))
    why = ("depth limit reached", "depth limit: decision call skipped")
    assert store.gate(tid, "0", "execute", "t", "executing", "w", by_depth=why).verdict == "OK"
    node = store.node(tid, "0")
    assert (node.decision, node.reason, node.notes, node.status) == (
        "execute",
        "depth limit reached",
        ["depth limit: decision call skipped"],
        "executing",
    )
    events = [e for _, e in store.events(tid)][2:]
    assert [(e.get("decision"), e.get("note"), e["status"], e["worker"]) for e in events] == [
        ("execute", "depth limit: decision call skipped", "executing", "w"),
    ]  # one event: the decision and the step it starts


def test_the_depth_gate_sends_a_node_to_decide_when_its_limit_was_raised(store: Store) -> None:
    tid = store.create_tree(spec(max_depth=0))
    store.r.hset(keys.tree(tid), "max_depth", 1)  # `budget --add-depth` since the run began
    why = ("depth limit reached", "depth limit: decision call skipped")
    gate = store.gate(tid, "0", "execute", "t", "executing", "w", by_depth=why)
    assert gate.verdict == "UNDECIDED"
    node = store.node(tid, "0")
    assert (node.decision, node.status) == ("", "queued")
    assert not store.r.exists(keys.claim(tid, "0", "execute"))
    store.decide(tid, "0", "delegate", "broad", subs(2), [], "w")  # as the next run does
    gate = store.gate(tid, "0", "execute", "t", "executing", "w", by_depth=why)
    assert gate.verdict == "DONE"  # another run delegated it: nothing to execute


def test_begin_end_and_create_apply_once_when_sent_again(store: Store) -> None:
    """redis-py re-sends a command whose reply timed out; Redis may have run the first one."""
    tid = store.create_tree(spec())
    tree_keys = [keys.tree(tid), keys.node(tid, "0"), keys.nodes(tid), keys.events(tid)]
    assert store.script("create", tree_keys, ["{}", "{}", 0]) == 0  # the re-sent create
    assert store.r.lrange(keys.nodes(tid), 0, -1) == ["0"]
    assert len(store.events(tid)) == 2
    _, _, first = store.begin_run(tid, "0", "run-1")
    _, node, again = store.begin_run(tid, "0", "run-1")
    assert (first, again, node["deliveries"]) == (1, 1, "1")
    store.end_run(tid, "0", "run-1")
    store.end_run(tid, "0", "run-1")
    assert store.r.hget(keys.node(tid, "0"), "open_runs") == "0"


def test_a_run_reads_the_trees_settings_not_its_task_text(store: Store) -> None:
    """begin returns what a run reads of the tree, however long the task: not the text."""
    tid = store.create_tree(spec(task="T" * 20_000, max_tokens=500, on_child_failure="fail"))
    tree, node, _ = store.begin_run(tid, "0", "run-1")
    assert "task" not in tree
    assert node["instructions"] == "T" * 20_000  # the node's own, for its synthesis
    assert (tree["status"], tree["max_tokens"], tree["on_child_failure"]) == (
        "running",
        "500",
        "fail",
    )
    assert {"max_depth", "max_children", "queue", "synth_queue"} <= tree.keys()


def test_a_message_stops_being_live_when_its_heartbeat_is_a_lease_old(store: Store) -> None:
    tid = store.create_tree(spec())
    recovery = Recovery(store)
    q = recovery.queue
    beating = keys.live_member(tid, "0", "node", "tag-1")
    ended = keys.live_member(tid, "0", "synthesis", "tag-2")
    released = keys.live_member(tid, "0", "node", "tag-3")
    store.renew([], {q: [beating, ended, released]}, [], 15)  # listed on receipt
    assert recovery.dead_runs(lease_seconds=60) == []  # beat just now
    released_ = [(q, released), (q, ended)]
    assert store.renew([], {q: [beating]}, released_, 15) == 0  # no claims to extend
    assert store.r.zrange(keys.live(q), 0, -1) == [beating]
    assert recovery.dead_runs(lease_seconds=0) == [(tid, "0", "node")]  # taken, once
    assert recovery.dead_runs(lease_seconds=0) == []


def test_messages_just_received_are_listed_unchecked_and_the_next_beat_checks_them(
    store: Store,
) -> None:
    """The beat thread lists a burst as received without reading each member's node (one
    command, not one per member); a beat reads them, and takes off a closed node's member."""
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.finish(tid, "0.1", "completed", result="a")
    q = store.settings.node_queue
    closed = keys.live_member(tid, "0.1", "node", "tag-1")
    running = keys.live_member(tid, "0.2", "node", "tag-2")
    store.renew([], {q: [closed, running]}, [], 15, check=False)
    assert sorted(store.r.zrange(keys.live(q), 0, -1)) == sorted([closed, running])
    store.renew([], {q: [closed, running]}, [], 15)
    assert store.r.zrange(keys.live(q), 0, -1) == [running]


def test_the_heartbeat_lists_what_the_process_holds_and_drops_what_it_let_go(
    store: Store,
) -> None:
    from tasktree.leases import Leases

    tid = store.create_tree(spec())
    q = store.settings.node_queue
    a, b, quick = (keys.live_member(tid, "0", "node", t) for t in ("tag-a", "tag-b", "tag-q"))
    held = {(q, a), (q, b)}
    leases = Leases(store, 15, held=lambda: set(held))
    leases.stop()  # no beat thread: this test beats by hand
    leases.renew_once()
    assert sorted(store.r.zrange(keys.live(q), 0, -1)) == sorted([a, b])
    held.discard((q, a))  # e.g. a lost broker connection took a reserved message back
    leases.renew_once()
    assert store.r.zrange(keys.live(q), 0, -1) == [b]
    # Received and done between two beats: listed, then taken off at the next beat (left
    # listed, it would be a lease old at the sweeper's next look: a run to re-check).
    leases.start_run(q, quick)
    leases.renew_once()
    assert store.r.zrange(keys.live(q), 0, -1) == [b]
    # Redis restarted and lost its scripts: the beat loads them and beats.
    store.r.script_flush()
    held.add((q, a))
    leases.renew_once()
    assert sorted(store.r.zrange(keys.live(q), 0, -1)) == sorted([a, b])


def test_a_message_its_run_listed_first_costs_the_receipt_listing_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's begin lists its message: the receipt's listing, still to come, skips it (no
    round trip for a burst whose runs all began), and the beat after the run takes it off."""
    from tasktree.leases import Leases

    tid = store.create_tree(spec())
    q = store.settings.node_queue
    member = keys.live_member(tid, "0", "node", "tag-1")
    held: set[tuple[str, str]] = set()
    leases = Leases(store, 15, held=lambda: set(held))
    leases.stop()  # no beat thread: this test beats by hand
    listings: list[dict[str, list[str]]] = []
    renew = store.renew

    def counted(claims: Any, by_queue: dict[str, list[str]], *a: Any, **kw: Any) -> int:
        listings.append(by_queue)
        return renew(claims, by_queue, *a, **kw)

    monkeypatch.setattr(store, "renew", counted)
    leases.start_run(q, member)  # received
    store.begin_run(tid, "0", "run-1", (q, member))  # its run began before the beat looked
    leases.listed_by_run(q, member)
    assert store.r.zrange(keys.live(q), 0, -1) == [member]
    leases.list_received()
    assert listings == []  # nothing left to list
    leases.renew_once()  # the run is over: the process holds it no more
    assert store.r.zcard(keys.live(q)) == 0
    assert listings[-1] == {}  # the beat took it off (released), listing nothing


def test_an_ending_tree_gives_every_key_its_retention_and_late_keys_inherit_it() -> None:
    store = Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None, tree_ttl=600))
    r = store.r
    tid = store.create_tree(spec())
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.begin_run(tid, "0.1", "run-a")  # a run that never ends
    record_call(store, tid, "0.1", "decide", "m", 1, 1, 0.0, True, 0.1, call_id="c1")
    store.call_failed(tid, "0.1", "decide", "a 503", 0.0, call_id="c2")  # the failed calls' set
    store.finish(tid, "0.2", "completed", result="b")
    assert all(r.ttl(k) == -1 for k in r.keys(f"tasktree:{{{tid}}}:*"))  # running: kept
    store.finish(tid, "0", "completed", result="synth")
    tree_keys = r.keys(f"tasktree:{{{tid}}}:*")
    assert len(tree_keys) == 7  # tree, nodes, events, calls, 3 nodes (runs are in the nodes)
    assert all(0 < r.ttl(k) <= 600 for k in tree_keys)
    store.begin_run(tid, "0.2", "late")  # a straggler after the end: its writes keep the TTL
    assert 0 < r.ttl(keys.node(tid, "0.2")) <= 600


def test_settling_a_cancelled_tree_starts_its_retention_and_zero_keeps_it() -> None:
    for ttl, expect in [(60, lambda t: 0 < t <= 60), (0, lambda t: t == -1)]:
        store = Store(
            fakeredis.FakeRedis(decode_responses=True), load(redis_url=None, tree_ttl=ttl)
        )
        tid = store.create_tree(spec())
        store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
        Control(store).interrupt(tid)
        assert Control(store).settle(tid) == "cancelled"
        assert all(expect(store.r.ttl(k)) for k in store.r.keys(f"tasktree:{{{tid}}}:*"))


def test_a_budget_reservation_is_made_shrunk_refused_and_always_given_back(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=1000))
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    reserved = lambda: int(store.r.hget(keys.tree(tid), "reserved_tokens") or 0)  # noqa: E731
    # 300 prompt tokens and a cap of 4096: shrunk to the 700 left.
    gate = store.gate(tid, "0.1", "execute", "a", "executing", "w", (4096, 300, 0.0, 0.0))
    assert (gate.verdict, gate.detail, reserved()) == ("OK", "700", 1000)
    # Nothing is left for a second call racing the first, but only because the first's worst
    # case holds it: the second waits for it (its node stays open, no claim held).
    assert store.gate(tid, "0.2", "execute", "b", "executing", "w", (4096, 300, 0.0, 0.0)) == (
        Gate("RESERVED", "token budget")
    )
    assert not store.r.exists(keys.claim(tid, "0.2", "execute"))
    # The call used 300 + 50: the reservation is replaced by the actual usage.
    record_call(store, tid, "0.1", "execute", "m", 300, 50, 0.0, True, 0.1, token="a", call_id="1")
    assert reserved() == 0
    gate = store.gate(tid, "0.2", "execute", "b", "executing", "w", (100, 300, 0.0, 0.0))
    assert (gate.detail, reserved()) == ("100", 400)
    store.release(tid, "0.2", "execute", "b")  # the call failed: given back
    assert reserved() == 0
    store.gate(tid, "0.3", "execute", "c", "executing", "w", (100, 300, 0.0, 0.0))
    store.r.delete(keys.claim(tid, "0.3", "execute"))  # its run died; the lease ran out
    store.gate(tid, "0.3", "execute", "d", "executing", "w", (100, 300, 0.0, 0.0))
    assert reserved() == 400  # the dead run's reservation was given back, the new one made
    store.finish(tid, "0.3", "failed", error="boom")
    assert reserved() == 0  # a node that closes gives back what it still held


def test_a_call_waits_for_reserved_room_and_stops_only_on_a_spent_budget(store: Store) -> None:
    for budget, per_token in (({"max_tokens": 1000}, 0.0), ({"max_cost": 1.0}, 0.001)):
        tid = store.create_tree(spec(**budget))
        store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
        what = "token budget" if per_token == 0 else "cost budget"
        costs = (4096, 300, per_token, per_token)
        assert store.gate(tid, "0.1", "execute", "a", "executing", "w", costs).verdict == "OK"
        assert store.gate(tid, "0.2", "execute", "b", "executing", "w", costs) == (
            Gate("RESERVED", what)
        )
        cost = 900 * per_token  # 300 + 600 tokens used: 100 tokens' worth left, under a prompt
        record_call(store, tid, "0.1", "execute", "m", 300, 600, cost, False, 0.1, token="a")
        assert store.gate(tid, "0.2", "execute", "b", "executing", "w", costs) == (
            Gate("EXHAUSTED", what)
        )


def test_a_run_lists_its_message_in_its_first_round_trip_while_its_node_is_open(
    store: Store,
) -> None:
    tid = store.create_tree(spec())
    live = keys.live("q")
    member = keys.live_member(tid, "0", "node", "tag-1")
    store.begin_run(tid, "0", "run-1", ("q", member))
    assert store.r.zrange(live, 0, -1) == [member]
    store.r.delete(live)
    store.finish(tid, "0", "completed", result="done")
    store.begin_run(tid, "0", "run-2", ("q", member))  # a late duplicate of a closed node
    assert store.r.zcard(live) == 0


def test_the_heartbeat_lists_held_runs_of_open_nodes_only(store: Store) -> None:
    tid = store.create_tree(spec())
    live = keys.live("q")
    member = keys.live_member(tid, "0", "node", "tag-1")
    gone = keys.live_member("0123456789abcdef", "0", "node", "tag-2")
    store.renew([], {"q": [member, gone]}, [], 15.0)
    assert store.r.zrange(live, 0, -1) == [member]  # a deleted tree's run is not listed
    store.finish(tid, "0", "completed", result="done")
    # A worker that still says it holds the message (a stale request) keeps nothing listed.
    store.renew([], {"q": [member]}, [], 15.0)
    assert store.r.zcard(live) == 0


@pytest.mark.integration
def test_a_follower_gathers_the_events_that_come_while_it_waits(r, redis_url) -> None:
    """After a batch, a follower waits its gathering time before reading again: events that
    come meanwhile arrive as one batch, not one XREAD each (a real Redis for the blocking read)."""
    import threading

    store = Store(connect(redis_url), load(redis_url=None))
    tid = store.create_tree(spec())
    for gather, batches in ((1.0, 1), (0.0, 2)):
        follow = store.follow(tid, block_ms=2000, gather=gather)
        next(follow)  # every event so far
        for delay, node in ((0.1, "0.1"), (0.4, "0.2")):  # two transitions 0.3 s apart
            event = {"node": node, "status": "completed"}
            threading.Timer(delay, r.xadd, (keys.events(tid), event)).start()
        got = [next(follow)]
        while len(got) < batches:
            got.append(next(follow))
        assert [len(b) for b in got] == ([2] if batches == 1 else [1, 1])
        time.sleep(0.5)  # the timers are done before the next round
