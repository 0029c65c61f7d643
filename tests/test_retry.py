"""Surgical retry: an ended tree runs again in place, only what has no result plus the
syntheses above it, and every model call it makes is counted."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest

from tasktree import keys
from tasktree.control import Control
from tasktree.errors import InputError
from tasktree.models import Tree, TreeSpec
from tasktree.settings import load
from tasktree.store import Store
from tests.terminal import cli, cli_json, embedded_env, stop_embedded

FANOUT = 3


def fresh_calls(depth: int, max_depth: int) -> int:
    """The calls of a node that starts from nothing: a leaf executes; above the depth limit
    a node decides, its children run, and it synthesizes."""
    if depth >= max_depth:
        return 1
    return 1 + FANOUT * fresh_calls(depth + 1, max_depth) + 1


def calls_to_finish(tree: Tree, max_depth: int) -> int:
    """What a retry of every unfinished node must pay, from what the tree stored: a node
    without a decision starts from nothing, one with a stored decision executes or
    synthesizes once, and every ancestor of a re-run node synthesizes again."""
    rerun = {n.id for n in tree.nodes if n.status != "completed"}
    reopen = set(rerun)
    for nid in rerun:
        while "." in nid:
            nid = keys.parent_id(nid)
            reopen.add(nid)
    return sum(
        fresh_calls(n.depth, max_depth) if not n.decision else 1
        for n in tree.nodes
        if n.id in reopen
    )


@pytest.fixture
def data_dir(tmp_path: Path):
    d = tmp_path / "data"
    yield d
    stop_embedded(d)


def partly_failed(data_dir: Path) -> Tree:
    """A tree in which some node failed before deciding and some leaf failed executing. Which
    calls fail is a hash of the prompt and the seed: the first seed that gives both is used,
    so a change of prompt text does not break the test."""
    for seed in range(1, 40):
        failing = embedded_env(
            data_dir,
            TASKTREE_OFFLINE_FANOUT=str(FANOUT),
            TASKTREE_OFFLINE_FAIL="0.15",
            TASKTREE_OFFLINE_SEED=str(seed),
        )
        doc = cli_json(failing, "submit", "Plan a launch.", "--max-depth", "2")
        tree = Tree.model_validate({**doc, "id": doc["tree_id"]})
        failed = [n for n in tree.nodes if n.status == "failed"]
        if (
            tree.status == "completed_with_errors"
            and any(not n.decision for n in failed)
            and any(n.decision == "execute" for n in failed)
        ):
            return tree
    raise AssertionError("no seed from 1 to 39 failed both a decision and a leaf")


def test_retry_on_the_embedded_default_pays_only_for_what_failed(data_dir: Path) -> None:
    before = partly_failed(data_dir)
    expected = calls_to_finish(before, max_depth=2)

    healthy = embedded_env(data_dir, TASKTREE_OFFLINE_FANOUT=str(FANOUT))
    after = cli_json(healthy, "retry", before.id)
    assert after["status"] == "completed"
    assert after["tree_id"] == before.id
    assert after["calls"] - before.calls == expected
    nodes = {n["id"]: n for n in after["nodes"]}
    assert len(nodes) == 1 + FANOUT + FANOUT**2
    for old in before.nodes:
        new = nodes[old.id]
        if old.status == "completed" and not new["attempts"]:
            assert new["result"] == old.result  # reused, not recomputed
            assert new["calls"] == old.calls
    replaced = [a for n in nodes.values() for a in n["attempts"]]
    assert {a["status"] for a in replaced} >= {"failed"}
    assert all(a["why"] == "retry of the unfinished nodes" for a in replaced)

    retried = next(
        nid
        for nid, n in nodes.items()
        if n["attempts"][:1] and n["attempts"][0]["status"] == "failed"
    )
    shown = cli(healthy, "show", before.id, retried)
    assert shown.returncode == 0, shown.stderr
    assert "- failed: tasktree-offline/placeholder: a planned failure" in shown.stdout
    assert "retry of the unfinished nodes)" in shown.stdout
    drawn = cli(healthy, "tree", before.id).stdout
    assert f"{retried} " in drawn
    assert "attempt 2" in drawn

    again = cli(healthy, "retry", before.id)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"tasktree: error: tree {before.id} completed: every node has its result; "
        "name the nodes to run again"
    )


def test_retry_of_named_nodes_with_a_bigger_budget_on_real_workers(client, start_workers) -> None:
    start_workers(1, extra_env={"TASKTREE_OFFLINE_FANOUT": str(FANOUT)})
    spec = TreeSpec.build(client.settings, "Plan a launch.", max_depth=2, max_tokens=2500)
    short = client.wait(client.submit(spec))
    assert short.status == "budget_exhausted"
    with pytest.raises(InputError, match=r"has no node 0\.9"):
        client.retry(short.id, ["0.9"])

    reopened = client.retry(short.id, ["0.1", "0.2"], max_tokens=10**9)
    assert reopened[0] == "0"
    assert {"0.1", "0.2"} <= set(reopened)
    assert not {"0.3", "0.3.1"} & set(reopened)
    after = client.wait(short.id)
    assert after.max_tokens == 10**9
    nodes = {n.id: n for n in after.nodes}
    old = {n.id: n for n in short.nodes}
    for nid in ("0.1", "0.2"):
        assert nodes[nid].attempts[-1]["why"] == "retry of 0.1, 0.2"
        assert nodes[nid].attempts[-1]["status"] == old[nid].status
    untouched = [n for n in short.nodes if n.id not in reopened]
    assert untouched
    for n in untouched:
        assert nodes[n.id].status == n.status
        assert nodes[n.id].calls == n.calls
    assert all(nodes[nid].status == "completed" for nid in reopened)


def test_retry_is_refused_for_trees_that_have_not_ended_and_reopens_the_keys() -> None:
    store = Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None, tree_ttl=60))
    control = Control(store)
    queues = ("q", "q.synth")
    tid = store.create_tree(TreeSpec(task="t", max_depth=2, max_children=4, max_nodes=20))
    with pytest.raises(InputError, match="is running, not ended"):
        control.retry(tid, [], queues)
    control.interrupt(tid)
    with pytest.raises(InputError, match="interrupted: continue it with tasktree resume"):
        control.retry(tid, [], queues)
    control.settle(tid)  # ended: cancelled, every key given the TTL
    assert store.r.ttl(keys.tree(tid)) > 0
    assert control.retry(tid, [], queues, {"max_nodes": 30}) == ["0"]
    tree = store.tree(tid)
    assert (tree.status, tree.max_nodes, tree.done) == ("running", 30, 0)
    assert store.r.hget(keys.tree(tid), "cancelled") == "0"
    assert tree.nodes[0].status == "queued"
    assert tree.nodes[0].attempts[0]["status"] == "cancelled"
    assert all(store.r.ttl(k) == -1 for k in store.r.keys(f"tasktree:{{{tid}}}:*"))


def test_a_tree_that_ended_on_its_budget_continues_when_the_budget_is_raised(
    data_dir: Path,
) -> None:
    env = embedded_env(data_dir, TASKTREE_OFFLINE_FANOUT=str(FANOUT))
    first = cli_json(env, "submit", "Plan a launch.", "--max-depth", "2", "--max-tokens", "2500")
    assert first["status"] == "budget_exhausted"
    before = Tree.model_validate({**first, "id": first["tree_id"]})
    stopped = {n.id for n in before.nodes if n.status == "budget_exhausted"}
    assert stopped
    no_cost = cli(env, "budget", before.id, "--add-cost", "1")
    assert no_cost.returncode == 2
    assert "has no cost budget to raise" in no_cost.stderr
    no_worker = cli(env, "budget", before.id, "--add-tokens", "5000", "--no-wait")
    assert no_worker.returncode == 2
    assert no_worker.stderr.strip() == (
        "tasktree: error: --no-wait needs TASKTREE_REDIS_URL and running workers"
    )
    assert cli_json(env, "tree", before.id)["max_tokens"] == 2500  # nothing half-done

    after = cli_json(env, "budget", before.id, "--add-tokens", "5000")
    assert after["status"] == "completed"
    assert after["max_tokens"] == 7500
    # Only what the budget stopped runs: each stopped node's step and the syntheses above it.
    assert after["calls"] - before.calls == calls_to_finish(before, max_depth=2)
    nodes = {n["id"]: n for n in after["nodes"]}
    for old in before.nodes:
        if old.status == "completed" and not nodes[old.id]["attempts"]:  # not re-synthesized
            assert nodes[old.id]["result"] == old.result
            assert nodes[old.id]["calls"] == old.calls
    assert {nid for nid, n in nodes.items() if n["attempts"]} >= stopped


def test_raising_a_running_trees_budget_is_one_atomic_step() -> None:
    store = Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None))
    control = Control(store)
    spec = TreeSpec(task="t", max_depth=2, max_children=4, max_nodes=19_999, max_tokens=100)
    tid = store.create_tree(spec)
    assert control.raise_budget(tid, {"max_nodes": 90_000, "max_tokens": 50, "max_depth": 30}) == (
        "running"
    )
    tree = store.tree(tid, with_nodes=False)
    assert (tree.max_nodes, tree.max_tokens, tree.max_depth) == (100_000, 150, 20)  # capped
    assert store.events(tid)[-1][1]["note"] == (
        "budget raised: max_nodes=100000 max_tokens=150 max_depth=20"
    )
    with pytest.raises(InputError, match="no cost budget"):
        control.raise_budget(tid, {"max_cost": 1.0})
    with pytest.raises(InputError, match="at least one of"):
        control.raise_budget(tid, {})
