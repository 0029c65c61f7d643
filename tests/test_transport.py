"""The broker transport: closing a channel after its connection was detached (the broker went
away with messages in flight) must not crash the worker, and must not lose the messages."""

from __future__ import annotations

import json

import pytest
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
