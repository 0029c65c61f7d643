"""One run of a node's task or synthesis: gate, call, record, transition. No Celery here."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from tasktree import agent, keys
from tasktree.errors import FencedError, LLMError, NotFoundError, StoreError, TransientLLMError
from tasktree.leases import Leases
from tasktree.limits import Limit
from tasktree.llm import Complete, estimate
from tasktree.models import Reply
from tasktree.proto import TaskRequest
from tasktree.settings import OFFLINE_MODEL, Settings
from tasktree.states import NODE_TERMINAL, NodeStatus, Step, TreeStatus, Verdict
from tasktree.store import CallRecord, Gate, Store
from tasktree.tracing import OFF, Tracing

log = logging.getLogger(__name__)

#: How often a node that starts after its siblings looks whether they are done (seconds).
AFTER_POLL = 1.0

#: The steps whose one call's reply is the node's result: the call is recorded by the finish
#: that stores it, in one round trip.
STORED_WITH_CALL = frozenset({Step.EXECUTE, Step.SYNTHESIZE})

#: Seconds a node waits when the budget's room is reserved by calls in flight.
RESERVED_WAIT = 0.5
#: The decision of a node at the depth limit (reason, note): no call decides it.
BY_DEPTH = ("depth limit reached", "depth limit: decision call skipped")


@dataclass(frozen=True)
class Done:
    """The run is over for this message: ack it, with the node's status."""

    status: str
    error: str = ""


@dataclass(frozen=True)
class Delegate:
    """Fan the node out: run these children on the tree's queue, then the node's synthesis."""

    children: list[TaskRequest]
    queue: str
    synth_queue: str


@dataclass(frozen=True)
class Retry:
    """Run this message again after `countdown` seconds, for `reason`."""

    countdown: float
    reason: str


Outcome = Done | Delegate | Retry


class RateLimited(Exception):
    """The model's shared limit is full: run this message again in `delay` seconds."""

    def __init__(self, why: str, delay: float) -> None:
        super().__init__(why)
        self.delay = delay


class GateRefused(Exception):
    """Raised when the gate refuses a model call (the verdict says why)."""

    def __init__(self, gate: Gate, step: Step) -> None:
        super().__init__(gate.verdict)
        self.gate = gate
        self.step = step


