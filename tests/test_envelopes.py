"""Budget envelopes: each delegation splits the node's remaining budgets among its children;
a subtree spends no more than its envelope, and what a closed subtree left is its parent's
again. The store's logic on fakeredis; a greedy branch on real workers at the end."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from tasktree import keys
from tasktree.control import Control
from tasktree.models import TreeSpec
from tasktree.settings import load
from tasktree.store import Gate, Store
from tests.helpers import record_call
from tests.terminal import cli_json


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None))


def spec(**kw: object) -> TreeSpec:
    base: dict[str, object] = {"task": "t", "max_depth": 4, "max_children": 6, "max_nodes": 21}
    return TreeSpec.model_validate({**base, "envelopes": True, **kw})


def subs(n: int, weights: list[float] | None = None) -> list[dict[str, object]]:
    out: list[dict[str, object]] = [
        {"requested_persona": f"p{i}", "task_details": f"d{i}"} for i in range(n)
    ]
    for sub, w in zip(out, weights or [], strict=False):
        sub["weight"] = w
    return out


def call(store: Store, tid: str, nid: str, tokens: int, cap: int = 100) -> tuple[str, str]:
    """One gated call of `nid` that reserves (prompt 10, completion cap `cap`) and records
    `tokens` (10 prompt + the rest completion); returns the gate's verdict and detail."""
    g = store.gate(tid, nid, "execute", f"t-{nid}", "executing", "w", (cap, 10, 0.0, 0.0))
    if g.verdict == "OK":
        record_call(
            store,
            tid,
            nid,
            "execute",
            "m",
            10,
            tokens - 10,
            0.0,
            True,
            0.1,
            token=f"t-{nid}",
            call_id=uuid.uuid4().hex,
        )
    return g.verdict, g.detail


def test_the_root_envelope_is_the_tree_budget_and_children_split_what_is_left(
    store: Store,
) -> None:
    tid = store.create_tree(spec(max_tokens=1000, max_cost=2.0))
    root = store.node(tid, "0")
    assert (root.env_nodes, root.env_tokens, root.env_cost) == (20, 1000, 2.0)
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")
    kids = store.nodes(tid, ["0.1", "0.2", "0.3"])
    # 20 - 3 = 17 nodes below the children: 6, 6, 5. Tokens and USD: the root keeps a
    # quarter for its synthesis, the three children share the rest.
    assert [k.env_nodes for k in kids] == [6, 6, 5]
    assert [k.env_tokens for k in kids] == [250, 250, 250]
    assert [k.env_cost for k in kids] == pytest.approx([0.5, 0.5, 0.5])
    assert store.node(tid, "0").sub_nodes == 3


def test_weights_from_the_decision_set_the_shares(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=1000))
    store.decide(tid, "0", "delegate", "r", subs(2, [3, 1]), [], "w")
    kids = store.nodes(tid, ["0.1", "0.2"])
    # 18 nodes below the children; 2/3 of 1000 tokens for the children, 3:1.
    assert [k.env_nodes for k in kids] == [14, 4]
    assert [k.env_tokens for k in kids] == [500, 166]


def test_a_subtree_cannot_create_more_nodes_than_its_envelope(store: Store) -> None:
    tid = store.create_tree(spec(max_nodes=11))  # 10 below the root
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")  # 8 left: 4 and 4
    assert [n.env_nodes for n in store.nodes(tid, ["0.1", "0.2"])] == [4, 4]
    _, greedy, _ = store.decide(tid, "0.1", "delegate", "r", subs(6), [], "w")
    assert greedy == ["0.1.1", "0.1.2", "0.1.3", "0.1.4"]  # its 4, not the tree's 8
    assert any("clamped: node envelope allowed 4 of 6" in n for n in store.node(tid, "0.1").notes)
    _, fair, _ = store.decide(tid, "0.2", "delegate", "r", subs(3), [], "w")
    assert fair == ["0.2.1", "0.2.2", "0.2.3"]  # the sibling still gets its share
    tree = store.tree(tid, with_nodes=False)
    assert tree.reserved == 1 + 2 + 4 + 3
    # The greedy branch's children have nothing left below them: they cannot delegate.
    assert store.decide(tid, "0.1.1", "delegate", "r", subs(2), [], "w")[0] == "execute"


