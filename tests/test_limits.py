"""Model-call limits shared by every worker (parsing, the Redis side, two real worker
processes against a provider that allows few calls at once) and the worker pool's size."""

from __future__ import annotations

import time

import fakeredis
import pytest

from tasktree import keys
from tasktree.errors import ConfigError
from tasktree.limits import Limit, parse
from tasktree.models import TreeSpec
from tasktree.settings import load
from tasktree.store import Store
from tests.helpers import RateLimitedProvider

MODEL = "openai/fake"


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), load(redis_url=None))


def test_limits_are_read_per_model_first_match_wins() -> None:
    s = load(llm_limits="openai/gpt-4o-mini=60rpm,8; openai/*=20", llm_concurrency=4)
    assert s.limit_for("openai/gpt-4o-mini") == Limit(8, 60)
    assert s.limit_for("openai/gpt-4o") == Limit(20, 0)
    assert s.limit_for("anthropic/claude") == Limit(4, 0)
    assert not load().limit_for(MODEL)
    assert parse(" ; a=1 ;") == [("a", Limit(1, 0))]


@pytest.mark.parametrize("bad", ["gpt", "=5", "m=", "m=0", "m=5x", "m=fast"])
def test_a_bad_limit_is_a_one_line_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(llm_limits=bad)
    assert "TASKTREE_LLM_LIMITS" in str(e.value)
    assert "\n" not in str(e.value)


def queued(store: Store) -> list[str]:
    return list(store.r.zrange(keys.waiting(MODEL), 0, -1))


def handed(store: Store, token: str) -> bool:
    """Whether a waiting call was handed a slot: woken by an entry on its list, in flight."""
    woken = store.r.lrange(keys.grant(MODEL, token), 0, -1) == ["1"]
    return woken and store.r.zscore(keys.slots(MODEL), token) is not None


def test_a_call_that_ends_hands_its_slot_to_the_first_waiter(store: Store) -> None:
    limit = Limit(concurrency=2)
    assert store.take_slot(MODEL, "a", limit) is None
    assert store.take_slot(MODEL, "b", limit) is None
    for token in "cd":
        full = store.take_slot(MODEL, token, limit)
        assert full is not None
        assert full[0] == "concurrency"
        time.sleep(0.002)  # queued in the order they began to wait
    assert store.take_slot(MODEL, "c", limit) is not None  # waiting again keeps its place
    assert queued(store) == ["c", "d"]
    store.free_slot(MODEL, "a", "200", limit)
    assert handed(store, "c")
    assert not handed(store, "d")
    assert queued(store) == ["d"]
    assert store.await_slot(MODEL, "c", 0.1)  # its wait ends at once
    assert store.take_slot(MODEL, "c", limit) is None  # and a look again finds it in flight
    store.free_slot(MODEL, "a", "200", limit)  # sent again: nothing freed, nobody handed one
    assert not handed(store, "d")
    store.free_slot(MODEL, "b", "200", limit)
    assert handed(store, "d")
    assert store.r.zcard(keys.slots(MODEL)) == 2
    assert not store.r.exists(keys.waiting(MODEL))


def test_a_dead_waiter_is_skipped_and_one_that_gives_up_hands_its_slot_on(store: Store) -> None:
    limit = Limit(concurrency=1)
    assert store.take_slot(MODEL, "a", limit) is None
    for token in "xyz":
        assert store.take_slot(MODEL, token, limit) is not None
        time.sleep(0.002)
    store.r.zadd(keys.waiting_lapse(MODEL), {"x": 1})  # its worker died: it renewed nothing
    store.free_slot(MODEL, "a", "200", limit)
    assert not handed(store, "x")
    assert handed(store, "y")
    assert queued(store) == ["z"]
    store.free_slot(MODEL, "y", "0", limit)  # gave up its place, handed a slot meanwhile
    assert handed(store, "z")
    assert not store.r.exists(keys.grant(MODEL, "y"))
    assert store.take_slot(MODEL, "w", limit) is not None
    store.free_slot(MODEL, "w", "0", limit)  # gave up before it was handed one
    assert queued(store) == []
    assert store.r.zrange(keys.slots(MODEL), 0, -1) == ["z"]


