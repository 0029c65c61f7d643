"""Crashes, duplicates, Redis restarts, poison messages and security, with real processes."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from tasktree import keys, messages
from tasktree.client import Client
from tasktree.models import TreeSpec
from tasktree.proto import TaskRequest, to_dict
from tests.helpers import ROOT, RedisServer, WorkerProcess

pytestmark = pytest.mark.slow

FAST_RECOVERY = {
    "TASKTREE_VISIBILITY_TIMEOUT": "4",
    "TASKTREE_RESTORE_INTERVAL": "1",
    "TASKTREE_STALL_SECONDS": "3",
    "TASKTREE_STEP_LEASE": "3",
}


def wait_done(client: Client, tid: str, at_least: int, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while client.tree(tid, with_nodes=False).done < at_least:
        if time.monotonic() > deadline:
            tree = client.tree(tid)
            state = [(n.id, n.status, n.deliveries, n.calls) for n in tree.nodes]
            raise AssertionError(f"tree made no progress: {state}")
        time.sleep(0.05)


def expected_calls(tree) -> dict[str, int]:
    """Calls a node makes when nothing is repeated: 1 per leaf at the depth limit, 2 otherwise."""
    return {n.id: (2 if n.children else 1) for n in tree.nodes}


def test_killed_workers_lose_nothing_and_pay_nothing_twice(client, start_workers) -> None:
    env = {
        **FAST_RECOVERY,
        "TASKTREE_OFFLINE_FANOUT": "3",
        "TASKTREE_OFFLINE_LATENCY": "0.4",
        "TASKTREE_CONCURRENCY": "4",
    }
    (worker,) = start_workers(1, extra_env=env)
    tid = client.submit(TreeSpec.build(client.settings, "Survive crashes.", max_depth=2))
    recoveries = []
    for after in (2, 8):  # first among the leaves, then around the syntheses
        wait_done(client, tid, after)
        worker.kill()  # kill -9 while nodes are deciding, executing or synthesizing
        killed_at = time.monotonic()
        done_then = client.tree(tid, with_nodes=False).done
        (worker,) = start_workers(1, extra_env=env)
        wait_done(client, tid, done_then + 1, timeout=90)
        recoveries.append(time.monotonic() - killed_at)
    wait_done(client, tid, 13, timeout=60)
    tree = client.wait(tid)
    failed = [(n.id, n.status, n.error) for n in tree.nodes if n.status != "completed"]
    assert tree.status == "completed", failed
    assert len(tree.nodes) == 13
    assert all(n.status == "completed" and n.result for n in tree.nodes)
    assert {n.id: n.calls for n in tree.nodes} == expected_calls(tree)  # no stored step re-paid
    assert any(n.deliveries > 1 for n in tree.nodes)  # some work really was redelivered
    # Recovery is bounded by visibility timeout + restore interval (+ stall time for a lost
    # chord callback) + a worker's start-up.
    assert all(r < 4 + 1 + 3 + 30 for r in recoveries), recoveries
    print(f"recovery after kill -9: {[round(r, 1) for r in recoveries]} s")


def test_a_dead_workers_runs_are_sent_again_while_the_tree_stays_busy(
    client, start_workers
) -> None:
    """The other worker keeps the tree busy, so it does not go quiet: the killed worker's
    running nodes come back through their runs' stale heartbeats, a lease after the kill
    (the survivor's log says so). A kill can also land inside a message's receipt (before
    its run is listed) or between a node's close and its chord's callback; that one message
    is the stall sweep's, once the tree goes quiet (20 s here, far above the 3 s lease)."""
    env = {
        "TASKTREE_OFFLINE_FANOUT": "4",
        "TASKTREE_OFFLINE_LATENCY": "0.8",
        "TASKTREE_CONCURRENCY": "3",
        "TASKTREE_STEP_LEASE": "3",  # test setting; the default 15 s is measured in RELIABILITY
        "TASKTREE_STALL_SECONDS": "20",
    }
    doomed, survivor = start_workers(2, extra_env=env)
    tid = client.submit(TreeSpec.build(client.settings, "Stay busy.", max_depth=2))
    wait_for_a_leaf_on(client, tid, doomed)
    doomed.kill()
    tree = client.wait(tid, timeout=90)
    assert tree.status == "completed"
    assert len(tree.nodes) == 21
    assert all(n.status == "completed" for n in tree.nodes)
    assert {n.id: n.calls for n in tree.nodes} == expected_calls(tree)
    survivor.wait_for_log("its run's worker died", timeout=1)
    live = keys.live(client.settings.node_queue)  # and the live index empties: no leak
    deadline = time.monotonic() + 10
    while client.store.r.zcard(live):
        assert time.monotonic() < deadline, client.store.r.zrange(live, 0, -1)
        time.sleep(0.2)


def test_a_worker_that_died_before_its_chord_fired_is_followed_by_the_parents_synthesis(
    settings_for, r
) -> None:
    """A run closed its node, then its worker died before the chord's join sent the parent's
    synthesis: the run's stale heartbeat brings that synthesis a lease later, as the sweeper
    of any worker finds it, without waiting for the tree to go quiet. Once: the store picks
    one sender."""
    from workers import create_app, sweeper

    app = create_app(settings_for())
    store, settings = app.tasktree.store, app.tasktree.settings
    tid = store.create_tree(TreeSpec.build(settings, "Two parts."))
    parts = [{"requested_persona": f"p{i}", "task_details": f"d{i}"} for i in (1, 2)]
    store.decide(tid, "0", "delegate", "two parts", parts, [], "w")
    for child in ("0.1", "0.2"):
        store.finish(tid, child, "completed", result=f"result of {child}")
    live = keys.live(settings.node_queue)
    stale = {keys.live_member(tid, "0.2", "node", "tag-2"): 0}  # its worker stopped beating
    r.zadd(live, stale)
    assert sweeper.sweep_once(app) == 1
    message = json.loads(r.rpop(settings.synth_queue))
    assert message["headers"]["task"] == messages.SYNTHESIZE
    assert json.loads(base64.b64decode(message["body"]))[0] == [tid, "0"]
    r.zadd(live, {keys.live_member(tid, "0.1", "node", "tag-1"): 0})  # its sibling's too
    r.delete(keys.sweep_lock(settings.node_queue))
    assert sweeper.sweep_once(app) == 0  # the synthesis was sent once
    assert r.llen(settings.synth_queue) == 0


def wait_for_a_leaf_on(client: Client, tid: str, worker: WorkerProcess) -> None:
    """Until `worker` runs an open leaf of the tree."""
    prefix = worker.name.split("@")[0]
    deadline = time.monotonic() + 60
    while not any(
        n.worker.startswith(prefix) and not n.terminal and n.depth == 2
        for n in client.tree(tid).nodes
    ):
        assert time.monotonic() < deadline, f"worker {prefix} never ran a leaf"
        time.sleep(0.05)


def test_duplicate_deliveries_are_harmless(client, start_workers, r) -> None:
    start_workers(
        2,
        extra_env={
            "TASKTREE_OFFLINE_FANOUT": "2",
            "TASKTREE_OFFLINE_LATENCY": "0.3",
            "TASKTREE_CONCURRENCY": "4",
        },
    )
    tid = client.store.create_tree(TreeSpec.build(client.settings, "Once only.", max_depth=2))
    req = TaskRequest(
        task_id=f"{tid}/0",
        persona_prompt="p",
        task_instructions="Once only.",
        tree_id=tid,
        node_id="0",
    )
    for _ in range(3):  # the same message three times, at once
        client.app.send_task("tasktree.node", args=[to_dict(req)])
    tree = client.wait(tid)
    time.sleep(2)  # let any duplicate chord finish
    tree = client.tree(tid)
    assert tree.status == "completed"
    assert len(tree.nodes) == 7
    assert {n.id: n.calls for n in tree.nodes} == expected_calls(tree)
    events = client.store.events(tid)
    assert sum(1 for _, e in events if e.get("tree") == "completed") == 1
    for n in tree.nodes:
        assert (
            sum(1 for _, e in events if e.get("node") == n.id and e.get("status") == "completed")
            == 1
        )
    # A late duplicate of a leaf and of the root's synthesis changes nothing.
    before = client.store.events(tid)
    leaf = next(n for n in tree.nodes if not n.children)
    client.app.send_task(
        "tasktree.node",
        args=[to_dict(leaf.request(tid))],
    )
    res = client.app.send_task("tasktree.synthesize", args=[tid, "0"])
    deadline = time.monotonic() + 20
    while not r.exists(f"celery-task-meta-{res.id}") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert client.tree(tid).calls == tree.calls
    assert client.store.events(tid) == before


def aof_redis(tmp_path: Path) -> tuple[RedisServer, str]:
    """A redis-server of the test's own with an append-only file, started; and its URL."""
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    return server, f"redis://127.0.0.1:{server.port}/0"


def test_redis_restart_mid_tree(env, settings_for, tmp_path: Path) -> None:
    server, url = aof_redis(tmp_path)
    wenv = {
        **env,
        "TASKTREE_REDIS_URL": url,
        "TASKTREE_OFFLINE_FANOUT": "3",
        "TASKTREE_OFFLINE_LATENCY": "0.3",
        "TASKTREE_CONCURRENCY": "4",
    }
    worker = WorkerProcess(wenv, "restart@%h", tmp_path)
    try:
        worker.wait_ready()
        client = Client(settings_for(redis_url=url))
        tid = client.submit(TreeSpec.build(client.settings, "Outlive a restart.", max_depth=2))
        result: dict = {}
        waiter = threading.Thread(target=lambda: result.update(tree=client.wait(tid)))
        waiter.start()  # a waiting client, connected through the restart
        wait_done(client, tid, 3)
        server.stop()
        time.sleep(1.0)
        server.start()
        waiter.join(90)
        tree = result["tree"]
        assert tree.status == "completed"
        assert len(tree.nodes) == 13
        assert all(n.status == "completed" for n in tree.nodes)
    finally:
        worker.stop()
        server.stop()


@pytest.mark.timeout(240)
def test_workers_survive_five_redis_restarts_with_tasks_in_flight(
    env, settings_for, tmp_path: Path
) -> None:
    """Two busy worker processes, shipped recovery settings, an append-only Redis stopped and
    started five times mid-tree: no worker exits, every tree completes."""
    server, url = aof_redis(tmp_path)
    wenv = {
        **env,
        "TASKTREE_REDIS_URL": url,
        "TASKTREE_OFFLINE_FANOUT": "3",
        "TASKTREE_OFFLINE_LATENCY": "0.5",
        "TASKTREE_CONCURRENCY": "8",
    }
    workers = [WorkerProcess(wenv, f"restart{i}@%h", tmp_path) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        client = Client(settings_for(redis_url=url))
        ids = [
            client.submit(TreeSpec.build(client.settings, f"Outlive restarts {i}.", max_depth=2))
            for i in range(2)
        ]
        pause = random.Random(7)
        for _ in range(5):
            time.sleep(1.0)
            server.stop()
            time.sleep(pause.uniform(1.0, 3.0))
            server.start()
        trees = [client.wait(tid, timeout=150) for tid in ids]
        for w in workers:
            assert w.proc.poll() is None, w.log.read_text()[-3000:]
            assert "Unrecoverable" not in w.log.read_text()
        for tree in trees:
            assert tree.status == "completed", [(n.id, n.status, n.error) for n in tree.nodes]
            assert len(tree.nodes) == 13
    finally:
        for w in workers:
            w.kill()
        server.stop()


def test_poison_node_is_given_up_and_parent_carries_on(env, client, tmp_path: Path) -> None:
    wenv = {
        **env,
        **FAST_RECOVERY,
        "TASKTREE_STEP_LEASE": "1",
        "TASKTREE_MAX_DELIVERIES": "2",
        "TASKTREE_CONCURRENCY": "1",
    }
    tid = client.submit(
        TreeSpec.build(client.settings, "Do things. This includes alpha, poison pill, and gamma.")
    )
    deadline = time.monotonic() + 150
    # Run the crash-injecting app under a restart loop.
    crashes = 0
    while not client.tree(tid, with_nodes=False).terminal:
        assert time.monotonic() < deadline, "tree never finished"
        w = _poison_worker(wenv, tmp_path, crashes)
        while w.proc.poll() is None and not client.tree(tid, with_nodes=False).terminal:
            time.sleep(0.1)
        if w.proc.poll() is not None:
            assert w.proc.returncode == 70
            crashes += 1
        w.stop()
    tree = client.tree(tid)
    assert tree.status == "completed_with_errors"
    assert crashes == 2
    poison = next(n for n in tree.nodes if n.persona == "You are an expert in poison pill.")
    assert poison.status == "failed"
    assert "earlier runs of this node ended in a crash" in poison.error
    root = tree.root
    assert root.status == "completed"
    assert len(root.context_keys) == 2
    assert "poison pill" in root.result


def _poison_worker(env: dict, tmp_path: Path, n: int) -> WorkerProcess:
    return WorkerProcess(env, f"poison{n}@%h", tmp_path, app="tests.poison_app")


def test_pickled_messages_are_refused(client, start_workers, r, env) -> None:
    (w,) = start_workers(1)
    tid = client.store.create_tree(TreeSpec.build(client.settings, "Never unpickle."))
    req = TaskRequest(
        task_id=f"{tid}/0",
        persona_prompt="p",
        task_instructions="Never unpickle.",
        tree_id=tid,
        node_id="0",
    )
    client.app.send_task("tasktree.node", args=[to_dict(req)], serializer="pickle")
    deadline = time.monotonic() + 20
    while "disallowed" not in w.log.read_text().lower() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "disallowed" in w.log.read_text().lower()
    time.sleep(1)
    assert client.store.node(tid, "0").status == "queued"
    assert client.store.node(tid, "0").calls == 0
    assert r.llen(env["TASKTREE_NODE_QUEUE"]) == 0
    assert r.hlen("unacked") == 0


def _secret_free(r: redis.Redis, secret: str) -> bool:
    return all(secret not in str(r.dump(key)) for key in r.keys("tasktree:*"))


def test_password_and_acl_user(env, settings_for, tmp_path: Path) -> None:
    server = RedisServer(
        tmp_path / "redis",
        "--requirepass",
        "s3cret-pw",
        "--user",
        "agent",
        "on",
        ">agent-pw-9",
        "~*",
        "&*",
        "+@all",
    )
    server.start(ready_url=f"redis://:s3cret-pw@127.0.0.1:{server.port}/0")
    try:
        for url in (
            f"redis://:s3cret-pw@127.0.0.1:{server.port}/0",
            f"redis://agent:agent-pw-9@127.0.0.1:{server.port}/0",
        ):
            w = WorkerProcess({**env, "TASKTREE_REDIS_URL": url}, "auth@%h", tmp_path)
            try:
                w.wait_ready()
                client = Client(settings_for(redis_url=url))
                tree = client.wait(
                    client.submit(
                        TreeSpec.build(client.settings, "Authenticate. This includes a, b.")
                    )
                )
                assert tree.status == "completed"
                r = redis.Redis.from_url(url)
                assert _secret_free(r, "s3cret-pw")
                assert _secret_free(r, "agent-pw-9")
                assert "s3cret-pw" not in w.log.read_text()
                assert "agent-pw-9" not in w.log.read_text()
            finally:
                w.stop()
        wrong = Client(settings_for(redis_url=f"redis://:wrong@127.0.0.1:{server.port}/0"))
        from tasktree.errors import StoreError

        with pytest.raises(StoreError, match=r"credentials|invalid|WRONGPASS|password"):
            wrong.store.ping()
    finally:
        server.stop()


def _tls_redis() -> str | None:
    exe = shutil.which("redis-server")
    if exe and b"tls-cert-file" in Path(exe).read_bytes():
        return exe
    return None


@pytest.mark.skipif(
    not (_tls_redis() and shutil.which("openssl")), reason="no TLS-capable redis-server/openssl"
)
def test_tls_rediss_url(env, settings_for, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(certs / "key.pem"),
            "-out",
            str(certs / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    from tasktree.embedded import free_port

    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(certs / "cert.pem"),
        "--tls-key-file",
        str(certs / "key.pem"),
        "--tls-ca-cert-file",
        str(certs / "cert.pem"),
        "--tls-auth-clients",
        "no",
        exe=_tls_redis(),
        port=0,
    )
    server.port = 0
    url = f"rediss://127.0.0.1:{tls_port}/0"
    server.start(ready_url=url, ssl_cert_reqs="none")
    wenv = {**env, "TASKTREE_REDIS_URL": url, "TASKTREE_REDIS_SSL_CERT_REQS": "none"}
    w = WorkerProcess(wenv, "tls@%h", tmp_path)
    try:
        w.wait_ready()
        client = Client(settings_for(redis_url=url, redis_ssl_cert_reqs="none"))
        tree = client.wait(
            client.submit(TreeSpec.build(client.settings, "Encrypt. This includes a, b."))
        )
        assert tree.status == "completed"
        assert len(tree.nodes) == 3
    finally:
        w.stop()
        server.stop()


def test_lost_chord_callback_is_re_driven(client, start_workers) -> None:
    """A delegated node whose children closed but whose callback never came (the worker died
    between claiming and publishing it): the sweeper re-sends its synthesis."""
    tid = client.store.create_tree(TreeSpec.build(client.settings, "Orphaned."))
    subs = [{"requested_persona": f"You are {x}.", "task_details": f"Part {x}."} for x in "AB"]
    client.store.decide(tid, "0", "delegate", "r", subs, [], "w")
    client.store.finish(tid, "0.1", "completed", result="A done")
    client.store.finish(tid, "0.2", "completed", result="B done")
    start_workers(1, extra_env={"TASKTREE_STALL_SECONDS": "1", "TASKTREE_RESTORE_INTERVAL": "1"})
    tree = client.wait(tid)
    assert tree.status == "completed"
    assert "Synthesis of 2 parts" in tree.result


def test_lost_node_message_is_re_driven(client, start_workers) -> None:
    """A node whose message vanished (queued, no claim, nothing in any queue) is re-sent."""
    tid = client.store.create_tree(
        TreeSpec.build(client.settings, "Lost message. This includes a, b.")
    )
    start_workers(1, extra_env={"TASKTREE_STALL_SECONDS": "1", "TASKTREE_RESTORE_INTERVAL": "1"})
    tree = client.wait(tid)  # the root's message was never sent at all
    assert tree.status == "completed"
    assert len(tree.nodes) == 3
    assert client.store.r.hget(keys.node(tid, "0"), "redriven_at")


def test_a_child_sent_outside_its_chord_triggers_its_parents_synthesis(
    client, start_workers
) -> None:
    """What the sweeper does after a crash: re-send a lost child, outside any chord. Its own
    completion must bring the parent's synthesis, with no stall period to wait out (the
    sweeper is held off here: stall 600 s)."""
    start_workers(1, extra_env={"TASKTREE_STALL_SECONDS": "600"})
    store = client.store
    tid = store.create_tree(TreeSpec.build(client.settings, "Re-sent child. This includes a, b."))
    subs = [{"requested_persona": f"p{i}", "task_details": f"part {i}"} for i in (1, 2)]
    store.decide(tid, "0", "delegate", "r", subs, [], "w")
    store.finish(tid, "0.1", "completed", result="first part")
    started = time.monotonic()
    messages.send_node(store, store.node(tid, "0.2").request(tid), client.settings.node_queue)
    tree = client.wait(tid, timeout=30)
    assert tree.status == "completed"
    assert time.monotonic() - started < 20
    assert "2 parts" in tree.result
    assert tree.root.calls == 1  # the synthesis, once


def test_a_store_reset_mid_tree_leaves_no_orphans_and_readers_say_so(
    env, settings_for, tmp_path: Path
) -> None:
    """Redis restarted without persistence while calls are in flight: late writes create no
    keys, workers drop the tree's messages, and a watcher says what happened in one line."""
    server = RedisServer(tmp_path / "redis", "--appendonly", "no")
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    wenv = {**env, "TASKTREE_REDIS_URL": url, "TASKTREE_OFFLINE_FANOUT": "3"}
    wenv["TASKTREE_OFFLINE_LATENCY"] = "1.5"
    worker = WorkerProcess(wenv, "reset@%h", tmp_path)
    try:
        worker.wait_ready()
        client = Client(settings_for(redis_url=url))
        tid = client.submit(TreeSpec.build(client.settings, "Forget me.", max_depth=1))
        watch = subprocess.Popen(
            [sys.executable, "-m", "tasktree", "watch", tid],
            cwd=ROOT,
            env={**os.environ, **wenv},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_done(client, tid, 0)
        time.sleep(2.0)  # the children's calls are in flight
        server.stop()
        server.start()  # empty: nothing was persisted
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 2
        assert err.strip() == (
            f"tasktree: error: tree {tid} no longer exists (the store was reset?)"
        )
        time.sleep(3.0)  # the in-flight calls return and try to record
        r = redis.Redis.from_url(url, decode_responses=True)
        assert r.keys(f"tasktree:{{{tid}}}*") == []
        assert worker.proc.poll() is None
        assert "no longer exists (the store was reset?); dropping" in worker.log.read_text()
    finally:
        worker.kill()
        server.stop()


def test_two_deployments_on_one_redis_never_run_each_others_trees(
    env, settings_for, start_workers
) -> None:
    """Queue qa has no worker yet; qb's worker sweeps often. qa's tree must wait for qa."""
    fast = {"TASKTREE_STALL_SECONDS": "1", "TASKTREE_SWEEP_INTERVAL": "0.5"}
    qa = {
        "TASKTREE_NODE_QUEUE": f"{env['TASKTREE_NODE_QUEUE']}-a",
        "TASKTREE_SYNTH_QUEUE": f"{env['TASKTREE_NODE_QUEUE']}-a.s",
    }
    qb = {
        "TASKTREE_NODE_QUEUE": f"{env['TASKTREE_NODE_QUEUE']}-b",
        "TASKTREE_SYNTH_QUEUE": f"{env['TASKTREE_NODE_QUEUE']}-b.s",
    }
    start_workers(1, extra_env={**qb, **fast}, names=["bee@%h"])
    client_a = Client(
        settings_for(node_queue=qa["TASKTREE_NODE_QUEUE"], synth_queue=qa["TASKTREE_SYNTH_QUEUE"])
    )
    client_b = Client(
        settings_for(node_queue=qb["TASKTREE_NODE_QUEUE"], synth_queue=qb["TASKTREE_SYNTH_QUEUE"])
    )
    tree_a = client_a.submit(TreeSpec.build(client_a.settings, "For A. This includes a, and b."))
    tree_b = client_b.wait(
        client_b.submit(TreeSpec.build(client_b.settings, "For B. This includes a, and b."))
    )
    assert {n.worker.split("@")[0] for n in tree_b.nodes} == {"bee"}
    time.sleep(4)  # eight of bee's sweeps, each after a stall period
    waiting = client_a.tree(tree_a)
    assert waiting.status == "running"
    assert [(n.status, n.calls) for n in waiting.nodes] == [("queued", 0)]
    start_workers(1, extra_env={**qa, **fast}, names=["ant@%h"])
    done = client_a.wait(tree_a, timeout=30)
    assert done.status == "completed"
    assert {n.worker.split("@")[0] for n in done.nodes} == {"ant"}


@pytest.mark.timeout(180)
def test_a_redis_stall_of_twelve_seconds_pays_and_counts_every_call_once(
    env, settings_for, tmp_path: Path
) -> None:
    """redis-server frozen 12 s mid-tree (longer than redis-py's 5 s socket timeout, so
    scripts are re-sent when it resumes): every node's usage is what the model was asked."""
    server, url = aof_redis(tmp_path)
    wenv = {**env, "TASKTREE_REDIS_URL": url, "TASKTREE_OFFLINE_FANOUT": "3"}
    wenv["TASKTREE_OFFLINE_LATENCY"] = "0.5"
    worker = WorkerProcess(wenv, "stall@%h", tmp_path)
    try:
        worker.wait_ready()
        client = Client(settings_for(redis_url=url))
        tid = client.submit(TreeSpec.build(client.settings, "Outlive a stall.", max_depth=2))
        wait_done(client, tid, 2)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        time.sleep(12)
        server.proc.send_signal(signal.SIGCONT)
        tree = client.wait(tid, timeout=120)
        assert tree.status == "completed"
        assert {n.id: n.calls for n in tree.nodes} == expected_calls(tree)
        assert tree.calls == sum(expected_calls(tree).values())
        assert tree.tokens == sum(n.tokens for n in tree.nodes)
        assert worker.proc.poll() is None
    finally:
        worker.kill()
        server.stop()


@pytest.mark.timeout(180)
def test_the_sweeper_outlives_redis_going_away(env, settings_for, tmp_path: Path) -> None:
    """redis-server frozen 20 s: the keeper's sweeps fail (its store gives up after 1 s of retries, a
    test setting) and are logged; afterwards the same worker still recovers a kill -9."""
    server, url = aof_redis(tmp_path)
    wenv = {
        **env,
        "TASKTREE_REDIS_URL": url,
        "TASKTREE_OFFLINE_FANOUT": "4",
        "TASKTREE_OFFLINE_LATENCY": "0.8",
        "TASKTREE_STEP_LEASE": "3",
        "TASKTREE_SWEEP_INTERVAL": "1",
    }
    keeper = WorkerProcess({**wenv, "TASKTREE_REDIS_RETRY_SECONDS": "1"}, "keeper@%h", tmp_path)
    doomed = WorkerProcess(wenv, "doomed@%h", tmp_path)
    try:
        keeper.wait_ready()
        doomed.wait_ready()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        time.sleep(20)
        server.proc.send_signal(signal.SIGCONT)
        keeper.wait_for_log("sweep failed (cannot reach Redis", timeout=5)
        client = Client(settings_for(redis_url=url))
        tid = client.submit(TreeSpec.build(client.settings, "Outlive the outage.", max_depth=2))
        wait_for_a_leaf_on(client, tid, doomed)
        doomed.kill()
        tree = client.wait(tid, timeout=90)
        assert tree.status == "completed"
        assert {n.id: n.calls for n in tree.nodes} == expected_calls(tree)
        keeper.wait_for_log("its run's worker died", timeout=1)
        assert keeper.proc.poll() is None
    finally:
        keeper.kill()
        doomed.kill()
        server.stop()
