"""A Redis result backend for tasks that never wait on a Celery result.

Every chord that a node task fans out is frozen in the worker, and Celery's GroupResult then
subscribes (Redis pub/sub) to each child's result even though nothing will read it; the
subscriptions pile up while a tree runs and reconnect noisily after Redis goes away. tasktree
reads every outcome from the tree store, so its senders never subscribe. Chord counting
(on_chord_part_return) keeps Celery's keys and claim, in fewer commands: each child's return
takes six where Celery's takes thirteen or more (CHORD_PART_RETURN_LUA), and the return that
completes a chord sends the synthesis in one script (CHORD_FIRE_LUA).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from functools import cached_property
from typing import Any

from celery.backends import redis as celery_redis
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.canvas import maybe_signature
from celery.exceptions import ChordError

from tasktree import keys, messages

log = logging.getLogger(__name__)

#: Celery 5.7.0's chord-part script, which CHORD_PART_RETURN_LUA replaces (same keys, arguments
#: and reply): a Celery upgrade that changes it stops the import here.
CELERY_CHORD_PART_SHA1 = "b8fc152c83a7e634103ccebd49dcd3146a8f4366"
if hashlib.sha1(celery_redis.CHORD_PART_RETURN_LUA.encode()).hexdigest() != CELERY_CHORD_PART_SHA1:
    raise ImportError("Celery's chord-part script changed: update workers/backend.py")

#: Celery's chord-part script in six commands per child (the call itself counted) where it
#: takes thirteen or more: SADD's reply says whether the child is new (no SISMEMBER, and no
#: GET of a "done" marker: the set outlives a fired chord, CHORD_FIRE_LUA), one MGET
#: reads the chord's size and its adjustment, and the keys' expiry is set by the first child
#: on the keys it made and refreshed on all of them only past half their life (one TTL, not
#: five EXPIREs): the same window, give or take half of result_expires.
CHORD_PART_RETURN_LUA = """
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires, group_expires = tonumber(ARGV[5]), tonumber(ARGV[6])
local claim_expires = tonumber(ARGV[7])
local claim_token = ARGV[8]