def test_a_subtree_cannot_spend_more_tokens_than_its_envelope(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=900))
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")  # 300 tokens each, root 300
    assert call(store, tid, "0.1", 200) == ("OK", "100")
    # 100 left in 0.1's envelope: a call reserves its prompt (10) and shrinks its cap to 90.
    assert call(store, tid, "0.1", 50) == ("OK", "90")
    # 50 left: the cap would be 40; then 0 left is below the smallest completion.
    assert call(store, tid, "0.1", 50) == ("OK", "40")
    assert call(store, tid, "0.1", 10) == ("EXHAUSTED", "token envelope")
    # The sibling's envelope is untouched, and the tree has budget left.
    assert call(store, tid, "0.2", 100) == ("OK", "100")
    tree = store.tree(tid)
    assert tree.tokens == 400 <= 900
    assert store.node(tid, "0").sub_tokens == 400


def test_what_a_closed_subtree_left_unused_is_the_parents_again(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=300))
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")  # children 100 each, root 100
    call(store, tid, "0.1", 20)
    call(store, tid, "0.2", 20)
    # The root's synthesis may use all the root's envelope leaves: 300 - 40, not its 100.
    g = store.gate(tid, "0", "synthesize", "s", "synthesizing", "w", (1000, 10, 0.0, 0.0))
    assert (g.verdict, g.detail) == ("OK", "250")


def test_reservations_count_against_every_envelope_on_the_chain(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=400))
    store.decide(tid, "0", "delegate", "r", subs(3), [], "w")  # 100 each
    g = store.gate(tid, "0.1", "execute", "a", "executing", "w", (1000, 10, 0.0, 0.0))
    assert (g.verdict, g.detail) == ("OK", "90")
    chain = [store.r.hgetall(keys.node(tid, n)) for n in ("0.1", "0")]
    assert [h.get("held_tokens") for h in chain] == ["100", "100"]
    store.release(tid, "0.1", "execute", "a")  # the call failed: its reservation goes back
    chain = [store.r.hgetall(keys.node(tid, n)) for n in ("0.1", "0")]
    assert [h.get("held_tokens") for h in chain] == ["0", "0"]


def test_a_call_waits_when_calls_in_flight_hold_an_envelopes_room(store: Store) -> None:
    """An envelope whose room is only held by calls in flight makes a call wait (RESERVED),
    not close its node: the holds come back as those calls end."""
    tid = store.create_tree(spec(max_tokens=1000))
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    store.decide(tid, "0.1", "delegate", "r", subs(3), [], "w")
    env = store.node(tid, "0.1").env_tokens
    kid = store.node(tid, "0.1.1").env_tokens
    assert 3 * kid < env < 1000  # 0.1's envelope binds its children, the tree's budget does not
    costs = (1000, 10, 0.0, 0.0)
    assert store.gate(tid, "0.1.1", "execute", "a", "executing", "w", costs) == (
        Gate("OK", str(kid - 10))
    )
    # 0.1.3's call used more than its share (a provider counted more than the estimate):
    # what 0.1's envelope has left is held by 0.1.1's call in flight.
    store.gate(tid, "0.1.3", "execute", "c", "executing", "w", (20, 10, 0.0, 0.0))
    over = env - kid - 5
    record_call(store, tid, "0.1.3", "execute", "m", 10, over - 10, 0.0, True, 0.1, token="c")
    assert store.gate(tid, "0.1.2", "execute", "b", "executing", "w", costs) == (
        Gate("RESERVED", "token envelope")
    )
    assert not store.r.exists(keys.claim(tid, "0.1.2", "execute"))  # the wait holds no claim
    # 0.1.1's call ends having used 30 of its worst case: the room is back.
    record_call(store, tid, "0.1.1", "execute", "m", 10, 20, 0.0, True, 0.1, token="a")
    gate = store.gate(tid, "0.1.2", "execute", "b", "executing", "w", costs)
    assert gate == Gate("OK", str(env - over - 30 - 10))
    # Spent, not held: the next call stops on the envelope.
    record_call(store, tid, "0.1.2", "execute", "m", 10, env - over - 40, 0.0, True, 0.1, token="b")
    assert store.gate(tid, "0.1.1", "execute", "a", "executing", "w", costs) == (
        Gate("EXHAUSTED", "token envelope")
    )


