"""The broker transport: closing a channel after its connection was detached (the broker went
away with messages in flight) must not crash the worker, and must not lose the messages; and,
last, the result backend's chord script."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
import redis
from kombu import Connection

from tasktree.models import TreeSpec
from tasktree.transport import Transport

pytestmark = pytest.mark.integration


def delivered_channel(url: str, transport: object) -> tuple[Connection, object]:
    """A connection whose channel has one message delivered and not yet acknowledged."""
    conn = Connection(url, transport=transport)
    channel = conn.channel()
    channel.queue_declare("tt-transport-test")
    channel.basic_publish(
        channel.prepare_message("payload"), exchange="", routing_key="tt-transport-test"
    )
    message = channel.basic_get("tt-transport-test", no_ack=False)
    assert message is not None
    return conn, channel


def test_kombus_own_transport_crashes_on_this_path(redis_url, r) -> None:
    """The defect, shown on kombu's own class: the reason this module exists."""
    conn, channel = delivered_channel(redis_url, "redis")
    channel.connection.client = None  # what Connection._close / collect do before channels close
    with pytest.raises(AttributeError, match="hostname"):
        channel.close()
    conn.release()


def test_closing_a_detached_channel_keeps_the_worker_and_the_message(redis_url, r) -> None:
    conn, channel = delivered_channel(redis_url, Transport)
    channel.connection.client = None
    channel.close()  # no AttributeError
    assert r.hlen("unacked") == 1  # still there: restore_visible returns it after the timeout
    conn.release()


def test_acking_on_a_closed_channel_leaves_the_message_unacknowledged(redis_url, r) -> None:
    """A task that finishes after the worker reconnected acks on its old, closed channel."""
    conn, channel = delivered_channel(redis_url, Transport)
    [tag] = list(channel.qos._delivered)
    channel.connection.client = None
    channel.close()
    channel.connection = None  # what the virtual channel's close leaves behind
    channel.qos.ack(tag)  # no AttributeError
    assert r.hlen("unacked") == 1
    conn.release()


def test_a_delivery_is_indexed_and_taken_out_in_one_round_trip_each(redis_url, r) -> None:
    """The unacked hash and index get a delivery and lose it on ack in a plain pipeline (no
    MULTI/EXEC: four commands fewer per message)."""
    conn, channel = delivered_channel(redis_url, Transport)
    [tag] = list(channel.qos._delivered)
    assert r.hexists("unacked", tag)
    assert r.zscore("unacked_index", tag) is not None
    with channel.qos.pipe_or_acquire() as pipe:
        assert pipe.transaction is False
    channel.qos.ack(tag)
    assert not r.hexists("unacked", tag)
    assert r.zscore("unacked_index", tag) is None
    conn.release()


def consuming_channel(url: str, prefetch: int) -> tuple[Connection, Any, list[tuple[str, bool]]]:
    """A channel consuming queue tt-transport-test with this prefetch, and what it delivered:
    (body, whether the message's unacked record was in Redis when the worker got it)."""
    r = redis.Redis.from_url(url)
    conn = Connection(url, transport=Transport)
    channel: Any = conn.channel()
    channel.queue_declare("tt-transport-test")
    channel.basic_qos(0, prefetch, False)
    got: list[tuple[str, bool]] = []

    def on_message(message: Any) -> None:
        got.append((message.body.decode(), bool(r.hexists("unacked", message.delivery_tag))))

    channel.basic_consume("tt-transport-test", no_ack=False, callback=on_message, consumer_tag="t")
    return conn, channel, got


def read_once(channel: Any) -> None:
    """One turn of the worker's loop on a readable BRPOP, as kombu's poller runs it."""
    channel.client.connection = channel.client.connection_pool.get_connection()
    channel._brpop_start(timeout=1)
    assert channel._brpop_read() is True


def publish(channel: Any, body: str) -> None:
    message = channel.prepare_message(body)
    channel.basic_publish(message, exchange="", routing_key="tt-transport-test")


