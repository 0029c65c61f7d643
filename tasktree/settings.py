"""One settings object (TASKTREE_* environment variables), built once and passed down."""

import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasktree.errors import ConfigError
from tasktree.limits import Limit, limit_for, parse, rules_of

OFFLINE_MODEL = "tasktree-offline/placeholder"


class Settings(BaseSettings):
    """Everything tasktree reads from the environment. Every field is TASKTREE_<NAME>."""

    # TASKTREE_* from the environment, else from ./.env (where litellm finds provider keys too).
    model_config = SettingsConfigDict(
        env_prefix="TASKTREE_", env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True
    )

    # Where the tree lives. Unset: the CLI runs embedded (its own Redis and worker).
    redis_url: str | None = None
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("tasktree")))

    # Models: any litellm model string. Unset: the built-in offline model.
    model: str | None = None
    decide_model: str | None = None
    execute_model: str | None = None
    synthesize_model: str | None = None
    api_base: str | None = None
    api_key: SecretStr | None = None
    # A price for models litellm cannot price (USD per token), e.g. a local server.
    input_cost_per_token: float | None = Field(default=None, ge=0)
    output_cost_per_token: float | None = Field(default=None, ge=0)
    llm_timeout: float = Field(default=120.0, gt=0)
    # With a token or cost budget, each call reserves its prompt and a completion of at most
    # this many tokens (fewer when less is left) before it starts: budgets are never overshot.
    max_completion_tokens: int = Field(default=4096, ge=16, le=1_000_000)
    llm_max_retries: int = Field(default=4, ge=0, le=20)
    llm_backoff: float = Field(default=1.0, ge=0)
    # Shared by every worker (tasktree/limits.py): calls in flight and per minute, per model.
    llm_concurrency: int | None = Field(default=None, ge=1, le=1_000_000)
    llm_rpm: int | None = Field(default=None, ge=1, le=100_000_000)
    llm_limits: str = ""  # per model, e.g. "openai/gpt-4o-mini=60rpm,8; anthropic/*=20"
    # How long a 429's cut of a model's concurrency lasts unrenewed.
    llm_limit_hold: float = Field(default=300.0, gt=0, le=86_400)
    # How long a call waits in its thread for a slot of its model's shared limit, woken when
    # one is freed; then its node is sent again later and the thread does other work.
    llm_limit_wait: float = Field(default=30.0, ge=0, le=3600)

    # The offline model as a test and benchmark instrument.
    offline_latency: str = "0"  # seconds per call, or "LOW-HIGH" for a seeded random latency
    offline_fanout: int | None = Field(default=None, ge=1, le=100)
    offline_seed: int = 0
    # This share of calls fails permanently, chosen by a hash of the prompt and the seed (so
    # the same call fails again, and a retry with 0 succeeds).
    offline_fail: float = Field(default=0.0, ge=0, le=1)
    # A greedy branch: the first sub-task of every delegation fans out into this many parts
    # (0: off), until the depth limit; the root and the others follow `offline_fanout`.
    offline_greedy: int = Field(default=0, ge=0, le=100)

    # Default budgets, overridable per submit.
    max_depth: int = Field(default=3, ge=0, le=20)
    max_children: int = Field(default=6, ge=1, le=100)
    max_nodes: int = Field(default=60, ge=1, le=100_000)
    # Each delegation splits the node's remaining budgets among its children (`--envelopes`).
    envelopes: bool = False

    # The web view (`serve`, `submit --web`). Beyond the loopback interface its actions
    # (cancel, retry, raise a budget) need this token; without one the view is read-only.
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8700, ge=0, le=65535)  # 0: any free port
    web_token: SecretStr | None = None

    # Input limits (characters).
    max_task_chars: int = Field(default=20_000, ge=1)
    max_persona_chars: int = Field(default=4_000, ge=1)
    max_result_chars: int = Field(default=100_000, ge=1)

    # Workers and reliability.
    pool: Literal["threads", "prefork", "solo"] = "threads"
    # Nodes wait on HTTP: every ready node of a 156-node tree in flight on one process.
    concurrency: int = Field(default=256, ge=1, le=10_000)
    node_queue: str = "tasktree"
    synth_queue: str = "tasktree.synthesize"
    visibility_timeout: int = Field(default=300, ge=1, le=7 * 86_400)
    # kombu: how often unacknowledged messages return to their queue.
    restore_interval: int = Field(default=5, ge=1, le=3600)
    sweep_interval: float = Field(default=2.0, gt=0, le=3600)  # how often a queue's trees are swept
    redis_retry_seconds: float = Field(default=30.0, ge=0)  # ride out a Redis restart this long
    # A claim's lease, renewed while its run lives.
    step_lease: float = Field(default=15.0, gt=0, le=3600)
    max_deliveries: int = Field(default=5, ge=1)
    stall_seconds: float = Field(default=10.0, gt=0)  # a tree this quiet is checked for losses
    events_maxlen: int = Field(default=10_000, ge=100, le=10_000_000)
    # `watch` and a waiting `submit` say so when a tree makes no progress this long.
    quiet_seconds: float = Field(default=15.0, gt=0)
    # How long Celery keeps the join data of a chord that never completes (a cancelled tree's).
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60, le=365 * 86_400)
    # How long an ended tree's keys stay in Redis (0: forever); `tasktree prune` frees sooner.
    tree_ttl: int = Field(default=30 * 24 * 3600, ge=0, le=10 * 365 * 24 * 3600)
    # `submit` refuses while Redis uses more than this share of its maxmemory.
    memory_guard: float = Field(default=0.9, gt=0, le=1)
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        schemes = ("redis://", "rediss://", "unix://", "sentinel://", "sentinels://")
        if not v.startswith(schemes):
            raise ValueError(f"must start with one of {', '.join(schemes)}")
        return v

    @field_validator("pool", mode="before")
    @classmethod
    def _check_pool(cls, v: object) -> object:
        if v in ("gevent", "eventlet"):
            raise ValueError(
                f"{v} must patch the standard library before anything is imported, which a "
                f"setting cannot do: start the worker with `celery -A workers worker -P {v}`"
            )
        return v

    @field_validator("llm_limits")
    @classmethod
    def _check_limits(cls, v: str) -> str:
        parse(v)
        return v

    @field_validator("offline_latency")
    @classmethod
    def _check_latency(cls, v: str) -> str:
        parse_latency(v)
        return v

    @property
    def lease_seconds(self) -> float:
        """How long a claim on a node's step lasts unrenewed before another run may take it."""
        return self.step_lease

    @property
    def redis_connections(self) -> int:
        """The most connections one Redis client of a process opens (opened as they are
        needed): one per pool thread, and room for the process's own threads (heartbeat,
        sweeper, a CLI's waiting and web view). redis-py's default, 100, would fail a store
        call with "Too many connections" when more pool threads than that reach Redis at once."""
        return self.concurrency + 32

    def limit_for(self, model: str) -> Limit:
        """The limits on `model`'s calls shared by every worker."""
        default = Limit(self.llm_concurrency or 0, self.llm_rpm or 0)
        return limit_for(model, rules_of(self.llm_limits), default)

    def model_for(self, step: str, tree_model: str | None = None) -> str:
        """The litellm model string for a step: per-step, then per-tree, then global."""
        per_step = {
            "decide": self.decide_model,
            "execute": self.execute_model,
            "synthesize": self.synthesize_model,
        }.get(step)
        return per_step or tree_model or self.model or OFFLINE_MODEL


def parse_latency(v: str) -> tuple[float, float]:
    """'0.2' -> (0.2, 0.2); '0.05-0.5' -> (0.05, 0.5)."""
    try:
        lo, _, hi = v.partition("-")
        low, high = float(lo), float(hi or lo)
    except ValueError:
        raise ValueError(f"latency must be SECONDS or LOW-HIGH, got {v!r}") from None
    if low < 0 or high < low:
        raise ValueError(f"latency range must be 0 <= LOW <= HIGH, got {v!r}")
    return low, high


def load(**overrides: object) -> Settings:
    """Build the settings from the environment, turning validation errors into one line."""
    env_file = os.environ.get("TASKTREE_ENV_FILE", ".env")  # tests point it at an empty file
    try:
        return Settings(_env_file=env_file or None, **overrides)  # type: ignore[arg-type,call-arg]
    except ValidationError as e:
        err = e.errors()[0]
        field = "TASKTREE_" + "_".join(str(p) for p in err["loc"]).upper()
        raise ConfigError(f"{field}: {err['msg']}") from None