def test_a_slot_handed_on_counts_against_the_calls_per_minute(store: Store) -> None:
    limit = Limit(concurrency=1, rpm=2)
    assert store.take_slot(MODEL, "a", limit) is None
    assert store.take_slot(MODEL, "b", limit) is not None
    assert store.take_slot(MODEL, "c", limit) is not None
    store.free_slot(MODEL, "a", "200", limit)
    assert handed(store, "b")
    store.free_slot(MODEL, "b", "200", limit)
    assert not handed(store, "c")  # two calls this minute: c waits for the minute
    assert queued(store) == ["c"]
    full = store.take_slot(MODEL, "c", limit)
    assert full is not None
    assert full[0] == "rpm"


def test_without_a_limit_or_a_cut_nobody_waits(store: Store) -> None:
    assert store.take_slot(MODEL, "u", Limit()) is None
    store.free_slot(MODEL, "u", "200", Limit())
    assert not store.r.keys("*")


def test_calls_per_minute_say_how_long_to_wait(store: Store) -> None:
    limit = Limit(rpm=3)
    for token in "abc":
        assert store.take_slot(MODEL, token, limit) is None
        store.free_slot(MODEL, token, "200", limit)
    full = store.take_slot(MODEL, "d", limit)
    assert full is not None
    assert full[0] == "rpm"
    assert 50 < full[1] <= 60


def test_a_429_halves_what_was_in_flight_and_answers_grow_it_back(store: Store) -> None:
    unlimited = Limit()
    for token in "abcd":
        assert store.take_slot(MODEL, token, unlimited) is None
    store.free_slot(MODEL, "a", "429", unlimited)  # 4 were in flight: cut to 2
    assert float(store.r.hget(keys.adapted(MODEL), "cap")) == 2
    store.free_slot(MODEL, "b", "429", unlimited)  # within a second: no second cut
    assert float(store.r.hget(keys.adapted(MODEL), "cap")) == 2
    assert store.take_slot(MODEL, "e", unlimited) is not None  # c and d still in flight
    store.free_slot(MODEL, "c", "200", unlimited)
    assert float(store.r.hget(keys.adapted(MODEL), "cap")) == 2.5
    assert store.r.pttl(keys.adapted(MODEL)) > 0  # the cut lasts a while, then goes
    limited = Limit(concurrency=3)
    store.free_slot(MODEL, "d", "200", limited)
    assert float(store.r.hget(keys.adapted(MODEL), "cap")) == pytest.approx(2.9)
    assert store.take_slot(MODEL, "f", limited) is None
    store.free_slot(MODEL, "f", "200", limited)  # grown back to the configured 3: cut gone
    assert store.r.hget(keys.adapted(MODEL), "cap") is None


def limited(provider: RateLimitedProvider, concurrency: int) -> dict[str, str]:
    """A worker's environment: the provider as its model, at most `concurrency` calls at once."""
    return {
        "TASKTREE_MODEL": MODEL,
        "TASKTREE_API_BASE": provider.url,
        "TASKTREE_API_KEY": "sk-test",
        "TASKTREE_LLM_CONCURRENCY": str(concurrency),
    }


def test_two_workers_never_exceed_the_shared_limit(client, start_workers) -> None:
    with RateLimitedProvider(capacity=3, latency=0.3) as provider:
        start_workers(2, extra_env=limited(provider, 3))
        tid = client.submit(TreeSpec.build(client.settings, "Write the report.", max_depth=2))
        tree = client.wait(tid, timeout=100)
    assert tree.status == "completed"
    assert len(tree.nodes) == 17
    assert provider.refused == 0
    assert provider.most_in_flight == 3
    notes = [e.get("note", "") for _, e in client.store.events(tid)]
    assert any(n.startswith(f"waiting for rate limit ({MODEL}: concurrency") for n in notes)
    assert all(not n.waiting for n in tree.nodes)
    # Each waiting call was woken in its thread by a freed slot: no message was sent again
    # (one run per node, and one more for a synthesis).
    assert [n.id for n in tree.nodes if n.deliveries != 1 + bool(n.children)] == []


def test_without_limits_a_provider_429_cuts_every_workers_calls(client, start_workers) -> None:
    with RateLimitedProvider(capacity=3, latency=0.3) as provider:
        env = {"TASKTREE_MODEL": MODEL, "TASKTREE_API_BASE": provider.url}
        start_workers(2, extra_env={**env, "TASKTREE_API_KEY": "sk-test"})
        tid = client.submit(TreeSpec.build(client.settings, "Write the report.", max_depth=2))
        tree = client.wait(tid, timeout=100)
        cap = client.store.r.hget(keys.adapted(MODEL), "cap")
    assert tree.status == "completed"
    assert all(n.status == "completed" for n in tree.nodes)
    assert provider.refused > 0
    assert cap is not None  # the 429s cut the model's concurrency for both workers


