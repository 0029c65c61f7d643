"""Flower sees the tree's tasks with readable names and short arguments, and no secrets."""

from __future__ import annotations

import base64
import json
import threading
import time

from tasktree.models import TreeSpec
from tests.helpers import Flower

SECRET = "sk-do-not-leak-1234567890"


def test_flower_shows_tasks_and_workers(env, client, start_workers, tmp_path) -> None:
    with Flower({**env, "TASKTREE_API_KEY": SECRET}, tmp_path) as flower:
        start_workers(1, extra_env={"TASKTREE_API_KEY": SECRET}, names=["agent1@%h"])
        tid = client.submit(
            TreeSpec.build(
                client.settings,
                "Plan a trip. This includes transport, lodging, and food.",
                persona="You are a travel planner with a very long persona " + "x" * 300,
            )
        )
        client.wait(tid)
        deadline = time.monotonic() + 30
        tasks: dict = {}
        while time.monotonic() < deadline:
            tasks = flower.get("/api/tasks")
            done = [t for t in tasks.values() if t.get("state") == "SUCCESS"]
            if len(done) >= 4:  # three parts and the root (replaced by its synthesis)
                break
            time.sleep(0.3)
        names = {t["name"] for t in tasks.values()}
        assert names == {"tasktree.node", "tasktree.synthesize"}
        # The root's task was replaced by its chord, whose body (the synthesis) keeps its id.
        nodes = [t for t in tasks.values() if t["name"] == "tasktree.node"]
        synth = [t for t in tasks.values() if t["name"] == "tasktree.synthesize"]
        assert len(nodes) == 3
        assert len(synth) == 1
        args = sorted(t["args"] for t in nodes + synth)
        assert (
            f"tree={tid} node=0 persona='You are a travel planner with a very lon'"
            in synth[0]["args"]
        )
        assert any(
            f"tree={tid} node=0.2 persona='You are an expert in lodging.'" in a for a in args
        )
        assert all(len(a) < 120 for a in args)  # short: never the full prompt
        assert synth[0]["worker"].startswith("agent1@")
        workers = flower.get("/api/workers?refresh=1")
        assert any(name.startswith("agent1@") for name in workers)
        everything = json.dumps(tasks) + json.dumps(workers)
        assert SECRET not in everything
        assert "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in everything


def test_task_events_leave_in_batches_on_the_loop_timer(env, r, client, start_workers) -> None:
    """Every task event a worker sends rides in a batch, one batch per EventBatches tick at
    most: without the timer, a busy worker sends one every two or three events."""
    from workers import EventBatches

    start_workers(1, extra_env={"TASKTREE_OFFLINE_FANOUT": "5"})
    got: list[tuple[float, str, int]] = []  # (received at, channel, events in it)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.psubscribe("*celeryev/task.*")
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            m = sub.get_message(timeout=0.05)
            if m:
                envelope = json.loads(m["data"])
                events = json.loads(base64.b64decode(envelope["body"]))
                got.append((time.monotonic(), m["channel"], len(events)))

    listener = threading.Thread(target=listen)
    listener.start()
    try:
        tid = client.submit(TreeSpec.build(client.settings, "Survey the field.", max_depth=2))
        tree = client.wait(tid)
        time.sleep(3 * EventBatches.EVENT_BATCH)  # the last batch
    finally:
        done.set()
        listener.join()
        sub.close()
    assert tree.status == "completed"
    assert len(tree.nodes) == 31
    assert sum(n for _, _, n in got) >= 3 * 31  # received, started, succeeded of each node
    assert {channel.rsplit("/", 1)[1] for _, channel, _ in got} == {"task.multi"}
    span = got[-1][0] - got[0][0]
    assert len(got) <= span / EventBatches.EVENT_BATCH + 3, (len(got), span)