def test_a_read_takes_the_waiting_messages_each_on_record_before_it_runs(redis_url, r) -> None:
    """After its BRPOP, one read takes more of the queue's messages in one script, as many as
    the prefetch allows, oldest first, each on record as unacked before the worker gets it."""
    conn, channel, got = consuming_channel(redis_url, prefetch=4)
    for i in range(6):
        publish(channel, f"m{i}")
    read_once(channel)
    assert got == [(f"m{i}", True) for i in range(4)]
    assert r.llen("tt-transport-test") == 2  # beyond the prefetch: left for later
    assert r.hlen("unacked") == r.zcard("unacked_index") == 4
    for tag in list(channel.qos._delivered):
        channel.qos.ack(tag)  # no event loop: each ack leaves Redis at once, as kombu's
    assert r.hlen("unacked") == r.zcard("unacked_index") == 0
    read_once(channel)
    assert got[4:] == [("m4", True), ("m5", True)]
    conn.release()


def test_a_malformed_message_among_those_taken_is_dropped_without_a_record(
    redis_url, r, caplog
) -> None:
    conn, channel, got = consuming_channel(redis_url, prefetch=10)
    publish(channel, "first")
    for bad in MALFORMED:
        r.lpush("tt-transport-test", bad)
    publish(channel, "last")
    with caplog.at_level(logging.ERROR, logger="tasktree.transport"):
        read_once(channel)
    assert got == [("first", True), ("last", True)]
    assert caplog.text.count("dropped a malformed message") == len(MALFORMED)
    assert r.llen("tt-transport-test") == 0
    assert sorted(r.hkeys("unacked")) == sorted(channel.qos._delivered)
    assert r.zcard("unacked_index") == 2
    conn.release()


def test_acks_on_an_event_loop_leave_redis_together_on_its_timer(redis_url, r) -> None:
    """On a worker's loop an ack frees its prefetch slot at once; the loop's timer takes the
    acked messages out of the unacked set together; closing the channel first takes out
    what is still waiting, so nothing acked goes back to the queue."""
    from kombu.asynchronous import Hub

    from tasktree.transport import ACK_INTERVAL

    conn, channel, got = consuming_channel(redis_url, prefetch=3)
    hub = Hub()
    conn.register_with_event_loop(hub)
    for i in range(4):
        publish(channel, f"m{i}")
    read_once(channel)
    assert len(got) == 3
    for tag in list(channel.qos._delivered):
        channel.qos.ack(tag)
    assert channel.qos.can_consume_max_estimate() == 3  # the slots are free
    assert r.hlen("unacked") == r.zcard("unacked_index") == 3  # the records wait for the timer
    time.sleep(ACK_INTERVAL * 1.5)
    hub.fire_timers()
    assert r.hlen("unacked") == r.zcard("unacked_index") == 0
    read_once(channel)
    [tag] = list(channel.qos._delivered)
    channel.qos.ack(tag)
    assert r.hlen("unacked") == 1
    channel.close()  # before kombu restores what is unacked, what was acked leaves
    assert r.hlen("unacked") == r.zcard("unacked_index") == 0
    assert r.llen("tt-transport-test") == 0
    hub.close()
    conn.release()


def test_an_index_entry_left_without_its_message_is_dropped_by_the_restore(redis_url, r) -> None:
    """What a connection lost halfway through those writes can leave: the restore drops it
    and puts nothing on a queue."""
    conn = Connection(redis_url, transport=Transport)
    channel = conn.channel()
    channel.queue_declare("tt-transport-test")
    r.zadd("unacked_index", {"half-written": 1.0})  # older than any visibility timeout
    channel.qos.restore_visible()
    assert r.zscore("unacked_index", "half-written") is None
    assert r.llen("tt-transport-test") == 0
    conn.release()


