"""Thin glue: Celery task ⇄ store ⇄ agent. A node task, and its chord's synthesis callback."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Celery, Task, signals

from tasktree import keys, messages
from tasktree.errors import InputError, PayloadError, StoreError
from tasktree.models import check_text
from tasktree.proto import TaskRequest, TaskResult, from_dict, to_dict
from tasktree.runner import Delegate, Done, NodeRun, Outcome, Retry
from tasktree.states import NODE_TERMINAL, NodeStatus

log = logging.getLogger(__name__)

STORE_RETRY = 2.0  # seconds between tries while Redis is away


def validate(payload: Any, settings: Any) -> TaskRequest:
    """Decode a node message; any problem raises PayloadError naming it."""
    req = from_dict(TaskRequest, payload)
    if not valid_ids(req.tree_id, req.node_id):
        raise PayloadError(f"invalid tree_id/node_id {req.tree_id!r}/{req.node_id!r}")
    try:
        check_text("persona_prompt", req.persona_prompt, settings.max_persona_chars)
        check_text("task_instructions", req.task_instructions, settings.max_task_chars)
    except InputError as e:
        raise PayloadError(str(e)) from None
    return req


def valid_ids(tree_id: object, node_id: object) -> bool:
    return (
        isinstance(tree_id, str)
        and keys.TREE_ID_RE.fullmatch(tree_id) is not None
        and isinstance(node_id, str)
        and keys.NODE_ID_RE.fullmatch(node_id) is not None
    )


def result_of(tree_id: str, node_id: str, done: Done) -> dict[str, Any]:
    """The chord member's return value: small; the content stays in the store."""
    ok = done.status == NodeStatus.COMPLETED
    return to_dict(
        TaskResult(
            task_id=f"{tree_id}/{node_id}",
            success=ok,
            status=done.status,
            error_message=done.error,
        )
    )


def node_run(task: Task, tree_id: str, node_id: str) -> NodeRun:
    """The run of this message; its first round trip lists the message in the live index."""
    rt = task.app.tasktree
    worker = task.request.hostname or ""
    member = live_member(task.name, task.request.args, task.request.properties)
    live = (rt.settings.node_queue, member) if member else None
    return NodeRun(
        rt.store, rt.settings, tree_id, node_id, worker, rt.complete, rt.leases, rt.tracing, live
    )


def follow(task: Task, req: TaskRequest, outcome: Outcome) -> dict[str, Any]:
    """Do what the outcome says: ack with a result, fan out, or run again later.

    A node closed by a message that is no chord's member (the sweeper re-sent it) has no
    chord to fire its parent's synthesis: the one sibling the store picks sends it."""
    if isinstance(outcome, Retry):
        log.debug("node %s again in %.1fs: %s", req.node_id, outcome.countdown, outcome.reason)
        raise task.retry(countdown=outcome.countdown)
    if isinstance(outcome, Delegate):
        try:
            fan_out(task, req, outcome)
        except StoreError as e:
            log.warning("store unavailable (%s); retrying node %s", e, req.node_id)
            raise task.retry(countdown=STORE_RETRY) from None
        done = TaskResult(task_id=f"{req.tree_id}/{req.node_id}", success=True, status="delegated")
        return to_dict(done)
    if not task.request.chord and outcome.status in NODE_TERMINAL:
        runtime = task.app.tasktree
        parent = messages.send_due_synthesis(
            task.app, runtime.store, req.tree_id, req.node_id, runtime.settings.synth_queue
        )
        if parent is not None:
            log.info(
                "tree %s: node %s closed outside a chord; sent %s's synthesis",
                req.tree_id,
                req.node_id,
                parent,
            )
    return result_of(req.tree_id, req.node_id, outcome)


def run_node(task: Task, payload: Any) -> dict[str, Any]:
    """The node task: decide, then execute or fan out."""
    try:
        req = validate(payload, task.app.tasktree.settings)
    except PayloadError as e:
        return reject(task, payload, e)
    try:
        outcome = node_run(task, req.tree_id, req.node_id).run_node(req)
    except StoreError as e:
        log.warning("store unavailable (%s); retrying node %s", e, req.node_id)
        raise task.retry(countdown=STORE_RETRY) from None
    return follow(task, req, outcome)