def backoff(settings: Settings, failures: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a provider's Retry-After wins when longer."""
    delay = random.uniform(0, settings.llm_backoff * (2**failures))
    return max(delay, retry_after or 0.0)


class NodeRun:
    """Everything one task run needs: the store, the settings, the model, which node, where."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        tree_id: str,
        node_id: str,
        worker: str,
        complete: Complete,
        leases: Leases | None = None,
        tracing: Tracing = OFF,
        live: tuple[str, str] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.tree_id = tree_id
        self.node_id = node_id
        self.worker = worker
        self.token = uuid.uuid4().hex
        self.calls = 0  # model calls this run made: with the token, each call's id
        self.step_calls: dict[str, int] = {}  # calls per step this run: which kept reply is next
        self.ended = False  # the run ended in the store (with the finish that closed its node)
        self.tree: dict[str, str] = {}
        self.node: dict[str, str] = {}
        self.children: list[TaskRequest] = []  # of the delegation this run stored
        self.unrecorded: CallRecord | None = None  # a call whose reply finish stores
        self._complete = complete
        self.leases = leases
        self.tracing = tracing
        self.live = live  # (queue, member) of this run's message in the live index

    # -- the model call, gated and recorded ------------------------------------------------

    def call(self, step: Step, messages: list[dict[str, str]], json_mode: bool) -> Reply:
        kept = self._kept(step)
        if kept is not None:
            return kept
        running = step.running
        model = self.settings.model_for(step, self.tree.get("model") or None)
        reserve = self._reservation(model, messages)
        # Undecided when it executes: a node at the depth limit, whose gate stores the decision.
        by_depth = BY_DEPTH if step == Step.EXECUTE and "decision" not in self.node else None
        self.calls += 1
        call_id = f"{self.token}:{self.calls}"
        # The slot first: a call that waited for one is gated after its wait, so a tree
        # cancelled or a budget spent meanwhile stops it, and the wait holds no claim.
        slot = self._slot(model, call_id)
        outcome = "0"  # for the model's shared limit: "200" answered, "429" rate limited
        try:
            gate = self.store.gate(
                *(self.tree_id, self.node_id, step, self.token),
                *(running, self.worker, reserve, by_depth),
            )
            if gate.verdict != Verdict.OK:
                raise GateRefused(gate, step)
            if self.leases is not None:
                self.leases.hold(self.tree_id, self.node_id, step, self.token)
            if by_depth:
                self.node.update(decision="execute", children="")
            cap = int(float(gate.detail or 0))  # the completion cap the budget left fits
            why = f": {BY_DEPTH[0]}, no decision call" if by_depth else ""  # one line, not two
            log.info("tree %s node %s %s (%s)%s", self.tree_id, self.node_id, running, model, why)
            with self.tracing.call(step, model) as span:
                reply = span["reply"] = self._ask(step, model, messages, json_mode, cap)
            outcome = "200"
        except TransientLLMError as e:
            outcome = "429" if e.rate_limited else "0"
            # Retries count failed model calls of this step, kept in the node: lease waits,
            # redeliveries and Redis outages never use them up.
            before = int(self.node.get(f"failed_{step}", 0) or 0)
            e.delay = backoff(self.settings, before, e.retry_after)
            e.failures = self.store.call_failed(
                self.tree_id,
                self.node_id,
                step,
                str(e),
                time.time() + e.delay,
                call_id=call_id,
            )
            self.store.release(self.tree_id, self.node_id, step, self.token)
            raise
        except LLMError:
            self.store.release(self.tree_id, self.node_id, step, self.token)
            raise
        finally:
            if self.leases is not None:  # a claim never held is not there to drop
                self.leases.drop(self.tree_id, self.node_id, step, self.token)
            if slot is not None:
                self._free(model, call_id, outcome, slot)
        rec = CallRecord(step, reply, self.token, call_id)
        if step in STORED_WITH_CALL:
            self.unrecorded = rec  # finish records it with the node's result, in one script
        else:
            self._record(rec)
        return reply

    def _record(self, rec: CallRecord) -> None:
        recorded = self.store.record(self.tree_id, self.node_id, rec)
        if recorded == -1:
            raise self._gone()
        if recorded == 2:
            self._fenced_call()

    def _gone(self) -> NotFoundError:
        return NotFoundError(f"tree {self.tree_id} no longer exists (the store was reset?)")

    def _fenced_call(self) -> NoReturn:
        log.warning(
            "tree %s node %s: this run lost its claim during the call; usage kept as waste",
            self.tree_id,
            self.node_id,
        )
        raise FencedError(f"node {self.node_id}: the step's claim passed to another run")

    def _ask(
        self, step: Step, model: str, messages: list[dict[str, str]], json_mode: bool, cap: int
    ) -> Reply:
        """The model call itself; with a reservation, its completion stops at `cap` tokens."""
        if cap:
            return self._complete(step, model, messages, json_mode, max_tokens=cap)
        return self._complete(step, model, messages, json_mode)

    def _reservation(
        self, model: str, messages: list[dict[str, str]]
    ) -> tuple[int, int, float, float]:
        """What the gate reserves of a token or cost budget before this call: the completion
        cap, the prompt's tokens counted here, the model's prices. Nothing without a budget."""
        if not (float(self.tree.get("max_cost") or 0) or int(self.tree.get("max_tokens") or 0)):
            return (0, 0, 0.0, 0.0)
        e = estimate(self.settings, model, messages)
        return (self.settings.max_completion_tokens, e.prompt_tokens, e.input_cost, e.output_cost)

    def _slot(self, model: str, call_id: str) -> Limit | None:
        """Take a slot under the model's limits shared by every worker (the offline model
        with no limit configured needs none). Full: wait in this thread, in the model's
        queue, until a call that ends hands this one its slot, for up to
        TASKTREE_LLM_LIMIT_WAIT; then run again later, so a long wait holds no thread."""
        limit = self.settings.limit_for(model)
        if not limit and model == OFFLINE_MODEL:
            return None
        try:
            self._wait_for_slot(model, call_id, limit)
        except BaseException:
            # Give up any place in the queue, and hand on a slot given meanwhile (else the
            # place lapses in 9 s, and the slot with its lease).
            with contextlib.suppress(StoreError):
                self.store.free_slot(model, call_id, "0", limit)
            raise
        if self.leases is not None:
            self.leases.hold_slot(model, call_id)
        return limit

    def _wait_for_slot(self, model: str, call_id: str, limit: Limit) -> None:
        deadline = time.monotonic() + self.settings.llm_limit_wait
        noted = False
        while (full := self.store.take_slot(model, call_id, limit)) is not None:
            what, seconds = full
            why = f"waiting for rate limit ({model}: {what}, {limit})"
            if not noted:
                self.store.note_waiting(self.tree_id, self.node_id, why)
                noted = True
            elif self.store.stopped(self.tree_id, self.node_id):  # the next run ends it
                raise RateLimited(f"{why}; stopped waiting: the node or its tree closed", 0.0)
            left = deadline - time.monotonic()
            if left <= 0 or (what == "rpm" and seconds > left):
                raise RateLimited(why, seconds * random.uniform(0.5, 1.5))
            if what == "concurrency":
                if self.store.await_slot(model, call_id, left):  # at most SLOT_POLL
                    return  # handed a slot by a call that ended
            else:  # the minute's oldest call leaves the window in `seconds`
                time.sleep(min(seconds, 1.0))

    def _free(self, model: str, call_id: str, outcome: str, limit: Limit) -> None:
        if self.leases is not None:
            self.leases.drop_slot(model, call_id)
        self.store.free_slot(model, call_id, outcome, limit)

    def _kept(self, step: Step) -> Reply | None:
        """The reply an earlier run of this step paid for and recorded but died before storing
        the step's outcome: replayed in call order at no cost, so no recorded call is paid twice."""
        n = self.step_calls.get(step, 0)
        self.step_calls[step] = n + 1
        kept = json.loads(self.node.get(f"kept_{step}") or "[]")
        if n >= len(kept):
            return None
        log.info("tree %s node %s %s: replaying a kept reply", self.tree_id, self.node_id, step)
        return Reply(kept[n], self.node.get("model", ""), 0, 0, 0.0, True, 0.0)

    def finish(self, status: NodeStatus, **kw: Any) -> Done:
        call = self.unrecorded
        if call is not None and call.step != kw.get("step", Step.EXECUTE):
            self.unrecorded = None
            self._record(call)  # not the step this closes: recorded on its own
            call = None
        closed = self.store.finish(
            self.tree_id,
            self.node_id,
            status,
            worker=self.worker,
            token=self.token,
            call=call,
            **kw,
        )
        self.unrecorded = None
        self.ended = closed == "OK"  # closing the node ended this run too
        if closed == "FENCED":
            if call is not None:
                self._fenced_call()
            raise FencedError(f"node {self.node_id}: the step's claim passed to another run")
        if closed == "MISSING":
            if call is not None:  # its call was paid for: say why it is dropped
                raise self._gone()
            return Done("missing", error="no such node")
        if self.ended and self.tracing is not OFF:
            self._trace_node()
        why = kw.get("error") or kw.get("note") or ""
        log.info("tree %s node %s %s%s", self.tree_id, self.node_id, status, f": {why}" * bool(why))
        return Done(status, error=self.store.scrub(str(kw.get("error", ""))))

    def _trace_node(self) -> None:
        """The closed node's span; a tracing failure never fails the node."""
        try:
            self.tracing.node(self.tree_id, self.store.node(self.tree_id, self.node_id))
        except Exception:
            log.exception("tree %s node %s: its span was not sent", self.tree_id, self.node_id)

    # -- entry points ---------------------------------------------------------------------

    def run_node(self, request: TaskRequest) -> Outcome:
        """The node task: decide (or reuse the stored decision), then execute or delegate."""
        return self._guarded(lambda: self._node(request), Step.EXECUTE)

    def run_synthesis(self) -> Outcome:
        """The chord callback: once every child is closed, synthesize from what they stored."""
        from tasktree.synthesis import synthesize

        return self._guarded(lambda: synthesize(self), Step.SYNTHESIZE)

    def _guarded(self, body: Callable[[], Outcome], step: Step) -> Outcome:
        self.tree, self.node, open_runs = self.store.begin_run(
            self.tree_id, self.node_id, self.token, self.live
        )
        if self.live is not None and self.leases is not None:
            self.leases.listed_by_run(*self.live)
        if not self.tree or not self.node.get("status"):
            log.error("tree %s node %s does not exist; dropping", self.tree_id, self.node_id)
            return Done("missing", error="no such node")
        kind = "synthesize" if step == Step.SYNTHESIZE else "node"
        try:
            with self.tracing.run(self.tree_id, self.node_id, kind):
                return self._checked(body, step, open_runs)
        except StoreError:
            self.unrecorded = None  # Redis is away: nothing can be recorded now
            raise
        finally:
            if self.unrecorded is not None:  # paid for, no outcome stored: kept for a replay
                call, self.unrecorded = self.unrecorded, None
                self.store.record(self.tree_id, self.node_id, call)
            if not self.ended:
                self._end_run()

    def _end_run(self) -> None:
        """This run is over. Redis away: the heartbeat ends it when Redis is back, so an
        outage is never counted as a crash of this node."""
        try:
            self.store.end_run(self.tree_id, self.node_id, self.token)
        except StoreError:
            if self.leases is None:
                raise
            self.leases.end_later(self.tree_id, self.node_id, self.token)

    def _needless(self, open_runs: int) -> Done | None:
        """This message need not run: the tree is interrupted, the node closed, or poisoned."""
        if self.tree.get("status") == TreeStatus.INTERRUPTED:  # `resume` re-sends it later
            log.info("tree %s is interrupted; dropping node %s", self.tree_id, self.node_id)
            return Done(TreeStatus.INTERRUPTED)
        if self.node["status"] in NODE_TERMINAL:
            return Done(self.node["status"])
        if open_runs > self.settings.max_deliveries:
            why = f"gave up: {open_runs - 1} earlier runs of this node ended in a crash"
            return self.finish(NodeStatus.FAILED, error=why)
        return None

    def _checked(self, body: Callable[[], Outcome], step: Step, open_runs: int) -> Outcome:
        try:
            return self._needless(open_runs) or body()
        except GateRefused as refused:
            return self._refused(refused)
        except RateLimited as e:
            return Retry(e.delay, reason=str(e))
        except FencedError as e:  # the run holding the claim writes the outcome
            log.warning("tree %s: %s", self.tree_id, e)
            return Retry(0.5, reason=str(e))
        except NotFoundError as e:  # the tree was deleted under us
            log.error("%s; dropping", e)
            return Done("missing", error=str(e))
        except TransientLLMError as e:
            if 0 <= e.failures <= self.settings.llm_max_retries:
                return Retry(e.delay, reason=f"model call failed: {e}")
            why = f"{e} (after {max(e.failures, 1)} failed calls)"
            return self.finish(NodeStatus.FAILED, error=why, step=step)
        except LLMError as e:
            return self.finish(NodeStatus.FAILED, error=str(e), step=step)
        except StoreError:
            raise  # Redis is away: the task retries later
        except Exception as e:  # a bug fails its node (logged) and the tree goes on
            log.exception("node %s of tree %s crashed", self.node_id, self.tree_id)
            why = f"internal error: {type(e).__name__}: {e}"
            return self.finish(NodeStatus.FAILED, error=why, step=step)

    def _refused(self, refused: GateRefused) -> Outcome:
        verdict, detail = refused.gate.verdict, refused.gate.detail
        if verdict == Verdict.BUSY:  # another run holds this step: look when its lease may be up
            pttl = max(0, int(detail or 0)) / 1000
            return Retry(min(max(pttl, 0.2), 2.0), reason="another run holds the step")
        if verdict == Verdict.RESERVED:  # their calls end soon, and give back what they held
            return Retry(RESERVED_WAIT, reason=f"the {detail} is reserved by calls in flight")
        if verdict == Verdict.DONE:
            node = self.store.node(self.tree_id, self.node_id)
            if node.terminal:
                return Done(node.status)
            return Retry(0.2, reason="decided by another run: follow its decision")
        if verdict == Verdict.MISSING:
            return Done("missing", error="no such node")
        if verdict == Verdict.UNDECIDED:  # the next run reads the raised limit and decides
            return Retry(0.0, reason="depth limit raised: decide first")
        if verdict == Verdict.INTERRUPTED:  # the node stays open; `resume` runs it again
            return Done(TreeStatus.INTERRUPTED)
        if refused.step == Step.SYNTHESIZE:
            from tasktree.synthesis import close_without_model

            return close_without_model(self, verdict, detail)
        if verdict == Verdict.CANCELLED:
            note = "tree cancelled before this node's model call"
            return self.finish(NodeStatus.CANCELLED, note=note, step=refused.step)
        note = f"{detail} spent before this node's model call"
        return self.finish(NodeStatus.BUDGET_EXHAUSTED, note=note, step=refused.step)

    # -- the node ---------------------------------------------------------------------------

    def _prerequisites(self) -> Retry | dict[str, str]:
        """The results of the siblings this node starts after, as its context; or a Retry
        (no thread held) while any of them is open."""
        after = [a for a in self.node.get("after", "").split(",") if a]
        if not after:
            return {}
        before = self.store.results(self.tree_id, after)
        waiting = [n.id for n in before if not n.terminal]
        if waiting:
            why = f"after {', '.join(waiting)}"
            if self.node.get("waiting") != why:
                self.store.note_waiting(self.tree_id, self.node_id, why)
            return Retry(AFTER_POLL, reason=why)
        return {n.label: n.result for n in before if n.status == NodeStatus.COMPLETED}

    def _node(self, request: TaskRequest) -> Outcome:
        ready = self._prerequisites()
        if isinstance(ready, Retry):
            return ready
        persona, task = request.persona_prompt, request.task_instructions
        depth = int(self.node.get("depth", request.depth))
        # At the depth limit no call decides: the execute gate stores the decision.
        if "decision" not in self.node and depth < int(self.tree["max_depth"]):
            answered = self._decide(persona, task, depth)
            if answered is not None:
                return answered
        if self.node.get("status") in NODE_TERMINAL:
            return Done(self.node["status"])
        if self.node.get("decision") == "delegate":
            if not self.children:  # decided by an earlier run: the children are in the store
                ids = [c for c in self.node.get("children", "").split(",") if c]
                nodes = self.store.nodes(self.tree_id, ids)
                self.children = [c.request(self.tree_id) for c in nodes]
            return Delegate(
                self.children,
                self.tree.get("queue") or self.settings.node_queue,
                self.tree.get("synth_queue") or self.settings.synth_queue,
            )
        context = {**ready, **request.context_data}
        reply = agent.execute(self.call, persona, task, context or None)
        return self.finish(
            NodeStatus.COMPLETED, result=reply.text, context_keys=list(context) or None
        )

    def _lineage(self, persona: str, task: str) -> set[tuple[str, str]]:
        """The loop guard's keys of this node's task and its ancestors' (one round trip)."""
        above = self.store.nodes(self.tree_id, keys.ancestors(self.node_id))
        pairs = [(persona, task), *((n.persona, n.instructions) for n in above)]
        return {agent.same_task_key(p, t) for p, t in pairs}

    def _decide(self, persona: str, task: str, depth: int) -> Done | None:
        """Decide and store the decision (or take the one stored first) into `self.node`;
        Done when single-call mode answered in the same call."""
        tree = self.tree
        plan = agent.decide(
            self.call,
            persona,
            task,
            max_children=int(tree["max_children"]),
            persona_limit=self.settings.max_persona_chars,
            task_limit=self.settings.max_task_chars,
            single_call=tree.get("single_call") == "1",
            lineage=lambda: self._lineage(persona, task),
        )
        decision, children, fresh = self.store.decide(
            self.tree_id,
            self.node_id,
            plan.decision,
            plan.reason,
            plan.sub_tasks,
            plan.notes,
            self.worker,
            token=self.token,
        )
        self.node.update(decision=decision, children=",".join(children))
        if fresh and decision == "delegate":  # its children are the plan's first sub-tasks
            self.children = [
                TaskRequest(
                    task_id=f"{self.tree_id}/{cid}",
                    persona_prompt=sub["requested_persona"],
                    task_instructions=sub["task_details"],
                    tree_id=self.tree_id,
                    node_id=cid,
                    depth=depth + 1,
                )
                for cid, sub in zip(children, plan.sub_tasks, strict=False)
            ]
        into = f" into {len(children)} sub-tasks" if children else ""
        log.info("tree %s node %s decided %s%s", self.tree_id, self.node_id, decision, into)
        if decision == "execute" and plan.answer:  # single-call mode answered in the same call
            return self.finish(NodeStatus.COMPLETED, result=plan.answer, step=Step.DECIDE)
        return None