MALFORMED = [
    "this is not json {{{",
    json.dumps(
        {
            "body": "!!!not base64",
            "properties": {"body_encoding": "base64", "delivery_tag": "t1"},
            "headers": {},
            "content-type": "application/json",
            "content-encoding": "utf-8",
        }
    ),
    "[1, 2]",
    '"a string"',
    "{}",
]


def test_a_malformed_message_on_any_queue_is_dropped_and_the_worker_serves_on(
    env, client, start_workers
) -> None:
    [worker] = start_workers(1)
    for queue in (env["TASKTREE_NODE_QUEUE"], env["TASKTREE_SYNTH_QUEUE"]):
        for bad in MALFORMED:
            client.store.r.lpush(queue, bad)
    tree = client.wait(
        client.submit(TreeSpec.build(client.settings, "Still here. This includes a, and b."))
    )
    assert tree.status == "completed"
    assert worker.proc.poll() is None
    log = worker.log.read_text()
    assert log.count("dropped a malformed message") == 2 * len(MALFORMED)
    assert "Unrecoverable" not in log


def test_delivery_tags_are_unique_across_threads_and_a_forked_child(redis_url) -> None:
    """Numbered tags instead of kombu's uuid4 per message: every message a channel publishes
    gets its own tag from any thread, and a forked child starts a series of its own."""
    import os
    import threading

    conn = Connection(redis_url, transport=Transport)
    channel = conn.channel()
    tags: list[str] = []

    def publish() -> None:
        mine = [channel._next_delivery_tag() for _ in range(2000)]
        tags.extend(mine)

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tags)) == len(tags) == 16000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tag, then out without any teardown
        os.write(write, channel._next_delivery_tag().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    parent = channel._next_delivery_tag()
    assert child.split("-")[0] != parent.split("-")[0]
    assert child not in tags
    conn.release()


def test_a_chords_keys_expiry_is_refreshed_only_once_half_of_it_ran_out(r) -> None:
    """The result backend's chord script (workers/backend.py): Celery's, with one TTL instead
    of five EXPIREs for a child that returns while the keys have most of their time left, and
    a child's return counted once however often it comes."""
    from workers.backend import CHORD_PART_RETURN_LUA

    script = r.register_script(CHORD_PART_RETURN_LUA)
    names = ["g.j", "g.t", "g.s", "g.d", "g", "g.c"]
    r.set("g.s", 3, ex=100)  # the chord's size, as Celery's set_chord_size leaves it

    def part(task_id: str, index: int) -> list[object]:
        value = f'[1, "{task_id}", "SUCCESS", null]'
        return script(keys=names, args=[task_id, value, 1, index, 100, 100, 10, "token"])

    assert part("a", 0)[0] == 1  # the first child's return: the keys it made get the expiry
    assert part("a", 0)[0] == 1  # the same return again (a redelivery) counts once
    assert r.zcard("g.j") == r.scard("g.d") == 1
    assert 95 <= r.ttl("g.j") <= 100
    assert 95 <= r.ttl("g.d") <= 100
    assert 95 <= r.ttl("g.s") <= 100
    r.expire("g.j", 60)  # as if 40 s went by: more than half is left
    r.expire("g.s", 60)
    assert part("b", 1)[0] == 2
    assert r.ttl("g.j") <= 60
    assert r.ttl("g.s") <= 60
    r.expire("g.j", 40)  # less than half is left: the next return refreshes all of them
    assert part("c", 2) == [3, None, "3", 1]  # complete, and this return holds the claim
    assert r.ttl("g.j") >= 95
    assert r.ttl("g.s") >= 95
    assert r.ttl("g.d") >= 95
    # A chord grown by a replaced member has an adjustment key (INCR: no expiry): the first
    # child's return gives it one.
    r.set("h.s", 2, ex=100)
    r.incr("h.t")
    h = ["h.j", "h.t", "h.s", "h.d", "h", "h.c"]
    value = '[1, "x", "SUCCESS", null]'
    assert script(keys=h, args=["x", value, 1, 0, 100, 100, 10, "token"]) == [1, "1", "2", 0]
    assert 95 <= r.ttl("h.t") <= 100


def test_the_root_message_submit_builds_is_the_one_celery_sends(settings_for, r) -> None:
    """`submit` pushes its root's message without loading Celery (messages.node_message): it
    must be, field for field, what Celery's own send would have queued (the ids aside)."""
    from tasktree import messages
    from tasktree.proto import TaskRequest, to_dict

    settings = settings_for()
    queue = settings.node_queue
    req = TaskRequest(
        task_id="t1/0", persona_prompt="P " * 40, task_instructions="Do it.", tree_id="t1",
        node_id="0", depth=0,
    )  # fmt: skip
    messages.sender(settings).send_task(  # as tasktree sent a node's task through Celery
        messages.NODE,
        args=[to_dict(req)],
        argsrepr=messages.describe(req),
        ignore_result=True,
        queue=queue,
    )
    theirs = json.loads(r.rpop(queue))
    ours = json.loads(messages.node_message(req, queue))
    ids = {"id", "root_id", "correlation_id", "reply_to", "delivery_tag", "origin"}
    for message in (theirs, ours):
        for part in (message["headers"], message["properties"]):
            for name in ids & part.keys():
                assert part.pop(name), name  # present, and not empty
    assert ours == theirs


def celery_fan_out(app: Any, request: dict[str, Any], parent: Any, kids: list[Any]) -> None:
    """A delegating node's fan-out as Celery itself sends it: `Task.replace` with a chord,
    from inside the running node task (tasktree sent it so before messages.chord_messages)."""
    from celery import chord
    from celery._state import _task_stack
    from celery.exceptions import Ignore

    from tasktree import messages
    from tasktree.proto import to_dict

    settings = app.tasktree.settings

    def node(req: Any) -> Any:
        sig = app.signature(messages.NODE, args=(to_dict(req),), immutable=True)
        return sig.set(
            queue=settings.node_queue, argsrepr=messages.describe(req), ignore_result=True
        )

    synth = app.signature(
        messages.SYNTHESIZE, args=(parent.tree_id, parent.node_id), immutable=True
    )
    synth.set(queue=settings.synth_queue, argsrepr=messages.describe(parent), ignore_result=True)
    task = app.tasks[messages.NODE]
    task.push_request(**request)
    _task_stack.push(task)
    try:
        with pytest.raises(Ignore):  # how Celery's replace ends the task
            task.replace(chord([node(k) for k in kids], synth))
    finally:
        _task_stack.pop()
        task.pop_request()


@pytest.mark.parametrize("member", [True, False], ids=["inside-a-chord", "the-root"])
def test_a_fan_out_tasktree_builds_is_the_one_celerys_replace_sends(
    settings_for, r, member: bool
) -> None:
    """The chord a delegating node sends (messages.chord_messages) must be, field for field,
    what Celery's `Task.replace` would have queued: the children, each naming the synthesis
    that takes the node task's id and place in its own parent's chord, and the chord's size."""
    import base64

    from tasktree import messages
    from tasktree.proto import TaskRequest
    from workers import create_app

    settings = settings_for()
    app = create_app(settings)
    grandparent = {"task": messages.SYNTHESIZE, "args": ["t1", "0"], "kwargs": {},
                   "options": {"task_id": "gp-synth", "queue": settings.synth_queue},
                   "subtask_type": None, "immutable": True}  # fmt: skip
    request: dict[str, Any] = {
        "id": "node-task", "root_id": "root-task", "parent_id": "gp-task",
        "group": "gp-group" if member else None, "group_index": 2 if member else None,
        "chord": grandparent if member else None, "replaced_task_nesting": 1,
        "reply_to": "r", "hostname": "w@h", "is_eager": False, "called_directly": False,
        "args": [{}], "kwargs": {},
        "delivery_info": {"exchange": "", "routing_key": settings.node_queue},
    }  # fmt: skip
    parent = TaskRequest(task_id="t1/0.1", persona_prompt="P", task_instructions="x",
                         tree_id="t1", node_id="0.1", depth=1)  # fmt: skip
    kids = [
        TaskRequest(task_id=f"t1/0.1.{i}", persona_prompt=f"K{i}", task_instructions="y",
                    tree_id="t1", node_id=f"0.1.{i}", depth=2)
        for i in (1, 2, 3)
    ]  # fmt: skip

    def sent() -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The queued children, oldest first, their random ids blanked; the chord sizes."""
        out = []
        for raw in reversed(r.lrange(settings.node_queue, 0, -1)):
            m = json.loads(raw)
            m["body"] = json.loads(base64.b64decode(m["body"]))
            for part in (m["headers"], m["properties"]):
                for name in {
                    "id",
                    "correlation_id",
                    "delivery_tag",
                    "group",
                    "reply_to",
                } & part.keys():
                    assert part.pop(name), name  # present, and not empty
            m["body"][2]["chord"]["options"].pop("reply_to")
            out.append(m)
        sizes = {k.rsplit("-", 5)[0]: r.get(k) for k in r.keys("celery-taskset-meta-*.s")}
        assert all(r.ttl(k) > 0 for k in r.keys("celery-taskset-meta-*.s"))
        r.delete(settings.node_queue, *r.keys("celery-taskset-meta-*"))
        return out, sizes

    celery_fan_out(app, request, parent, kids)
    theirs = sent()
    ctx = app.tasks[messages.NODE]
    ctx.push_request(**request)
    try:
        group, payloads = messages.chord_messages(
            ctx.request, parent, kids, settings.node_queue, settings.synth_queue, app.thread_oid
        )
    finally:
        ctx.pop_request()
    size_key = app.backend.get_key_for_group(group, ".s")
    app.tasktree.store.send_chord(
        settings.node_queue, payloads, size_key, app.backend.chord_expires
    )
    ours = sent()
    assert [m["body"][0][0]["node_id"] for m in ours[0]] == ["0.1.1", "0.1.2", "0.1.3"]
    assert ours[0][0]["body"][2]["chord"]["options"]["task_id"] == "node-task"
    assert ours == theirs
    assert ours[1] == {"celery-taskset-meta": "3"}
    app.tasktree.store.r.close()


@pytest.mark.parametrize("failed", [False, True], ids=["all-returned", "a-child-failed"])
def test_a_chords_join_sends_the_synthesis_celerys_join_would(settings_for, r, failed) -> None:
    """The return that completes a chord sends the synthesis in one script (CHORD_FIRE_LUA):
    the very message Celery's own join sends, and the chord's keys gone but the set of
    returns counted, so a late duplicate sends and makes nothing. A child that failed at
    Celery's level takes Celery's error path: no synthesis, the synthesis's result stored as
    failed, the chord's size dropped."""
    import base64

    from celery._state import _task_stack
    from celery.app.task import Context
    from celery.backends.redis import RedisBackend

    from tasktree import messages
    from tasktree.proto import TaskRequest
    from workers import create_app

    settings = settings_for()
    app = create_app(settings)
    task = app.tasks[messages.NODE]
    task.push_request(id="node-task", root_id="root-task", group=None, group_index=None,
                      chord=None, called_directly=False)  # fmt: skip
    parent = TaskRequest(tree_id="t1", node_id="0.1", persona_prompt="P")
    kids = [TaskRequest(tree_id="t1", node_id=f"0.1.{i}", persona_prompt="K") for i in (1, 2, 3)]
    try:
        group, payloads = messages.chord_messages(
            task.request, parent, kids, settings.node_queue, settings.synth_queue, "reply"
        )
    finally:
        task.pop_request()
    size_key = app.backend.get_key_for_group(group, ".s").decode()

    def calls() -> int:
        return sum(c["calls"] for c in r.info("commandstats").values())

    commands: list[int] = []

    def returns(part_return: Any, which: range) -> None:
        """These children return (the second failed, if so)."""
        for i in which:
            m = json.loads(payloads[i])
            embed = json.loads(base64.b64decode(m["body"]))[2]
            h = m["headers"]
            ctx = Context(id=h["id"], root_id=h["root_id"], group=h["group"],
                          group_index=h["group_index"], chord=embed["chord"],
                          called_directly=False)  # fmt: skip
            task.push_request(**vars(ctx))
            _task_stack.push(task)
            try:
                if failed and i == 1:
                    part_return(ctx, "FAILURE", ValueError("boom"))
                else:
                    part_return(ctx, "SUCCESS", {"status": "completed"})
            finally:
                _task_stack.pop()
                task.pop_request()

    def sent() -> tuple[list[dict[str, Any]], list[str]]:
        """What was queued (taken off the queue), and which keys remain."""
        queued = [json.loads(x) for x in r.lrange(settings.synth_queue, 0, -1)]
        for m in queued:
            assert m["properties"].pop("delivery_tag")
        r.delete(settings.synth_queue)
        return queued, sorted(k for k in r.keys("*") if not k.startswith("_kombu."))

    def join(part_return: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """Every child returns: what was sent, and the keys left."""
        r.flushdb()
        r.set(size_key, len(payloads))
        before = calls()
        returns(part_return, range(len(payloads)))
        commands.append(calls() - before)
        return sent()

    celerys = lambda *a: RedisBackend.on_chord_part_return(app.backend, *a)  # noqa: E731
    for _ in range(2):  # the second time with the scripts loaded and the queue declared
        theirs = join(celerys)
        ours = join(app.backend.on_chord_part_return)
    key = app.backend.get_key_for_group
    if failed:  # Celery's error path, both times
        assert ours == theirs
        queued, left = ours
        assert queued == []
        assert "celery-task-meta-node-task" in left  # the synthesis, failed by the chord
        assert size_key not in left
        return
    assert ours[0] == theirs[0]  # the same synthesis message
    assert commands[3] <= commands[2] - 4, commands  # Celery's join: four more round trips
    [synthesis] = ours[0]
    assert synthesis["headers"]["id"] == "node-task"  # the node task's id and place
    assert synthesis["headers"]["parent_id"] == json.loads(payloads[-1])["headers"]["id"]
    # Celery leaves its "done" marker; tasktree the set of returns counted, as long.
    assert theirs[1] == [key(group, ".c").decode()]
    assert ours[1] == [key(group, ".d").decode()]
    assert 0 < r.ttl(key(group, ".d")) <= 300
    # A late duplicate of a return is counted as seen: nothing is sent, nothing made again.
    returns(app.backend.on_chord_part_return, range(1, 2))
    assert sent() == ([], ours[1])
    app.tasktree.store.r.close()


def test_a_process_serves_all_its_pool_threads_at_once_on_one_backend_and_store(
    settings_for, r
) -> None:
    """Every pool thread of a worker may be in a Redis call at the same moment: the store's
    client and the one result backend the threads share open that many connections, where
    redis-py's default pool stops at 100 ("Too many connections")."""
    import threading

    from tasktree.store import Store
    from workers import create_app

    settings = settings_for(concurrency=150)
    store = Store.from_settings(settings)
    app = create_app(settings)
    backends: list[Any] = []
    failures: list[BaseException] = []
    start = threading.Barrier(150)
    app.backend  # noqa: B018 - as the worker's start step builds it, before any task runs

    def pool_thread(i: int) -> None:
        try:
            backend = app.backend
            backends.append(backend)
            start.wait()
            store.r.blpop([f"tt-nothing-{i}"], timeout=0.5)  # all 150 hold a connection now
            backend.client.blpop([f"tt-nothing-{i}"], timeout=0.5)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            failures.append(e)

    threads = [threading.Thread(target=pool_thread, args=(i,)) for i in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len({id(b) for b in backends}) == 1  # one backend per process, not one per thread
    assert int(r.info("clients")["connected_clients"]) >= 150
