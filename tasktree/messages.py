"""Task names, and how a node, a fan-out (chord) and a synthesis are sent to the workers.

The client, the worker's tasks and its sweeper all send through here, so a message has one
shape wherever it starts."""

from __future__ import annotations

from typing import Any

from tasktree.proto import TaskRequest, to_dict
from tasktree.settings import Settings

NODE = "tasktree.node"
SYNTHESIZE = "tasktree.synthesize"


def describe(req: TaskRequest) -> str:
    """What Flower shows as the task's arguments: ids and a short persona, never the prompt."""
    persona = " ".join(req.persona_prompt.split())[:40]
    return f"tree={req.tree_id} node={req.node_id} persona={persona!r}"


def sender(settings: Settings) -> Any:
    """A Celery app that only sends (and asks workers), configured like the workers' own."""
    from celery import Celery

    import celeryconfig

    app = Celery("tasktree", set_as_current=False)
    app.config_from_object(celeryconfig.config(settings))
    return app


# Nothing reads a task's result: the store holds everything. A chord member's return value
# still reaches the chord's join (Celery hands it over whether or not the result is stored),
# so no task leaves a celery-task-meta key behind.


def node_signature(app: Any, req: TaskRequest, queue: str) -> Any:
    return app.signature(NODE, args=(to_dict(req),), immutable=True, queue=queue).set(
        argsrepr=describe(req), ignore_result=True
    )


def synthesis_signature(app: Any, req: TaskRequest, queue: str) -> Any:
    return app.signature(
        SYNTHESIZE, args=(req.tree_id, req.node_id), immutable=True, queue=queue
    ).set(argsrepr=describe(req), ignore_result=True)


def fan_out(
    app: Any, parent: TaskRequest, children: list[TaskRequest], queue: str, synth_queue: str
) -> Any:
    """The chord of a delegating node: its children, then its synthesis."""
    from celery import chord

    header = [node_signature(app, c, queue) for c in children]
    return chord(header, synthesis_signature(app, parent, synth_queue))


def send_node(app: Any, req: TaskRequest, queue: str) -> None:
    """Send one node's task (the root, or a node the sweeper found lost)."""
    app.send_task(
        NODE,
        args=[to_dict(req)],
        argsrepr=describe(req),
        ignore_result=True,
        queue=queue,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )


def send_synthesis(app: Any, tree_id: str, node_id: str, queue: str) -> None:
    """Send one node's synthesis outside its chord (the sweeper's re-drive)."""
    app.send_task(SYNTHESIZE, args=[tree_id, node_id], ignore_result=True, queue=queue)
