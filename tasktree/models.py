"""The data model: what a user submits, what a node and a tree are, what a decision is."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tasktree.errors import InputError
from tasktree.keys import ROOT
from tasktree.proto import SubTaskRequest, TaskRequest
from tasktree.settings import Settings
from tasktree.states import NODE_TERMINAL, TREE_IDLE, TREE_TERMINAL, NodeStatus, TreeStatus

DEFAULT_PERSONA = (
    "You are a capable generalist who plans carefully and delivers complete, "
    "well-structured answers."
)

ChildFailure = Literal["continue", "fail"]


def check_text(name: str, value: object, limit: int) -> str:
    """Validate user or model text: a non-blank str within `limit`, no control characters."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{name} is empty")
    if len(value) > limit:
        raise InputError(f"{name} is {len(value)} characters; the limit is {limit}")
    for ch in value:
        if ch in "\n\r\t":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise InputError(f"{name} is not valid UTF-8 text")
        if cat == "Cc":
            raise InputError(f"{name} contains a control character (U+{ord(ch):04X})")
    return value


@dataclass(frozen=True)
class Reply:
    """One model call's answer and what it cost."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_known: bool
    latency: float


class TreeSpec(BaseModel):
    """One submission: the task, its persona, the model and the budgets."""

    model_config = ConfigDict(frozen=True)

    task: str
    persona: str = DEFAULT_PERSONA
    model: str | None = None
    max_depth: int = Field(ge=0, le=20)
    max_children: int = Field(ge=1, le=100)
    max_nodes: int = Field(ge=1, le=100_000)
    max_cost: float = Field(default=0.0, ge=0)  # 0: no cost budget
    max_tokens: int = Field(default=0, ge=0)  # 0: no token budget
    on_child_failure: ChildFailure = "continue"
    single_call: bool = False
    envelopes: bool = False  # each delegation splits the node's budgets among its children

    @classmethod
    def build(cls, settings: Settings, task: object, **kw: Any) -> TreeSpec:
        """Validate a submission, filling budgets from settings; errors raise InputError."""
        check_text("task", task, settings.max_task_chars)
        if kw.get("persona") is not None:
            check_text("persona", kw["persona"], settings.max_persona_chars)
        else:
            kw.pop("persona", None)
        for name in ("max_depth", "max_children", "max_nodes", "envelopes"):
            if kw.get(name) is None:
                kw[name] = getattr(settings, name)
        kw = {k: v for k, v in kw.items() if v is not None}
        try:
            return cls(task=str(task), **kw)
        except ValidationError as e:
            err = e.errors()[0]
            field = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "input"
            raise InputError(f"{field}: {err['msg']}") from None


def _pydantic_from_proto(message_cls: Any) -> Any:
    """A pydantic model of a proto message's string fields (required), repeated integer
    fields (optional lists) and float fields (optional, finite, not negative): one schema,
    not two."""
    fields: dict[str, Any] = {}
    for f in message_cls.DESCRIPTOR.fields:
        if f.type == f.TYPE_STRING and not f.is_repeated:
            fields[f.name] = (str, ...)
        elif f.type == f.TYPE_UINT32 and f.is_repeated:
            fields[f.name] = (list[int], Field(default_factory=list))
        elif f.type == f.TYPE_FLOAT and not f.is_repeated:
            fields[f.name] = (float, Field(default=0.0, ge=0, allow_inf_nan=False))
    return create_model(message_cls.__name__, **fields)


SubTask = _pydantic_from_proto(SubTaskRequest)


class Decision(BaseModel):
    """What the decide step returns: execute alone, or delegate to sub-tasks."""

    decision: Literal["execute", "delegate"]
    reason: str = ""
    sub_tasks: list[SubTask] = Field(default_factory=list)  # type: ignore[valid-type]
    answer: str | None = None  # single-call mode: the answer when executing


class Node(BaseModel):
    """One node of a tree as stored in Redis."""

    id: str
    parent_id: str = ""
    depth: int = 0
    persona: str = ""
    instructions: str = ""
    status: NodeStatus = NodeStatus.QUEUED
    decision: str = ""
    reason: str = ""
    result: str = ""
    error: str = ""
    children: list[str] = Field(default_factory=list)
    after: list[str] = Field(default_factory=list)  # the siblings it starts after
    notes: list[str] = Field(default_factory=list)
    context_keys: list[str] = Field(default_factory=list)
    worker: str = ""
    waiting: str = ""  # why its call waits (a shared model limit), until the call is made
    model: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    deliveries: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_unknown: bool = False
    lat_decide: float = 0.0
    lat_execute: float = 0.0
    lat_synthesize: float = 0.0
    call_at: float | None = None  # when the current model call started
    retry_at: float | None = None  # when the next try of a failed call is due
    last_error: str = ""  # the last failed call's reason
    failed_decide: int = 0
    failed_execute: int = 0
    failed_synthesize: int = 0
    waste_calls: int = 0  # calls paid by a run that had lost its claim: not in the usage
    waste_tokens: int = 0
    waste_cost_usd: float = 0.0
    # What `retry` replaced: each attempt's status, result, error, calls, when and why.
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    # Its budget envelope (a tree with envelopes): the most its subtree may create (nodes
    # below it) and spend (tokens, USD; 0: no such budget), and what it has so far.
    env_nodes: int = 0
    env_tokens: int = 0
    env_cost: float = 0.0
    sub_nodes: int = 0
    sub_tokens: int = 0
    sub_cost: float = 0.0

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Node:
        """Build from a Redis hash (all values are strings)."""
        d: dict[str, Any] = dict(h)
        d["parent_id"] = d.pop("parent", "")
        d["children"] = [c for c in d.get("children", "").split(",") if c]
        d["after"] = [c for c in d.get("after", "").split(",") if c]
        for key in ("notes", "context_keys", "attempts"):
            value = json.loads(d[key]) if d.get(key) else []
            d[key] = value if isinstance(value, list) else []  # Lua's cjson writes [] as {}
        d["cost_unknown"] = d.get("cost_unknown") == "1"
        return cls.model_validate({k: v for k, v in d.items() if k in cls.model_fields})

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def terminal(self) -> bool:
        return self.status in NODE_TERMINAL

    @property
    def failed_calls(self) -> int:
        return self.failed_decide + self.failed_execute + self.failed_synthesize

    @property
    def clamped(self) -> bool:
        """The budgets cut this node's decomposition (see its notes)."""
        return any(n.startswith("clamped") for n in self.notes)

    def request(self, tree_id: str) -> TaskRequest:
        """The task message that runs this node."""
        return TaskRequest(
            task_id=f"{tree_id}/{self.id}",
            persona_prompt=self.persona,
            task_instructions=self.instructions,
            tree_id=tree_id,
            node_id=self.id,
            depth=self.depth,
        )


