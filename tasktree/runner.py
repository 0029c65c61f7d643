"""One run of a node's task or synthesis: gate, call, record, transition. No Celery here."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tasktree import agent
from tasktree.errors import LLMError, NotFoundError, StoreError, TransientLLMError
from tasktree.llm import Reply
from tasktree.models import Node
from tasktree.proto import TaskRequest
from tasktree.settings import Settings
from tasktree.store import Gate, Store

log = logging.getLogger(__name__)

Complete = Callable[[Settings, str, list[dict[str, str]], bool], Reply]


@dataclass
class Outcome:
    """What the Celery glue does next."""

    kind: str  # "done" | "delegate" | "retry"
    status: str = ""
    error: str = ""
    children: list[TaskRequest] = field(default_factory=list)
    countdown: float = 0.0


class Stop(Exception):
    """The gate said no to an LLM call."""

    def __init__(self, gate: Gate, step: str) -> None:
        super().__init__(gate.verdict)
        self.gate = gate
        self.step = step


def backoff(settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a provider's Retry-After wins when longer."""
    delay = random.uniform(0, settings.llm_backoff * (2**attempt))
    return max(delay, retry_after or 0.0)


class NodeRun:
    """Everything one task run needs: the store, the settings, which node, which worker."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        tree_id: str,
        node_id: str,
        worker: str,
        attempt: int = 0,
        complete: Complete | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.tree_id = tree_id
        self.node_id = node_id
        self.worker = worker
        self.attempt = attempt
        self.token = uuid.uuid4().hex
        self.tree: dict[str, str] = {}
        self.node: dict[str, str] = {}
        if complete is None:
            from tasktree.llm import complete as llm_complete

            complete = llm_complete
        self._complete = complete

    # -- the LLM call, gated and recorded --------------------------------------------------

    def call(self, step: str, messages: list[dict[str, str]], json_mode: bool) -> Reply:
        running = {"decide": "deciding", "execute": "executing", "synthesize": "synthesizing"}[step]
        gate = self.store.gate(self.tree_id, self.node_id, step, self.token, running, self.worker)
        if gate.verdict != "OK":
            raise Stop(gate, step)
        model = self.settings.model_for(step, self.tree.get("model") or None)
        try:
            reply = self._complete(self.settings, model, messages, json_mode)
        except LLMError:
            self.store.release(self.tree_id, self.node_id, step, self.token)
            raise
        self.store.record_call(
            self.tree_id,
            self.node_id,
            step,
            reply.model,
            reply.prompt_tokens,
            reply.completion_tokens,
            reply.cost_usd,
            reply.cost_known,
            reply.latency,
        )
        return reply

    def finish(self, status: str, **kw: object) -> Outcome:
        self.store.finish(self.tree_id, self.node_id, status, worker=self.worker, **kw)  # type: ignore[arg-type]
        return Outcome("done", status=status, error=str(kw.get("error", "")))

    # -- entry points ---------------------------------------------------------------------

    def run_node(self, request: TaskRequest) -> Outcome:
        """The node task: decide (or reuse the stored decision), then execute or delegate."""
        return self._guarded(lambda: self._node(request), step="execute")

    def run_synthesis(self) -> Outcome:
        """The chord callback: once every child is closed, synthesize from what they stored."""
        return self._guarded(self._synthesis, step="synthesize")

    def _guarded(self, body: Callable[[], Outcome], step: str) -> Outcome:
        self.tree, self.node, open_runs = self.store.begin_run(self.tree_id, self.node_id)
        if not self.tree or not self.node.get("status"):
            log.error("tree %s node %s does not exist; dropping", self.tree_id, self.node_id)
            return Outcome("done", status="missing", error="no such node")
        try:
            if self.node["status"] in ("completed", "failed", "cancelled", "budget_exhausted"):
                return Outcome("done", status=self.node["status"])
            if open_runs > self.settings.max_deliveries:
                return self.finish(
                    "failed",
                    error=f"gave up: {open_runs - 1} earlier runs of this node ended in a crash",
                )
            try:
                return body()
            except Stop as s:
                return self._stopped(s)
            except NotFoundError as e:  # the tree was deleted under us
                log.error("%s; dropping", e)
                return Outcome("done", status="missing", error=str(e))
            except TransientLLMError as e:
                if self.attempt < self.settings.llm_max_retries:
                    return Outcome(
                        "retry", countdown=backoff(self.settings, self.attempt, e.retry_after)
                    )
                return self.finish(
                    "failed", error=f"{e} (after {self.attempt + 1} attempts)", step=step
                )
            except LLMError as e:
                return self.finish("failed", error=str(e), step=step)
            except StoreError:
                raise  # Redis is away: the task retries later
            except Exception as e:  # a bug: log it, fail this node, and let the tree go on
                log.exception("node %s of tree %s crashed", self.node_id, self.tree_id)
                return self.finish(
                    "failed", error=f"internal error: {type(e).__name__}: {e}", step=step
                )
        finally:
            self.store.end_run(self.tree_id, self.node_id)

    def _stopped(self, s: Stop) -> Outcome:
        verdict = s.gate.verdict
        if verdict == "BUSY":  # another run holds this step: look again when its lease may be up
            pttl = max(0, int(s.gate.detail or 0)) / 1000
            return Outcome("retry", countdown=min(max(pttl, 0.2), 2.0))
        if verdict == "DONE":
            node = self.store.node(self.tree_id, self.node_id)
            if node.terminal:
                return Outcome("done", status=node.status)
            return Outcome("retry", countdown=0.2)  # decided elsewhere: run again to follow it
        if verdict == "MISSING":
            return Outcome("done", status="missing", error="no such node")
        if s.step == "synthesize":
            return self._close_parent_without_model(verdict, s.gate.detail)
        if verdict == "CANCELLED":
            return self.finish(
                "cancelled", note="tree cancelled before this node's model call", step=s.step
            )
        return self.finish(
            "budget_exhausted",
            note=f"{s.gate.detail} budget spent before this node's model call",
            step=s.step,
        )

    # -- the node ---------------------------------------------------------------------------

    def _node(self, request: TaskRequest) -> Outcome:
        node = self.node
        persona, task = request.persona_prompt, request.task_instructions
        if "decision" not in node:
            self._decide(persona, task, int(node.get("depth", request.depth)))
            self.node = self.store.node_hash(self.tree_id, self.node_id)
        if self.node.get("status") in ("completed", "failed", "cancelled", "budget_exhausted"):
            return Outcome("done", status=self.node["status"])
        if self.node.get("decision") == "delegate":
            return self._delegate()
        context = dict(request.context_data)
        reply = agent.execute(self.call, persona, task, context or None)
        return self.finish("completed", result=reply.text, context_keys=list(context) or None)

    def _decide(self, persona: str, task: str, depth: int) -> None:
        tree = self.tree
        single = tree.get("single_call") == "1"
        if depth >= int(tree["max_depth"]):
            self.store.decide(
                self.tree_id,
                self.node_id,
                "execute",
                "depth limit reached",
                [],
                ["depth limit: decision call skipped"],
                self.worker,
            )
            return
        plan = agent.decide(
            self.call,
            persona,
            task,
            max_children=int(tree["max_children"]),
            persona_limit=self.settings.max_persona_chars,
            task_limit=self.settings.max_task_chars,
            single_call=single,
        )
        decision, _ = self.store.decide(
            self.tree_id,
            self.node_id,
            plan.decision,
            plan.reason,
            plan.sub_tasks,
            plan.notes,
            self.worker,
        )
        if decision == "execute" and plan.answer:  # single-call mode answered in the same call
            self.store.finish(
                self.tree_id,
                self.node_id,
                "completed",
                result=plan.answer,
                worker=self.worker,
                step="decide",
            )

    def _delegate(self) -> Outcome:
        ids = [c for c in self.node.get("children", "").split(",") if c]
        children = self.store.nodes(self.tree_id, ids)
        return Outcome("delegate", children=[c.request(self.tree_id) for c in children])

    # -- the synthesis ----------------------------------------------------------------------

    def _children(self) -> tuple[list[Node], dict[str, str], dict[str, str]]:
        ids = [c for c in self.node.get("children", "").split(",") if c]
        children = self.store.nodes(self.tree_id, ids)
        context = {f"{c.id} {c.persona}": c.result for c in children if c.status == "completed"}
        failed = {
            f"{c.id} {c.persona}": c.error or c.status for c in children if c.status != "completed"
        }
        return children, context, failed

    def _synthesis(self) -> Outcome:
        children, context, failed = self._children()
        if not children or any(not c.terminal for c in children):
            # The chord fired early (a duplicate delivery counted twice): wait for the rest.
            return Outcome("retry", countdown=0.5)
        task, persona = self.node["instructions"], self.node["persona"]
        failures = [c for c in children if c.status == "failed"]
        if failures and self.tree.get("on_child_failure") == "fail":
            first = failures[0]
            return self.finish(
                "failed", error=f"child {first.id} failed: {first.error}", step="synthesize"
            )
        if not context:
            statuses = {c.status for c in children}
            status = (
                "failed"
                if "failed" in statuses
                else ("budget_exhausted" if "budget_exhausted" in statuses else "cancelled")
            )
            why = {
                "failed": "every child failed",
                "budget_exhausted": "budget spent before any child produced a result",
                "cancelled": "tree cancelled before any child produced a result",
            }[status]
            return self.finish(
                status,
                error=why if status == "failed" else "",
                result=agent.assemble(task, context, failed, why),
                note=why,
                step="synthesize",
            )
        reply = agent.synthesize(self.call, persona, task, context, failed)
        return self.finish(
            "completed", result=reply.text, context_keys=list(context), step="synthesize"
        )

    def _close_parent_without_model(self, verdict: str, detail: str) -> Outcome:
        _, context, failed = self._children()
        status = "cancelled" if verdict == "CANCELLED" else "budget_exhausted"
        why = "tree cancelled" if status == "cancelled" else f"{detail} budget spent"
        return self.finish(
            status,
            result=agent.assemble(self.node["instructions"], context, failed, why),
            note=f"{why}: kept the children's results without a synthesis call",
            step="synthesize",
            context_keys=list(context),
        )
