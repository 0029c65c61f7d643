"""kombu's Redis transport, safe to use after the broker connection was lost mid-task.

kombu 5.7.0: when the broker goes away with messages in flight, the worker closes the channel
and later reconnects on a new one. Two paths then reach the old channel's QoS, which builds a
Redis client from `self.connection.client`: `Channel.close` restoring the unacknowledged
messages (by then `Connection._close` or `collect` has set `client` to None), and a task that
finishes after the reconnect acknowledging its message on the old channel (whose `connection`
is None). Either raises AttributeError, which Celery does not treat as a connection error:
the worker exits with "Unrecoverable error". In both cases the message is still in the
unacked hash, so leaving it there loses nothing: `restore_visible` returns it to its queue
after the visibility timeout, and a redelivered node whose outcome is stored answers at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


class QoS(redis.QoS):
    """kombu's QoS, which leaves a message unacknowledged (not the worker dead) when its
    channel was closed under it, and which writes a delivery to the unacked index and hash,
    and takes it out again, in one pipelined round trip without MULTI/EXEC.

    A transaction adds nothing there: each message's two entries are its own, and
    `restore_visible` only takes entries older than the visibility timeout. A connection lost
    halfway leaves at most an index entry without its hash entry (the hash entry goes first
    when a message is taken out), and `restore_by_tag` drops such an entry."""

    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe is not None:  # restore_by_tag's, inside its WATCH transaction
            yield pipe
            return
        with self.channel.conn_or_acquire(client) as client:
            yield client.pipeline(transaction=False)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            return pipe.hdel(self.unacked_key, delivery_tag).zrem(
                self.unacked_index_key, delivery_tag
            )

    def _detached(self) -> bool:
        connection = self.channel.connection
        return connection is None or connection.client is None

    def restore_unacked(self, client: Any = None) -> Any:
        if client is None and self._detached():
            log.warning(
                "broker connection closed with %d message(s) unacknowledged: they return "
                "to their queue after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return super().restore_unacked(client)

    def ack(self, delivery_tag: Any) -> None:
        if self._detached():  # the task ran to its end; its node's outcome is stored
            log.warning("ack after the broker connection closed: message left unacknowledged")
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._detached():
            log.warning("reject after the broker connection closed: message left unacknowledged")
            return
        super().reject(delivery_tag, requeue=requeue)


#: What a message that is not a kombu envelope raises on its way in: bad JSON, bad base64
#: (binascii.Error is a ValueError), a list or a string where an object belongs, a missing key.
MALFORMED = (ValueError, TypeError, KeyError)


def _dropped(queue: str, error: Exception) -> None:
    log.error(
        "dropped a malformed message from queue %s: %s: %s", queue, type(error).__name__, error
    )


class _Tags:
    """Delivery tags: one series per process (a fresh one in a forked child), numbered in
    order. kombu makes each a uuid4, and os.urandom is a system call per message."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.prefix, self.count = uuid.uuid4().hex, itertools.count()

    def next(self) -> str:
        return f"{self.prefix}-{next(self.count)}"  # itertools.count is thread-safe


_tags = _Tags()
os.register_at_fork(after_in_child=_tags.restart)


class _Held(threading.local):
    puts: list[tuple[str, str]] | None = None
    channel: Any = None


_held = _Held()


@contextmanager
def puts_together() -> Iterator[None]:
    """The messages this thread publishes inside the block reach Redis together as it ends,
    in one pipelined round trip (none if the block raises): a delegation's chord sends its
    children so, not one LPUSH round trip each. Celery has done all its work for each
    message (the chord's size is stored first); only the final LPUSHes wait."""
    if _held.puts is not None:  # already inside one: its end sends these too
        yield
        return
    _held.puts = []
    try:
        yield
        puts, channel = _held.puts, _held.channel
    finally:
        _held.puts, _held.channel = None, None
    if not puts:
        return
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for key, payload in puts:
            pipe.lpush(key, payload)
        pipe.execute()


class _Safe:
    """kombu's channel, which drops a malformed message (one log line) instead of letting the
    decoding error end the worker (every payload-level problem is Celery's and tasktree's to
    reject; these are the ones below them), which publishes through one Redis client
    instead of building a new one for every message (redis-py clients are thread-safe),
    which numbers its delivery tags instead of drawing a uuid4 for each, and which holds a
    thread's messages inside `puts_together` for one round trip."""

    QoS = QoS
    _sync_client: Any = None

    def _next_delivery_tag(self) -> str:
        return _tags.next()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._sync_client is None:
            self._sync_client = self._create_client()  # type: ignore[attr-defined]
        yield self._sync_client

    def close(self) -> None:
        self._sync_client = None
        super().close()  # type: ignore[misc]

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        held = _held.puts
        # kombu's own publish batch, or a queue with an expiry (a PEXPIRE per put): as kombu does
        if held is None or "_publish_batch" in kwargs or queue in self._expires:  # type: ignore[attr-defined]
            super()._put(queue, message, **kwargs)  # type: ignore[misc]
            return
        priority = self._get_message_priority(message, reverse=False)  # type: ignore[attr-defined]
        held.append((self._q_for_pri(queue, priority), dumps(message)))  # type: ignore[attr-defined]
        _held.channel = _held.channel or self

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except MALFORMED as e:  # BRPOP already took it off the queue (and rotated it last)
            queues = self._queue_cycle.items  # type: ignore[attr-defined]
            _dropped(queues[-1] if queues else "?", e)
            return True

    def _get(self, queue: str, timeout: Any = None) -> Any:  # kombu's redis one takes no timeout
        try:
            return super()._get(queue)  # type: ignore[misc]
        except MALFORMED as e:
            _dropped(queue, e)
            raise Empty() from None


class Channel(_Safe, redis.Channel):
    pass


class Transport(redis.Transport):
    Channel = Channel


class SentinelChannel(_Safe, redis.SentinelChannel):
    pass


class SentinelTransport(redis.SentinelTransport):
    Channel = SentinelChannel
