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

_HOST = socket.gethostname()


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


def send_node(store: Store, req: TaskRequest, queue: str) -> None:
    """Send one node's task (the root, or a node the sweeper found lost): its message, built
    here, pushed onto the queue by the store in one round trip."""
    store.enqueue(queue, node_message(req, queue))


def node_message(req: TaskRequest, queue: str) -> str:
    """A node's task message as Celery's `send_task` would queue it (protocol 2, in kombu's
    Redis envelope), built without loading Celery: `submit` then needs no Celery app, which
    saves its process the ~0.1 s that importing Celery and building one take.
    tests/test_transport.py holds it to what Celery sends."""
    return task_message(NODE, [to_dict(req)], queue, describe(req))


def chord_messages(
    request: Any,
    parent: TaskRequest,
    children: list[TaskRequest],
    queue: str,
    synth_queue: str,
    reply_to: str,
) -> tuple[str, list[str]]:
    """A delegating node's fan-out, as Celery's `Task.replace` with its chord would send it
    from the node task's `request`: the group's id, and its children's messages, each naming
    the chord's callback (the node's synthesis). The synthesis takes the replaced task's id
    and place (its group, index and chord), so its return counts in the grandparent's chord.
    Built here, not through Celery's canvas, which spent 4 ms of CPU per fan-out of five
    (tests/test_transport.py holds these to what Celery sends)."""
    nesting = int(request.get("replaced_task_nesting") or 0) + 1
    options: dict[str, Any] = {
        "argsrepr": describe(parent),
        "ignore_result": True,
        "queue": synth_queue,
        "task_id": request.id,
        "chord": request.chord,
        "group_id": request.group,
        "group_index": request.group_index,
        "root_id": request.root_id,
        "replaced_task_nesting": nesting,
        "reply_to": reply_to,
    }
    callback = {
        "task": SYNTHESIZE,
        "args": [parent.tree_id, parent.node_id],
        "kwargs": {},
        "options": options,
        "subtask_type": None,
        "immutable": True,
    }
    group = str(uuid.uuid4())
    return group, [
        task_message(
            NODE,
            [to_dict(child)],
            queue,
            describe(child),
            root_id=request.root_id,
            parent_id=request.id,
            group=group,
            group_index=i,
            chord=callback,
            nesting=nesting,
            reply_to=reply_to,
        )
        for i, child in enumerate(children)
    ]


def callback_message(callback: dict[str, Any], parent_id: str) -> tuple[str, str]:
    """The queue and message of a chord's callback (the synthesis named by chord_messages),
    as Celery's join sends it from the task whose return completed the chord (`parent_id`)."""
    options = callback["options"]
    return options["queue"], task_message(
        callback["task"],
        list(callback["args"]),
        options["queue"],
        options["argsrepr"],
        task_id=options["task_id"],
        root_id=options["root_id"],
        parent_id=parent_id,
        group=options["group_id"],
        group_index=options["group_index"],
        chord=options["chord"],
        nesting=options["replaced_task_nesting"],
        reply_to=options["reply_to"],
    )


def task_message(
    name: str,
    args: list[Any],
    queue: str,
    argsrepr: str,
    *,
    task_id: str | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    group: str | None = None,
    group_index: int | None = None,
    chord: dict[str, Any] | None = None,
    nesting: int = 0,
    reply_to: str | None = None,
) -> str:
    """One task message (protocol 2) in kombu's Redis envelope, for `queue`."""
    task_id = task_id or str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": chord}
    body = json.dumps([args, {}, embed]).encode()
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": group,
        "group_index": group_index,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr,
        "kwargsrepr": "{}",
        "origin": f"gen{os.getpid()}@{_HOST}",  # Celery's: the sending process
        "ignore_result": True,
        "replaced_task_nesting": nesting,
        "stamped_headers": None,
        "stamps": {},
    }
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_to or str(uuid.uuid4()),
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
