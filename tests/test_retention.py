"""Storage stays bounded: ended trees expire, `delete` and `prune` free what they say, the
trees index follows, and `submit` refuses before a full Redis would stop the queue."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis

from tasktree.client import Client
from tasktree.errors import StoreError
from tasktree.models import TreeSpec
from tests.helpers import RedisServer
from tests.terminal import cli

FAST = {"TASKTREE_OFFLINE_FANOUT": "2"}
SLOW = {"TASKTREE_OFFLINE_FANOUT": "2", "TASKTREE_OFFLINE_LATENCY": "0.5"}
CHORD_CLAIM_TTL = 300  # Celery keeps a fired chord's claim marker this long, then it expires


def keys_of(r: redis.Redis, tree_id: str) -> list[str]:
    return list(r.scan_iter(match=f"tasktree:{{{tree_id}}}:*", count=1000))


def without_ttl(r: redis.Redis) -> set[str]:
    return {k for k in r.scan_iter(count=1000) if r.ttl(k) == -1}


def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    out = cli({**os.environ, **env}, *args)
    return out.returncode, out.stdout, out.stderr


def test_200_ended_trees_expire_and_leave_the_key_count_where_it_started(
    r, settings_for, start_workers
) -> None:
    start_workers(2, extra_env=FAST)
    client = Client(settings_for(tree_ttl=3))
    before = without_ttl(r)
    ids = [
        client.submit(TreeSpec.build(client.settings, f"Task {i}.", max_depth=1))
        for i in range(200)
    ]
    trees = [client.wait(tid, timeout=120) for tid in ids]
    assert {t.status for t in trees} == {"completed"}
    assert all(len(t.nodes) == 3 for t in trees)
    ttls = [r.pttl(f"tasktree:{{{tid}}}:tree") for tid in ids]
    # -2: expired already; 0: in its last millisecond (Redis expires a key after it)
    assert all(t == -2 or 0 <= t <= 3000 for t in ttls), sorted(ttls)
    assert max(ttls) > 0
    # Celery's chord bookkeeping: no task result is stored; what a fired chord leaves expires.
    assert not list(r.scan_iter(match="celery-task-meta-*"))
    celery_ttls = {k: r.ttl(k) for k in r.scan_iter(match="celery-*")}
    assert all(0 < t <= CHORD_CLAIM_TTL for t in celery_ttls.values()), celery_ttls

    deadline = time.monotonic() + 30  # the TTL, then a sweep (every 2 s) trims the index
    while time.monotonic() < deadline and (without_ttl(r) != before or r.exists("tasktree:trees")):
        time.sleep(0.5)
    assert without_ttl(r) == before
    assert not list(r.scan_iter(match="tasktree:{*"))
    assert not r.exists("tasktree:trees", "tasktree:expiring", "tasktree:running")
    assert client.store.list_trees() == []


def test_delete_frees_a_tree_and_refuses_a_running_one_without_force(
    env, r, client, start_workers
) -> None:
    start_workers(1, extra_env=SLOW)
    done = client.wait(client.submit(TreeSpec.build(client.settings, "Small.", max_depth=1)))
    assert done.status == "completed"
    n_keys = len(keys_of(r, done.id))
    code, out, err = run(env, "delete", done.id)
    assert code == 0, err
    assert out.startswith(f"deleted 1 tree: {n_keys} keys, ")
    assert out.rstrip().endswith(" freed")
    assert keys_of(r, done.id) == []
    assert r.zscore("tasktree:trees", done.id) is None
    code, _, err = run(env, "delete", done.id)
    assert code == 2
    assert err.strip() == f"tasktree: error: no tree {done.id}"

    # Deep enough to still run (about 3.5 s) when the CLI, started after 1 s, reads it.
    busy = client.submit(TreeSpec.build(client.settings, "Busy.", max_depth=3))
    time.sleep(1.0)
    code, _, err = run(env, "delete", busy)
    assert code == 2
    assert err.strip() == (
        f"tasktree: error: tree {busy} is running: cancel it first, or delete it with --force"
    )
    assert keys_of(r, busy)  # refused: nothing removed
    code, out, err = run(env, "delete", busy, "--force", "--json")
    assert code == 0, err
    freed = json.loads(out)
    assert freed["trees"] == 1
    assert freed["keys"] > 0
    assert freed["bytes"] > 0
    time.sleep(2.0)  # the calls that were running end, and write nothing
    assert keys_of(r, busy) == []


def test_prune_removes_ended_trees_by_age_and_status_and_never_running_ones(
    env, r, client, settings_for, start_workers
) -> None:
    start_workers(1, extra_env=SLOW)
    completed = [
        client.wait(client.submit(TreeSpec.build(client.settings, f"Done {i}.", max_depth=1))).id
        for i in range(2)
    ]
    cancelled = client.submit(TreeSpec.build(client.settings, "Stop me.", max_depth=1))
    time.sleep(0.5)
    client.cancel(cancelled)
    assert client.wait(cancelled).status == "cancelled"
    # A tree on a queue no worker consumes: running for as long as the test lasts.
    unserved = Client(settings_for(node_queue="tt-nobody", synth_queue="tt-nobody.synth"))
    running = unserved.submit("Keep running.")

    code, out, err = run(env, "prune", "--older-than", "1h")
    assert (code, out.strip()) == (0, "deleted 0 trees: 0 keys, 0 B freed"), err
    time.sleep(1.5)
    code, out, err = run(env, "prune", "--older-than", "1s", "--status", "cancelled", "--json")
    assert code == 0, err
    assert json.loads(out)["trees"] == 1
    assert keys_of(r, cancelled) == []
    assert all(keys_of(r, t) for t in completed)
    code, out, err = run(env, "prune", "--older-than", "1s")
    assert code == 0, err
    assert out.startswith("deleted 2 trees: ")
    assert all(keys_of(r, t) == [] for t in completed)
    assert client.tree(running, with_nodes=False).status == "running"  # never pruned
    assert [t.id for t, _ in client.store.list_trees()] == [running]

    code, _, err = run(env, "prune", "--older-than", "1s", "--status", "running")
    assert code == 2
    assert "invalid choice: 'running'" in err
    code, _, err = run(env, "prune", "--older-than", "soon")
    assert code == 2
    assert "must be a number and a unit" in err


def test_submit_refuses_near_maxmemory_and_writes_nothing(settings_for, tmp_path) -> None:
    server = RedisServer(
        tmp_path / "full", "--maxmemory", "10mb", "--maxmemory-policy", "noeviction"
    )
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        r = redis.Redis.from_url(url)
        for i in range(86):  # about 9.5 of 10 MB used
            r.set(f"ballast:{i}", b"x" * 100_000)
        with (
            Client(settings_for(redis_url=url)) as client,
            pytest.raises(StoreError, match=r"TASKTREE_MEMORY_GUARD=0\.9") as info,
        ):
            client.submit("Anything.")
        assert "maxmemory" in str(info.value)
        assert "\n" not in str(info.value)
        assert r.keys("tasktree:*") == []
        r.delete(*(f"ballast:{i}" for i in range(86)))
        with Client(settings_for(redis_url=url)) as client:
            assert client.submit("Anything.")  # room again: accepted
    finally:
        server.stop()