-- Once per task id and header index (a reused frozen signature has its own index). A late
-- duplicate after the chord fired is one too: CHORD_FIRE_LUA keeps this set for the window
-- Celery keeps its "done" marker (the chord's size gone, it claims nothing either way).
if redis.call('SADD', dkey, tid .. ':' .. score) == 1 then
    if ordered == '1' then
        redis.call('ZADD', jkey, score, value)
    else
        redis.call('RPUSH', jkey, value)
    end
end
local readycount
if ordered == '1' then
    readycount = redis.call('ZCARD', jkey)
else
    readycount = redis.call('LLEN', jkey)
end
local sizes = redis.call('MGET', tkey, skey)
local totaldiff, size = sizes[1], sizes[2]
if expires > 0 then
    local ttl = redis.call('TTL', jkey)
    if ttl == -1 then
        -- The first child: the keys it made, and the adjustment's (INCR leaves it without one).
        -- The size key and the group's got theirs when the chord was made.
        redis.call('EXPIRE', jkey, expires)
        redis.call('EXPIRE', dkey, expires)
        if totaldiff then redis.call('EXPIRE', tkey, expires) end
    elseif ttl < expires / 2 then
        for _, key in ipairs({jkey, tkey, skey, dkey}) do
            redis.call('EXPIRE', key, expires)
        end
        if group_expires > 0 then
            redis.call('EXPIRE', gkey, group_expires)
        end
    end
end
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end

return {readycount, totaldiff, size, claimed}
"""


#: The join's last step, for the return that claimed a complete chord: Celery's takes four
#: round trips and a send (restore the group, read the results, extend the claim, publish the
#: callback, clean up). Here one script does them, the publish and the cleanup in one step:
#: with the claim still this return's (or expired and taken by nobody, which Celery's extend
#: takes back), and no child FAILED or REVOKED at Celery's level (then -1, and Celery's
#: error path runs), it pushes the synthesis's message (built like Celery's send), drops the
#: chord's keys but the set of returns counted, which outlives them by the window Celery
#: keeps its "done" marker: a late duplicate is counted as seen and recreates nothing.
#: 0: the claim passed to another.
CHORD_FIRE_LUA = """
local ckey, skey, jkey, tkey, dkey, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local token, ordered, done_expires, message = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local holder = redis.call('GET', ckey)
if holder ~= token and (holder or redis.call('EXISTS', skey) == 0) then return 0 end
local parts
if ordered == '1' then
    parts = redis.call('ZRANGE', jkey, 0, -1)
else
    parts = redis.call('LRANGE', jkey, 0, -1)
end
for _, part in ipairs(parts) do
    local ok, r = pcall(cjson.decode, part)
    if not ok or type(r) ~= 'table' or r[3] == 'FAILURE' or r[3] == 'REVOKED' then return -1 end
end
redis.call('LPUSH', queue, message)
redis.call('DEL', jkey, tkey, skey, ckey)
redis.call('EXPIRE', dkey, done_expires)  -- the returns counted: a late duplicate is one
return 1
"""


class _Lean:
    """What tasktree changes in Celery's Redis backends: no result subscriptions, and the
    chord join in fewer round trips and commands."""

    def add_pending_result(self, result: Any, weak: bool = False) -> Any:
        return result

    def remove_pending_result(self, result: Any) -> Any:
        return result

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None

    @cached_property
    def _chord_part_return_script(self) -> Any:
        return self.client.register_script(CHORD_PART_RETURN_LUA)  # type: ignore[attr-defined]

    @cached_property
    def _chord_fire_script(self) -> Any:
        return self.client.register_script(CHORD_FIRE_LUA)  # type: ignore[attr-defined]

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kw: Any
    ) -> Any:
        """Celery 5.7.0's join (RedisBackend.on_chord_part_return) as far as the claim; the
        return that claims a complete chord then sends its callback with CHORD_FIRE_LUA. A
        callback that is not tasktree's synthesis takes Celery's own way."""
        callback = request.chord
        if not _synthesis(callback):
            return super().on_chord_part_return(request, state, result, propagate, **kw)  # type: ignore[misc]
        tid, gid, group_index = request.id, request.group, request.group_index
        if not gid or not tid:
            return None
        key = self.get_key_for_group  # type: ignore[attr-defined]
        jkey, tkey, skey, dkey, ckey = (key(gid, s) for s in (".j", ".t", ".s", ".d", ".c"))
        encoded = self.encode([1, tid, state, self.encode_result(result, state)])  # type: ignore[attr-defined]
        join_timeout = self.app.conf.result_chord_join_timeout or 5.0  # type: ignore[attr-defined]
        claim_expires = max(5, int(join_timeout * 2))
        token = uuid.uuid4().hex
        ordered = 1 if self._chord_zset else 0  # type: ignore[attr-defined]
        ready, diff, size, claimed = self._chord_part_return_script(
            keys=[jkey, tkey, skey, dkey, key(gid), ckey],
            args=[tid, encoded, ordered, "+inf" if group_index is None else group_index,
                  self.chord_expires or 0, self._chord_result_expires,  # type: ignore[attr-defined]
                  claim_expires, token],
            client=self.client,  # type: ignore[attr-defined]
        )  # fmt: skip
        if ready == -1 or not size or not claimed or ready != int(size) + int(diff or 0):
            return None
        queue, message = messages.callback_message(callback, tid)
        fired = self._chord_fire_script(
            keys=[ckey, skey, jkey, tkey, dkey, keys.queue(queue)],
            args=[token, ordered, max(claim_expires * 2, 300), message],
            client=self.client,  # type: ignore[attr-defined]
        )
        if fired == 0:
            log.warning("Chord callback for %r not published: its claim passed to another", gid)
        elif fired == -1:
            return self._chord_failed(gid, callback, jkey, skey, ordered)
        return None

    def _chord_failed(self, gid: str, callback: Any, jkey: str, skey: str, ordered: int) -> Any:
        """A child failed at Celery's level: Celery's error path (the callback fails with a
        ChordError naming the child, and the chord's size goes)."""
        client = self.client  # type: ignore[attr-defined]
        parts = client.zrange(jkey, 0, -1) if ordered else client.lrange(jkey, 0, -1)
        try:
            for part in parts:
                self._unpack_chord_result(part, self.decode)  # type: ignore[attr-defined]
        except ChordError as exc:
            log.error("Chord %r raised: %r", gid, exc)
            try:
                callback = maybe_signature(callback, app=self.app)  # type: ignore[attr-defined]
                return self.chord_error_from_stack(callback, exc)  # type: ignore[attr-defined]
            finally:
                client.delete(skey)
        log.error("Chord %r: a child's return did not decode; its callback was not sent", gid)
        return None


def _synthesis(callback: Any) -> bool:
    """Is a chord's callback tasktree's synthesis, as messages.chord_messages names it?"""
    return isinstance(callback, dict) and callback.get("task") == messages.SYNTHESIZE


class Backend(_Lean, RedisBackend):
    """RedisBackend, lean (no result subscriptions, tasktree's chord join)."""

    def __init__(self, *args: Any, url: str | None = None, app: Any = None, **kw: Any) -> None:
        super().__init__(*args, url=url or app.conf.result_backend, app=app, **kw)


class Sentinel(_Lean, SentinelBackend):
    """SentinelBackend, lean (no result subscriptions, tasktree's chord join)."""

    def __init__(self, *args: Any, url: str | None = None, app: Any = None, **kw: Any) -> None:
        super().__init__(*args, url=url or app.conf.result_backend, app=app, **kw)


def for_url(url: str) -> type:
    return Sentinel if url.startswith(("sentinel://", "sentinels://")) else Backend
