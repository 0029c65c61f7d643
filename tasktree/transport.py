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

A worker's acknowledgements leave Redis in batches. kombu takes each acked message out of the
unacked hash and index with a round trip of its own, on the worker's event loop (Celery runs
every ack there), which also receives every message: in a burst of a fan-out's children,
those round trips held the loop between receipts. Here an ack frees its prefetch slot at once
and the loop's timer takes the batch out every ACK_INTERVAL seconds, in one HDEL and one ZREM
(sooner when ACK_BATCH are waiting; at once without an event loop; when the channel closes,
what is waiting first). A worker killed in between leaves that batch's messages unacked: they
come back after the visibility timeout, and each node answers from the store.

And a worker takes the messages waiting on a queue together. kombu's loop takes one message
per BRPOP, then writes its unacked record in a second round trip: in the same burst, two
round trips on the loop per message. Here, after a BRPOP, one script writes that message's
record and takes up to TAKE more from the same queue (its prefetch allowing), each popped
and recorded in the same script, before any of them is handed to Celery. kombu's guarantee
holds: a message is on record as unacked before it runs, and the taken ones have no moment
off the queue without their record.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

ACK_INTERVAL = 0.1  # seconds an ack waits, at most, to leave Redis with the others
ACK_BATCH = 500  # acks waiting that leave at once
TAKE = 16  # messages a worker takes, at most, after the one its BRPOP brought

#: KEYS: the unacked index and hash, then the queue's lists (by priority). ARGV: how many to
#: take, the index score (now), the BRPOP'd message's tag and unacked record. Returns, per
#: message taken, its payload and 1 if its record was written (0: not a kombu envelope, which
#: the worker drops unrecorded).
TAKE_LUA = """
local n, now = tonumber(ARGV[1]), ARGV[2]
local index, hash, out = {now, ARGV[3]}, {ARGV[3], ARGV[4]}, {}
for i = 3, #KEYS do
  if n <= 0 then break end
  local items = redis.pcall('RPOP', KEYS[i], n)
  if type(items) == 'table' and items.err then  -- a Redis before 6.2: no count
    items = {}
    for _ = 1, n do
      local item = redis.call('RPOP', KEYS[i])
      if not item then break end
      table.insert(items, item)
    end
  end
  for _, item in ipairs(items or {}) do
    local ok, m = pcall(cjson.decode, item)
    local p = ok and type(m) == 'table' and m.properties
    local d = type(p) == 'table' and p.delivery_info
    local recorded = 0
    if type(d) == 'table' and type(p.delivery_tag) == 'string' then
      table.insert(index, now); table.insert(index, p.delivery_tag)
      table.insert(hash, p.delivery_tag)
      table.insert(hash, '[' .. item .. ', ' .. cjson.encode(d.exchange) .. ', '
        .. cjson.encode(d.routing_key) .. ']')
      recorded = 1
    end
    table.insert(out, item); table.insert(out, recorded)
    n = n - 1
  end
end
redis.call('ZADD', KEYS[1], unpack(index))
redis.call('HSET', KEYS[2], unpack(hash))
return out
"""