def run_synthesis(task: Task, tree_id: str, node_id: str) -> dict[str, Any]:
    """The chord callback: the parent's synthesis."""
    if not valid_ids(tree_id, node_id):
        bad = {"tree_id": tree_id, "node_id": node_id}
        return reject(task, bad, PayloadError("invalid synthesis arguments"))
    try:
        outcome = node_run(task, tree_id, node_id).run_synthesis()
    except StoreError as e:
        log.warning("store unavailable (%s); retrying synthesis %s", e, node_id)
        raise task.retry(countdown=STORE_RETRY) from None
    return follow(task, TaskRequest(tree_id=tree_id, node_id=node_id), outcome)


def reject(task: Task, payload: Any, error: Exception) -> dict[str, Any]:
    """A message that does not validate: fail its node if it names one, never redeliver."""
    log.error("rejected message %s: %s", task.request.id, error)
    tid = payload.get("tree_id") if isinstance(payload, dict) else None
    nid = payload.get("node_id") if isinstance(payload, dict) else None
    if valid_ids(tid, nid):
        with contextlib.suppress(StoreError):
            task.app.tasktree.store.finish(
                tid,
                nid,
                NodeStatus.FAILED,
                error=f"invalid message: {error}",
                worker=task.request.hostname or "",
            )
    scrubbed = task.app.tasktree.store.scrub(str(error))
    return to_dict(TaskResult(success=False, status="failed", error_message=scrubbed))


def live_member(name: str, args: Any, properties: Any) -> str | None:
    """A received message's member of the live index, by its delivery tag (a retry is a new
    message with the same task id), or None for a message that names no node."""
    tag = (properties or {}).get("delivery_tag")
    args = list(args or ())
    if name == messages.NODE and args and isinstance(args[0], dict):
        tree_id, node_id, kind = args[0].get("tree_id"), args[0].get("node_id"), "node"
    elif name == messages.SYNTHESIZE and len(args) == 2:
        tree_id, node_id, kind = args[0], args[1], "synthesis"
    else:
        return None
    if not (tag and valid_ids(tree_id, node_id)):
        return None
    return keys.live_member(str(tree_id), str(node_id), kind, str(tag))


def held_by(app: Celery) -> set[tuple[str, str]]:
    """The live members of the messages this process's worker holds for `app` now: running,
    reserved, or waiting out a countdown (Celery's own record, which drops what a lost broker
    connection took back)."""
    from celery.worker import state

    queue = app.tasktree.settings.node_queue
    held = set()
    for sets in (state.active_requests, state.reserved_requests, state.scheduled_requests):
        for request in list(sets):
            if request.app is app:
                properties = request.request_dict.get("properties")
                member = live_member(request.name, request.args, properties)
                if member:
                    held.add((queue, member))
    return held


@signals.task_received.connect
def on_received(request: Any, **_: Any) -> None:
    """List a message in the live index as soon as it arrives (the beat thread does, a burst
    in one round trip, and the run's own first round trip does too); the beats keep it there
    while the worker holds it and take it off at the first beat after. If
    the worker dies holding it, the sweeper sends its node again a lease after the beats stop
    (a message that had just finished is sent for nothing: its node answers from the store)."""
    runtime = getattr(request.app, "tasktree", None)
    member = live_member(request.name, request.args, request.request_dict.get("properties"))
    if runtime is not None and member:
        with contextlib.suppress(StoreError):
            runtime.leases.start_run(runtime.settings.node_queue, member)


def fan_out(task: Task, req: TaskRequest, outcome: Delegate) -> None:
    """Send the node's chord: its children, then its synthesis, which answers for this task
    from now on (Celery's `Task.replace`, without its canvas or its Ignore). The task then
    stops being a member of anything, so its normal return acknowledges the message and
    counts toward no chord (the synthesis does), and Flower sees it succeed."""
    request = task.request
    group, payloads = messages.chord_messages(
        request, req, outcome.children, outcome.queue, outcome.synth_queue, task.app.thread_oid
    )
    backend = task.app.backend
    size_key = backend.get_key_for_group(group, ".s")
    task.app.tasktree.store.send_chord(outcome.queue, payloads, size_key, backend.chord_expires)
    request.update(chord=None, callbacks=None, chain=None)


def register(app: Celery) -> None:
    """Register the two tasks on `app`."""
    options = {
        "bind": True,
        "max_retries": None,
        "acks_late": True,
        "shared": False,
    }
    app.task(name=messages.NODE, **options)(run_node)
    app.task(name=messages.SYNTHESIZE, **options)(run_synthesis)