def test_cost_envelopes_shrink_the_cap_like_tokens(store: Store) -> None:
    tid = store.create_tree(spec(max_cost=0.03))  # children 0.01 USD each
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    # 1e-4 USD per output token: 0.01 USD fits 100 tokens, minus the prompt's 10 * 1e-5.
    g = store.gate(tid, "0.1", "execute", "a", "executing", "w", (1000, 10, 1e-5, 1e-4))
    assert (g.verdict, g.detail) == ("OK", "99")
    record_call(store, tid, "0.1", "execute", "m", 10, 99, 0.01, True, 0.1, token="a", call_id="a")
    g = store.gate(tid, "0.1", "execute", "a", "executing", "w", (1000, 10, 1e-5, 1e-4))
    assert (g.verdict, g.detail) == ("EXHAUSTED", "cost envelope")


def test_a_top_up_widens_the_envelopes_that_stopped(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=300))
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    call(store, tid, "0.1", 100)
    assert call(store, tid, "0.1", 10)[0] == "EXHAUSTED"
    store.finish(tid, "0.1", "budget_exhausted", note="token envelope spent")
    Control(store).raise_budget(tid, {"max_tokens": 200})
    nodes = {n.id: n for n in store.tree(tid).nodes}
    assert (nodes["0"].env_tokens, nodes["0.1"].env_tokens, nodes["0.2"].env_tokens) == (
        500,
        300,
        100,
    )


def test_a_tree_without_envelopes_keeps_one_pool(store: Store) -> None:
    tid = store.create_tree(spec(max_tokens=300, envelopes=False))
    store.decide(tid, "0", "delegate", "r", subs(2), [], "w")
    assert call(store, tid, "0.1", 250) == ("OK", "100")
    assert store.node(tid, "0.1").env_tokens == 0  # no envelope: it may use the tree's
    assert call(store, tid, "0.1", 20)[0] == "OK"


def test_a_greedy_branch_leaves_its_siblings_their_share_on_real_workers(
    env: dict[str, str], start_workers: Callable[..., object]
) -> None:
    """The offline model fans the root out three ways, the first sub-task of every delegation
    six ways, the others three. With envelopes each child of the root keeps its share of the
    node budget, and no subtree exceeds its envelope."""
    start_workers(1, {"TASKTREE_OFFLINE_GREEDY": "6", "TASKTREE_OFFLINE_FANOUT": "3"})
    base = ["Write a guide.", "--max-nodes", "13", "--max-depth", "2", "--max-children", "6"]
    runs = {}
    for flag in ("--envelopes", "--no-envelopes"):
        doc = cli_json(env, "submit", *base, flag)
        runs[flag] = {n["id"]: n for n in doc["nodes"]}
    with_env, without = runs["--envelopes"], runs["--no-envelopes"]

    def below(nodes: dict[str, dict[str, Any]], nid: str) -> int:
        return sum(1 for other in nodes if other.startswith(nid + "."))

    # 9 nodes left below the root's three children, 3 each. The greedy branch wanted 6 and got
    # its 3; its siblings wanted 3 and got all of them.
    assert [with_env[c]["env_nodes"] for c in ("0.1", "0.2", "0.3")] == [3, 3, 3]
    assert [below(with_env, c) for c in ("0.1", "0.2", "0.3")] == [3, 3, 3]
    assert any("node envelope allowed 3 of 6" in n for n in with_env["0.1"]["notes"])
    for nid, n in with_env.items():
        assert below(with_env, nid) <= n["env_nodes"] or nid == "0"
    # Without envelopes the same tree asks for 12 and has 9: someone is cut short (which one
    # depends on which decision lands first), and nothing records an envelope.
    assert len(without) == len(with_env) == 13
    assert any("node budget allowed" in n for node in without.values() for n in node["notes"])
    assert all(node["env_nodes"] == 0 for node in without.values())