class QoS(redis.QoS):
    """kombu's QoS, which leaves a message unacknowledged (not the worker dead) when its
    channel was closed under it, and which writes a delivery to the unacked index and hash,
    and takes it out again, in one pipelined round trip without MULTI/EXEC.

    A transaction adds nothing there: each message's two entries are its own, and
    `restore_visible` only takes entries older than the visibility timeout. A connection lost
    halfway leaves at most an index entry without its hash entry (the hash entry goes first
    when a message is taken out), and `restore_by_tag` drops such an entry.

    On a worker's event loop, acks leave Redis in batches (`flush_acks`, the module's doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acked: list[str] = []
        self._acked_lock = threading.Lock()
        self.recorded: set[str] = set()  # delivered with their unacked record already written

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

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
        if not getattr(self.channel.connection, "batches_acks", False):
            super().ack(delivery_tag)
            return
        virtual.QoS.ack(self, delivery_tag)  # its prefetch slot is free now
        with self._acked_lock:
            self._acked.append(delivery_tag)
            full = len(self._acked) >= ACK_BATCH
        if full:
            self.flush_acks()

    def flush_acks(self) -> None:
        """Take the acked messages out of the unacked hash and index, in one round trip. If
        Redis cannot be reached, they wait for the next flush."""
        with self._acked_lock:
            tags, self._acked = self._acked, []
        if not tags or self._detached():
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.hdel(self.unacked_key, *tags).zrem(self.unacked_index_key, *tags).execute()
        except self.channel.connection_errors:
            with self._acked_lock:
                self._acked[:0] = tags
            raise

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


class _Safe:
    """kombu's channel, which drops a malformed message (one log line) instead of letting the
    decoding error end the worker (every payload-level problem is Celery's and tasktree's to
    reject; these are the ones below them), which publishes through one Redis client
    instead of building a new one for every message (redis-py clients are thread-safe),
    and which numbers its delivery tags instead of drawing a uuid4 for each."""

    QoS = QoS
    _sync_client: Any = None
    _take_script: Any = None
    _in_poll: Any = False  # kombu's: the connection a BRPOP is waiting on

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

    def flush_acks(self) -> None:
        qos = getattr(self, "_qos", None)  # kombu builds it on first use: none, nothing acked
        if qos is not None:
            qos.flush_acks()

    def close(self) -> None:
        with contextlib.suppress(*self.connection_errors):  # type: ignore[attr-defined]
            self.flush_acks()  # before kombu restores what is unacked
        self._sync_client = None
        super().close()  # type: ignore[misc]

    def _brpop_read(self, **options: Any) -> Any:
        if self.global_keyprefix:  # type: ignore[attr-defined]
            try:  # one message per read, as kombu does (keys are prefixed on its client)
                return super()._brpop_read(**options)  # type: ignore[misc]
            except MALFORMED as e:  # BRPOP already took it off the queue (and rotated it last)
                queues = self._queue_cycle.items  # type: ignore[attr-defined]
                _dropped(queues[-1] if queues else "?", e)
                return True
        client = self.client  # type: ignore[attr-defined]
        try:  # kombu's BRPOP read, up to the message
            try:
                reply = client.parse_response(client.connection, "BRPOP", **options)
            except self.connection_errors:  # type: ignore[attr-defined]
                client.connection.disconnect()  # the next poll reconnects
                raise
            if not reply:
                raise Empty()
            queue = bytes_to_str(reply[0]).rsplit(self.sep, 1)[0]  # type: ignore[attr-defined]
            self._queue_cycle.rotate(queue)  # type: ignore[attr-defined]
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]
        raw = bytes_to_str(reply[1])
        try:
            first = loads(raw)
            props = first["properties"]
            tag, info = props["delivery_tag"], props["delivery_info"]
            record = dumps([first, info["exchange"], info["routing_key"]])
        except MALFORMED as e:
            _dropped(queue, e)
            return True
        for payload, recorded in [(first, tag), *self._take(queue, tag, record)]:
            try:
                self.connection._deliver(payload, queue)  # type: ignore[attr-defined]
            except MALFORMED as e:  # not a message kombu can build: dropped, record and all
                _dropped(queue, e)
                if recorded:
                    self.qos.recorded.discard(recorded)  # type: ignore[attr-defined]
                    self.qos._remove_from_indices(recorded).execute()  # type: ignore[attr-defined]
        return True

    def _take(self, queue: str, tag: str, record: str) -> list[tuple[Any, str | None]]:
        """Write the BRPOP'd message's record, and take up to TAKE more messages of its queue
        with theirs, in one script; returns them (payload, tag if recorded)."""
        qos = self.qos  # type: ignore[attr-defined]
        room = qos.can_consume_max_estimate()
        n = TAKE if room is None else max(0, min(TAKE, room - 1))
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps]  # type: ignore[attr-defined]
        with self.conn_or_acquire() as client:
            if self._take_script is None:
                self._take_script = client.register_script(TAKE_LUA)
            out = self._take_script(
                keys=[qos.unacked_index_key, qos.unacked_key, *lists],
                args=[n, time.time(), tag, record],
                client=client,
            )
        qos.recorded.add(tag)
        taken: list[tuple[Any, str | None]] = []
        for i in range(0, len(out), 2):
            raw = bytes_to_str(out[i])
            try:
                payload = loads(raw)
                recorded = payload["properties"]["delivery_tag"] if out[i + 1] else None
            except MALFORMED as e:
                _dropped(queue, e)  # taken off the queue, and no record was written
                continue
            if recorded:
                qos.recorded.add(recorded)
            taken.append((payload, recorded))
        return taken

    def _get(self, queue: str, timeout: Any = None) -> Any:  # kombu's redis one takes no timeout
        try:
            return super()._get(queue)  # type: ignore[misc]
        except MALFORMED as e:
            _dropped(queue, e)
            raise Empty() from None


class Channel(_Safe, redis.Channel):
    pass


class _AckBatches:
    """A transport whose channels' acks leave Redis in batches once it runs on an event loop."""

    batches_acks = False
    _acks_tref: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        if self._acks_tref is not None:  # a reconnect: one timer, not one more each time
            self._acks_tref.cancel()
        self._acks_tref = loop.call_repeatedly(ACK_INTERVAL, self.flush_acks)
        self.batches_acks = True

    def flush_acks(self) -> None:
        for channel in list(self.channels):  # type: ignore[attr-defined]
            try:
                channel.flush_acks()
            except self.connection_errors as e:  # type: ignore[attr-defined]
                log.warning("could not acknowledge messages (%s); trying again", e)


class Transport(_AckBatches, redis.Transport):
    Channel = Channel


class SentinelChannel(_Safe, redis.SentinelChannel):
    pass


class SentinelTransport(_AckBatches, redis.SentinelTransport):
    Channel = SentinelChannel
