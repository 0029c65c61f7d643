"""Peers on the same Celery and Redis: a bare chord tree of no-op tasks (the engine's floor) and
the naive design where a parent task blocks on its children's results."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, chord, group

from bench.shapes import Spec

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_transport_options={"visibility_timeout": 300},
)


def _spec(d: dict[str, Any]) -> Spec:
    return Spec(**d)


@app.task(bind=True, name="bench.bare_node")
def bare_node(self: Any, path: str, depth: int, spec: dict[str, Any], queue: str) -> str:
    s = _spec(spec)
    if depth < s.depth:
        time.sleep(s.lat(path, "decide"))
        kids = [
            bare_node.si(f"{path}.{i}", depth + 1, spec, queue).set(queue=queue)
            for i in range(1, s.fanout + 1)
        ]
        raise self.replace(chord(kids, bare_synth.si(path, spec).set(queue=queue)))
    time.sleep(s.lat(path, "execute"))
    return path


@app.task(name="bench.bare_synth")
def bare_synth(path: str, spec: dict[str, Any]) -> str:
    time.sleep(_spec(spec).lat(path, "synthesize"))
    return path


@app.task(name="bench.naive_node")
def naive_node(path: str, depth: int, spec: dict[str, Any], timeout: float, queue: str) -> str:
    s = _spec(spec)
    if depth < s.depth:
        time.sleep(s.lat(path, "decide"))
        kids = (
            naive_node.s(f"{path}.{i}", depth + 1, spec, timeout, queue).set(queue=queue)
            for i in range(1, s.fanout + 1)
        )
        res = group(kids)()
        res.get(timeout=timeout, disable_sync_subtasks=False)  # blocks this pool slot
        time.sleep(s.lat(path, "synthesize"))
        return path
    time.sleep(s.lat(path, "execute"))
    return path
