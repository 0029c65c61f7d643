"""One settings object (TASKTREE_* environment variables), built once and passed down."""

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasktree.errors import ConfigError

OFFLINE_MODEL = "tasktree-offline/placeholder"


class Settings(BaseSettings):
    """Everything tasktree reads from the environment. Every field is TASKTREE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="TASKTREE_", extra="ignore", frozen=True)

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
    llm_max_retries: int = Field(default=4, ge=0, le=20)
    llm_backoff: float = Field(default=1.0, ge=0)

    # The offline model as a test and benchmark instrument.
    offline_latency: str = "0"  # seconds per call, or "LOW-HIGH" for a seeded random latency
    offline_fanout: int | None = Field(default=None, ge=1, le=100)
    offline_seed: int = 0

    # Default budgets, overridable per submit.
    max_depth: int = Field(default=3, ge=0, le=20)
    max_children: int = Field(default=6, ge=1, le=100)
    max_nodes: int = Field(default=60, ge=1, le=100_000)

    # Input limits (characters).
    max_task_chars: int = Field(default=20_000, ge=1)
    max_persona_chars: int = Field(default=4_000, ge=1)
    max_result_chars: int = Field(default=100_000, ge=1)

    # Workers and reliability.
    pool: Literal["threads", "prefork", "solo", "gevent", "eventlet"] = "threads"
    concurrency: int = Field(default=32, ge=1, le=10_000)
    node_queue: str = "tasktree"
    synth_queue: str = "tasktree.synthesize"
    visibility_timeout: int = Field(default=300, ge=1)
    restore_interval: int = Field(default=5, ge=1)  # how often workers look for lost messages
    redis_retry_seconds: float = Field(default=30.0, ge=0)  # ride out a Redis restart this long
    step_lease: float | None = Field(default=None, gt=0)  # default: llm_timeout + 30 s
    max_deliveries: int = Field(default=5, ge=1)
    stall_seconds: float = Field(
        default=20.0, gt=0
    )  # a tree this quiet is checked for lost callbacks
    events_maxlen: int = Field(default=10_000, ge=100)
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60)
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

    @field_validator("offline_latency")
    @classmethod
    def _check_latency(cls, v: str) -> str:
        parse_latency(v)
        return v

    @property
    def lease_seconds(self) -> float:
        """How long a claim on a node's LLM step lasts before another attempt may take it."""
        return self.step_lease or self.llm_timeout + 30.0

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
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        field = "TASKTREE_" + "_".join(str(p) for p in err["loc"]).upper()
        raise ConfigError(f"{field}: {err['msg']}") from None
