"""Task names, and how a node, a fan-out (chord) and a synthesis are sent to the workers.

The client, the worker's tasks and its sweeper all send through here, so a message has one
shape wherever it starts."""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

from tasktree import keys
from tasktree.proto import TaskRequest, to_dict
from tasktree.settings import Settings

if TYPE_CHECKING:
    from tasktree.store import Store

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


def send_node(store: Store, req: TaskRequest, queue: str) -> None:
    """Send one node's task (the root, or a node the sweeper found lost): its message, built
    here, pushed onto the queue by the store in one round trip."""
    store.enqueue(queue, node_message(req, queue))


def node_message(req: TaskRequest, queue: str) -> str:
    """A node's task message as Celery's `send_task` would queue it (protocol 2, in kombu's
    Redis envelope), built without loading Celery: `submit` then needs no Celery app, which
    saves its process the ~0.1 s that importing Celery and building one take.
    tests/test_transport.py holds it to what Celery sends."""
    task_id = str(uuid.uuid4())
    argsrepr = describe(req)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([[to_dict(req)], {}, embed]).encode()
    headers: dict[str, Any] = {
        "lang": "py",
        "task": NODE,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": "{}",
        "origin": f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": str(uuid.uuid4()),
        "argsrepr": argsrepr,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": uuid.uuid4().hex,
    }
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    )


def send_due_synthesis(
    app: Any, store: Store, tree_id: str, node_id: str, default_queue: str
) -> str | None:
    """Send the parent's synthesis of a closed node that its chord did not count (its
    message was re-sent, or its worker died before the chord's join) if every sibling is
    closed and the parent still waits; the store picks one sender. The parent's id if sent."""
    if node_id == keys.ROOT:
        return None
    due = store.synthesis_due(tree_id, node_id)
    if not due:
        return None
    parent = keys.parent_id(node_id)
    send_synthesis(app, tree_id, parent, due if due != "-" else default_queue)
    return parent


def send_synthesis(app: Any, tree_id: str, node_id: str, queue: str) -> None:
    """Send one node's synthesis outside its chord (the sweeper's re-drive)."""
    app.send_task(SYNTHESIZE, args=[tree_id, node_id], ignore_result=True, queue=queue)