class NodeResult(NamedTuple):
    """What a parent reads of a child it synthesizes from, or a node of a sibling it starts
    after: the few fields it uses, read without building the whole Node."""

    id: str
    persona: str
    status: str
    result: str
    error: str

    @property
    def terminal(self) -> bool:
        return self.status in NODE_TERMINAL

    @property
    def label(self) -> str:
        """The child's key in its parent's context: its id and persona."""
        return f"{self.id} {self.persona}"


class Tree(BaseModel):
    """A tree's summary as stored in Redis, with its nodes when read whole."""

    id: str
    task: str = ""
    persona: str = ""
    status: TreeStatus = TreeStatus.RUNNING
    model: str = ""
    created_at: float = 0.0
    finished_at: float | None = None
    max_depth: int = 0
    max_children: int = 0
    max_nodes: int = 0
    max_cost: float = 0.0
    max_tokens: int = 0
    on_child_failure: str = "continue"
    single_call: bool = False
    envelopes: bool = False
    queue: str = ""
    synth_queue: str = ""
    reserved: int = 0
    done: int = 0
    failed: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_unknown: bool = False
    waste_calls: int = 0
    waste_tokens: int = 0
    waste_cost_usd: float = 0.0
    nodes: list[Node] = Field(default_factory=list)

    @classmethod
    def from_hash(cls, h: dict[str, str], nodes: list[Node] | None = None) -> Tree:
        d: dict[str, Any] = dict(h)
        d["single_call"] = d.get("single_call") == "1"
        d["envelopes"] = d.get("envelopes") == "1"
        d["cost_unknown"] = d.get("cost_unknown") == "1"
        d["nodes"] = nodes or []
        return cls.model_validate({k: v for k, v in d.items() if k in cls.model_fields})

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def terminal(self) -> bool:
        return self.status in TREE_TERMINAL

    @property
    def idle(self) -> bool:
        """No worker works on it: it ended, or it is interrupted until resumed."""
        return self.status in TREE_IDLE

    @property
    def root(self) -> Node | None:
        return next((n for n in self.nodes if n.id == ROOT), None)

    @property
    def result(self) -> str:
        root = self.root
        return root.result if root else ""

    @property
    def elapsed(self) -> float:
        import time

        end = self.finished_at or time.time()
        return max(0.0, end - self.created_at)
