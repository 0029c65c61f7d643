"""Heartbeats: keep the claims of running model calls, and the runs in progress, alive while
their worker process lives.

A claim's lease is short (TASKTREE_STEP_LEASE, default 15 s) whatever the model's timeout:
one thread per worker process renews every claim its calls hold, three times per lease. When
the process dies or freezes, renewal stops and its claims expire within one lease, so another
run may take the step, and a late reply from the frozen run is fenced off (recorded as waste).

The same beat scores, in the live index, every message the worker process holds (running,
prefetched, or held for a countdown: Celery's own record of them), and takes off those it
no longer holds; a member whose score is a lease old belongs to a dead (or frozen) worker,
and the sweeper sends its node again at once, however busy the rest of the tree is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from tasktree.errors import StoreError, log_loop_failure
from tasktree.store import Store

log = logging.getLogger(__name__)

Claim = tuple[str, str, str, str]  # tree, node, step, token
Member = tuple[str, str]  # queue, live index member
Held = Callable[[], set[Member]]

RECEIPT_BATCH = 0.02  # seconds the beat thread gathers received messages before listing them


class Leases:
    """The claims and held messages of this process, renewed together by one thread (started
    in the process that first needs it, so a forked pool child gets its own). `held` says
    which live members the process holds now (the worker's own record of its messages)."""

    def __init__(self, store: Store, lease_seconds: float, held: Held | None = None) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self.held = held
        self._claims: set[Claim] = set()
        self._slots: set[tuple[str, str]] = set()  # (model, token) of calls in flight
        self._listed: set[Member] = set()  # what the last beat scored
        self._started: set[Member] = set()  # listed on receipt since the last beat
        self._received: set[Member] = set()  # received, for the beat thread to list now
        self._wake = threading.Event()
        self._unended: set[tuple[str, str, str]] = set()  # runs whose end Redis missed
        self._lock = threading.Lock()
        self._pid = 0
        self._stop = threading.Event()

    def hold(self, tree_id: str, node_id: str, step: str, token: str) -> None:
        self._ensure_thread()
        with self._lock:
            self._claims.add((tree_id, node_id, step, token))

    def drop(self, tree_id: str, node_id: str, step: str, token: str) -> None:
        with self._lock:
            self._claims.discard((tree_id, node_id, step, token))

    def hold_slot(self, model: str, token: str) -> None:
        self._ensure_thread()
        with self._lock:
            self._slots.add((model, token))

    def drop_slot(self, model: str, token: str) -> None:
        with self._lock:
            self._slots.discard((model, token))

    def end_later(self, tree_id: str, node_id: str, token: str) -> None:
        """A run ended while Redis was away: the next beats end it in the store."""
        self._ensure_thread()
        with self._lock:
            self._unended.add((tree_id, node_id, token))

    def _end_runs(self) -> None:
        with self._lock:
            pending = list(self._unended)
        for run in pending:
            try:
                self.store.end_run(*run)
            except StoreError:  # Redis still away: the next beat tries again
                return
            with self._lock:
                self._unended.discard(run)

    def start_run(self, queue: str, member: str) -> None:
        """List a received message in the live index at once, from the beat thread (the
        consumer never waits on Redis; a burst is listed in one round trip); the beats keep
        it there while the process holds it."""
        self._ensure_thread()
        with self._lock:
            self._received.add((queue, member))
        self._wake.set()

    def listed_by_run(self, queue: str, member: str) -> None:
        """A run's first round trip listed its message: a receipt's listing still to come
        skips it (a burst whose runs all began first costs the beat thread no round trip)."""
        with self._lock:
            if (queue, member) in self._received:
                self._received.discard((queue, member))
                self._started.add((queue, member))

    def list_received(self) -> None:
        """List what was received since the last look (Redis away: the next look does)."""
        with self._lock:
            received, self._received = self._received, set()
        if not received:
            return
        by_queue: dict[str, list[str]] = {}
        for queue, member in received:
            by_queue.setdefault(queue, []).append(member)
        try:
            self.store.renew([], by_queue, [], self.lease_seconds, check=False)  # just received
        except StoreError:
            with self._lock:
                self._received |= received
            raise
        with self._lock:
            self._started |= received

    def renew_once(self) -> int:
        """Extend every claim still held by its token, score every member the process holds,
        take off those it no longer holds (a message received and done between two beats
        too); returns how many claims were extended."""
        self.list_received()
        held = self.held() if self.held else set()
        with self._lock:
            started = set(self._started)
            claims = list(self._claims)
            slots: dict[str, list[str]] = {}
            for model, token in self._slots:
                slots.setdefault(model, []).append(token)
        released = list((self._listed | started) - held)
        if self._unended:
            self._end_runs()
        if not claims and not held and not released and not slots:
            return 0
        by_queue: dict[str, list[str]] = {}
        for queue, member in held:
            by_queue.setdefault(queue, []).append(member)
        extended = self.store.renew(claims, by_queue, released, self.lease_seconds, slots)
        self._listed = held
        with self._lock:
            self._started -= started
        return extended

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _ensure_thread(self) -> None:
        """Renew every third of a lease in a daemon thread of this process until stopped."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        interval = self.lease_seconds / 3

        def loop() -> None:
            beat = time.monotonic() + interval
            while not self._stop.is_set():
                self._wake.wait(max(0.0, beat - time.monotonic()))
                self._wake.clear()
                try:
                    if time.monotonic() >= beat:
                        beat = time.monotonic() + interval
                        self.renew_once()
                    else:
                        self._stop.wait(RECEIPT_BATCH)  # a fan-out's messages come together
                        self.list_received()
                except Exception as e:  # noqa: BLE001 - the heartbeat outlives any failure, logged
                    if self._stop.is_set():
                        return  # the worker is leaving, and Redis may be gone before it
                    log_loop_failure(log, "could not renew leases (%s); trying again", e)
                    self._stop.wait(1.0)  # not a busy loop on every message received

        threading.Thread(target=loop, name="tasktree-leases", daemon=True).start()
