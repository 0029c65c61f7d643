"""The data model: what a user submits, what a node and a tree are, what a decision is."""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tasktree.errors import InputError
from tasktree.proto import SubTaskRequest, TaskRequest
from tasktree.settings import Settings

DEFAULT_PERSONA = (
    "You are a capable generalist who plans carefully and delivers complete, "
    "well-structured answers."
)
NODE_TERMINAL = frozenset({"completed", "failed", "cancelled", "budget_exhausted"})
TREE_TERMINAL = frozenset(
    {"completed", "completed_with_errors", "failed", "cancelled", "budget_exhausted"}
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

    @classmethod
    def build(cls, settings: Settings, task: object, **kw: Any) -> TreeSpec:
        """Validate a submission, filling budgets from settings; errors raise InputError."""
        check_text("task", task, settings.max_task_chars)
        if kw.get("persona") is not None:
            check_text("persona", kw["persona"], settings.max_persona_chars)
        else:
            kw.pop("persona", None)
        for name in ("max_depth", "max_children", "max_nodes"):
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
    """A pydantic model with the string fields of a proto message: one schema, not two."""
    fields: dict[str, Any] = {
        f.name: (str, ...) for f in message_cls.DESCRIPTOR.fields if f.type == f.TYPE_STRING
    }
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
    status: str = "queued"
    decision: str = ""
    reason: str = ""
    result: str = ""
    error: str = ""
    children: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    context_keys: list[str] = Field(default_factory=list)
    worker: str = ""
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

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Node:
        """Build from a Redis hash (all values are strings)."""
        d: dict[str, Any] = dict(h)
        d["parent_id"] = d.pop("parent", "")
        d["children"] = [c for c in d.get("children", "").split(",") if c]
        for key in ("notes", "context_keys"):
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


class Tree(BaseModel):
    """A tree's summary as stored in Redis, with its nodes when read whole."""

    id: str
    task: str = ""
    persona: str = ""
    status: str = "running"
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
    reserved: int = 0
    done: int = 0
    failed: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_unknown: bool = False
    nodes: list[Node] = Field(default_factory=list)

    @classmethod
    def from_hash(cls, h: dict[str, str], nodes: list[Node] | None = None) -> Tree:
        d: dict[str, Any] = dict(h)
        d["single_call"] = d.get("single_call") == "1"
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
    def root(self) -> Node | None:
        return next((n for n in self.nodes if n.id == "0"), None)

    @property
    def result(self) -> str:
        root = self.root
        return root.result if root else ""

    @property
    def elapsed(self) -> float:
        import time

        end = self.finished_at or time.time()
        return max(0.0, end - self.created_at)
