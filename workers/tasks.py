"""Thin glue: Celery task ⇄ store ⇄ agent. A node task, and its chord's synthesis callback."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Celery, Task, chord, signals

from tasktree import keys
from tasktree.errors import PayloadError, StoreError
from tasktree.models import check_text
from tasktree.proto import TaskRequest, TaskResult, from_dict, to_dict
from tasktree.runner import NodeRun, Outcome

log = logging.getLogger(__name__)

NODE = "tasktree.node"
SYNTHESIZE = "tasktree.synthesize"
STORE_RETRY = 2.0  # seconds between tries while Redis is away


def describe(req: TaskRequest) -> str:
    """What Flower shows as the task's arguments: ids and a short persona, never the prompt."""
    persona = " ".join(req.persona_prompt.split())[:40]
    return f"tree={req.tree_id} node={req.node_id} persona={persona!r}"


def validate(payload: Any, settings: Any) -> TaskRequest:
    """Decode a node message; any problem raises PayloadError naming it."""
    req = from_dict(TaskRequest, payload)
    if not keys.TREE_ID_RE.match(req.tree_id) or not keys.NODE_ID_RE.match(req.node_id):
        raise PayloadError(f"invalid tree_id/node_id {req.tree_id!r}/{req.node_id!r}")
    try:
        check_text("persona_prompt", req.persona_prompt, settings.max_persona_chars)
        check_text("task_instructions", req.task_instructions, settings.max_task_chars)
    except Exception as e:
        raise PayloadError(str(e)) from None
    return req


def result_of(tree_id: str, node_id: str, outcome: Outcome) -> dict[str, Any]:
    """The chord member's return value: small; the content stays in the store."""
    ok = outcome.status == "completed"
    return to_dict(
        TaskResult(
            task_id=f"{tree_id}/{node_id}",
            success=ok,
            status=outcome.status,
            error_message=outcome.error,
        )
    )


def register(app: Celery) -> None:
    """Register the two tasks on `app`."""

    def run(task: Task, tree_id: str, node_id: str) -> NodeRun:
        rt = task.app.tasktree  # type: ignore[attr-defined]
        return NodeRun(
            rt.store,
            rt.settings,
            tree_id,
            node_id,
            worker=task.request.hostname or "",
            attempt=task.request.retries,
        )

    @app.task(name=NODE, bind=True, max_retries=None, acks_late=True, shared=False)
    def node(self: Task, payload: Any) -> dict[str, Any]:
        settings = self.app.tasktree.settings  # type: ignore[attr-defined]
        try:
            req = validate(payload, settings)
        except PayloadError as e:
            return reject(self, payload, e)
        nr = run(self, req.tree_id, req.node_id)
        try:
            outcome = nr.run_node(req)
        except StoreError as e:
            log.warning("store unavailable (%s); retrying node %s", e, req.node_id)
            raise self.retry(countdown=STORE_RETRY) from None
        if outcome.kind == "retry":
            raise self.retry(countdown=outcome.countdown)
        if outcome.kind == "delegate":
            header = [
                self.app.signature(NODE, args=(to_dict(c),), immutable=True).set(
                    argsrepr=describe(c)
                )
                for c in outcome.children
            ]
            body = self.app.signature(
                SYNTHESIZE, args=(req.tree_id, req.node_id), immutable=True
            ).set(argsrepr=describe(req))
            raise self.replace(chord(header, body))
        return result_of(req.tree_id, req.node_id, outcome)

    @app.task(name=SYNTHESIZE, bind=True, max_retries=None, acks_late=True, shared=False)
    def synthesize(self: Task, tree_id: str, node_id: str) -> dict[str, Any]:
        if not (
            isinstance(tree_id, str)
            and keys.TREE_ID_RE.match(tree_id)
            and isinstance(node_id, str)
            and keys.NODE_ID_RE.match(node_id)
        ):
            return reject(
                self,
                {"tree_id": tree_id, "node_id": node_id},
                PayloadError("invalid synthesis arguments"),
            )
        nr = run(self, tree_id, node_id)
        try:
            outcome = nr.run_synthesis()
        except StoreError as e:
            log.warning("store unavailable (%s); retrying synthesis %s", e, node_id)
            raise self.retry(countdown=STORE_RETRY) from None
        if outcome.kind == "retry":
            raise self.retry(countdown=outcome.countdown)
        return result_of(tree_id, node_id, outcome)

    def reject(task: Task, payload: Any, error: Exception) -> dict[str, Any]:
        """A message that does not validate: fail its node if it names one, never redeliver."""
        log.error("rejected message %s: %s", task.request.id, error)
        tid = payload.get("tree_id") if isinstance(payload, dict) else None
        nid = payload.get("node_id") if isinstance(payload, dict) else None
        if (
            isinstance(tid, str)
            and keys.TREE_ID_RE.match(tid)
            and isinstance(nid, str)
            and keys.NODE_ID_RE.match(nid)
        ):
            with contextlib.suppress(StoreError):
                task.app.tasktree.store.finish(  # type: ignore[union-attr]
                    tid,
                    nid,
                    "failed",
                    error=f"invalid message: {error}",
                    worker=task.request.hostname or "",
                )
        return to_dict(TaskResult(success=False, status="failed", error_message=str(error)))

    @signals.worker_init.connect(weak=False)
    def _warm(sender: Any = None, **_: Any) -> None:
        """Import litellm when the worker starts, not on its first node."""
        own = getattr(sender, "app", None)
        if own is app:
            from tasktree.llm import warm

            warm(app.tasktree.settings)  # type: ignore[attr-defined,union-attr]

    sweepers: list[Any] = []

    @signals.worker_ready.connect(weak=False)
    def _start_sweeper(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            from workers import sweeper

            sweepers.append(sweeper.start(app))

    @signals.worker_shutdown.connect(weak=False)
    def _stop_sweeper(sender: Any = None, **_: Any) -> None:
        for stop in sweepers:
            stop.set()
