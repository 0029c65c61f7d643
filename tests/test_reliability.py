"""Crashes, duplicates, Redis restarts, poison messages and security, with real processes."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from tasktree.client import Client
from tasktree.models import TreeSpec
from tasktree.proto import TaskRequest, to_dict
from tests.helpers import RedisServer, WorkerProcess

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
    assert tree.status == "completed" and len(tree.nodes) == 13
    assert all(n.status == "completed" and n.result for n in tree.nodes)
    assert {n.id: n.calls for n in tree.nodes} == expected_calls(tree)  # no stored step re-paid
    assert any(n.deliveries > 1 for n in tree.nodes)  # some work really was redelivered
    # Recovery is bounded by visibility timeout + restore interval (+ stall time for a lost
    # chord callback) + a worker's start-up.
    assert all(r < 4 + 1 + 3 + 30 for r in recoveries), recoveries
    print(f"recovery after kill -9: {[round(r, 1) for r in recoveries]} s")


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
    assert tree.status == "completed" and len(tree.nodes) == 7
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
    assert client.tree(tid).calls == tree.calls and client.store.events(tid) == before


def test_redis_restart_mid_tree(env, settings_for, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
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
        assert tree.status == "completed" and len(tree.nodes) == 13
        assert all(n.status == "completed" for n in tree.nodes)
    finally:
        worker.stop()
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
    assert tree.status == "completed_with_errors" and crashes == 2
    poison = next(n for n in tree.nodes if n.persona == "You are an expert in poison pill.")
    assert (
        poison.status == "failed" and "earlier runs of this node ended in a crash" in poison.error
    )
    root = tree.root
    assert (
        root.status == "completed" and len(root.context_keys) == 2 and "poison pill" in root.result
    )


def _poison_worker(env: dict, tmp_path: Path, n: int) -> WorkerProcess:
    w = WorkerProcess.__new__(WorkerProcess)
    w.name = f"poison{n}@%h"
    w.log = tmp_path / f"poison{n}.log"
    import os
    import sys

    from tests.helpers import ROOT

    w.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.poison_app",
            "worker",
            "-n",
            w.name,
            "--loglevel",
            "INFO",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=w.log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return w


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
    assert client.store.node(tid, "0").status == "queued" and client.store.node(tid, "0").calls == 0
    assert r.llen(env["TASKTREE_NODE_QUEUE"]) == 0 and r.hlen("unacked") == 0  # not redelivered


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
                assert _secret_free(r, "s3cret-pw") and _secret_free(r, "agent-pw-9")
                assert (
                    "s3cret-pw" not in w.log.read_text() and "agent-pw-9" not in w.log.read_text()
                )
            finally:
                w.stop()
        wrong = Client(settings_for(redis_url=f"redis://:wrong@127.0.0.1:{server.port}/0"))
        from tasktree.errors import StoreError

        with pytest.raises(StoreError, match="credentials|invalid|WRONGPASS|password"):
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
        assert tree.status == "completed" and len(tree.nodes) == 3
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
    assert tree.status == "completed" and "Synthesis of 2 parts" in tree.result


def test_lost_node_message_is_re_driven(client, start_workers) -> None:
    """A node whose message vanished (queued, no claim, nothing in any queue) is re-sent."""
    tid = client.store.create_tree(
        TreeSpec.build(client.settings, "Lost message. This includes a, b.")
    )
    start_workers(1, extra_env={"TASKTREE_STALL_SECONDS": "1", "TASKTREE_RESTORE_INTERVAL": "1"})
    tree = client.wait(tid)  # the root's message was never sent at all
    assert tree.status == "completed" and len(tree.nodes) == 3
    assert client.store.node_hash(tid, "0").get("redriven_at")