def test_a_call_that_waits_longer_than_the_limit_wait_is_sent_again(client, start_workers) -> None:
    with RateLimitedProvider(capacity=2, latency=0.3) as provider:
        never_wait = {"TASKTREE_LLM_LIMIT_WAIT": "0"}  # a full limit: sent again at once
        start_workers(1, extra_env={**limited(provider, 2), **never_wait})
        tid = client.submit(TreeSpec.build(client.settings, "Write the report.", max_depth=2))
        tree = client.wait(tid, timeout=100)
    assert tree.status == "completed"
    assert provider.refused == 0
    assert provider.most_in_flight == 2
    assert any(n.deliveries > 1 + bool(n.children) for n in tree.nodes)  # sent again


def test_a_call_waiting_for_a_slot_stops_when_its_tree_is_cancelled(
    client, start_workers, r
) -> None:
    # A call of 6 s outlasts the waiting calls' look every 3 s (store.SLOT_POLL).
    with RateLimitedProvider(capacity=1, latency=6.0) as provider:
        start_workers(1, extra_env=limited(provider, 1))  # waits for a slot up to 30 s
        tid = client.submit(TreeSpec.build(client.settings, "Write the report.", max_depth=2))
        deadline = time.monotonic() + 30
        while len(waiting_for_a_slot(r)) < 3:  # one section's call runs, three wait
            assert time.monotonic() < deadline, "the sections' calls did not wait for the limit"
            time.sleep(0.1)
        client.cancel(tid)
        # The waiting calls stop while the one in flight still runs: they do not wait for
        # its slot (or for 30 s) to learn that their tree is gone.
        while True:
            assert provider.in_flight == 1, "the waiting calls outlived the call in flight"
            if not waiting_for_a_slot(r):
                break
            time.sleep(0.1)
        tree = client.wait(tid, timeout=30)
    assert tree.status == "cancelled"
    assert provider.answered == 2  # the root's decision and the section's call in flight
    assert all(n.terminal for n in tree.nodes)


def waiting_for_a_slot(r) -> list[dict]:
    """The clients blocked in a BLPOP: tasktree's calls waiting for a freed slot."""
    return [c for c in r.client_list() if c["cmd"] == "blpop" and "b" in c["flags"]]


def test_the_live_view_says_a_node_waits_for_its_models_limit() -> None:
    from tasktree.models import Node
    from tasktree.render import activity, node_label

    why = f"waiting for rate limit ({MODEL}: concurrency, 3 at once)"
    node = Node.from_hash({"id": "0.1", "status": "deciding", "waiting": why})
    assert activity(node) == why
    assert why in node_label(node).plain


def test_a_pool_a_setting_cannot_start_is_refused_with_the_way_that_works() -> None:
    for pool in ("gevent", "eventlet"):
        with pytest.raises(ConfigError) as e:
            load(pool=pool)
        assert f"celery -A workers worker -P {pool}" in str(e.value)
    assert load().concurrency == 256


@pytest.mark.slow
def test_five_hundred_threads_lose_no_ack(client, start_workers, r) -> None:
    """A 421-node tree on one worker of 500 threads, every leaf in flight at once: every
    message is acknowledged (none left in kombu's unacked set), none fails to ack."""
    env = {
        "TASKTREE_CONCURRENCY": "500",
        "TASKTREE_OFFLINE_FANOUT": "20",
        "TASKTREE_OFFLINE_LATENCY": "0.5",
    }
    (worker,) = start_workers(1, extra_env=env)
    spec = TreeSpec.build(client.settings, "Wide.", max_depth=2, max_children=20, max_nodes=500)
    tree = client.wait(client.submit(spec), timeout=100)
    assert tree.status == "completed"
    assert len(tree.nodes) == 421
    deadline = time.monotonic() + 10
    while r.hlen("unacked"):  # acks of the last tasks may still be on their way
        assert time.monotonic() < deadline, r.hlen("unacked")
        time.sleep(0.1)
    log = worker.log.read_text()
    assert "concurrency: 500 (thread)" in log
    assert "Couldn't ack" not in log
    assert "Too many connections" not in log
