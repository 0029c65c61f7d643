"""Model calls: the offline model, or litellm (imported on first use) with timeouts, error
classes, usage and cost."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from tasktree.errors import LLMError, TransientLLMError
from tasktree.models import Reply
from tasktree.settings import OFFLINE_MODEL, Settings
from tasktree.states import Step

TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})

_import_lock = threading.Lock()


class Complete(Protocol):
    """The model callable: one call of a step; raises TransientLLMError or LLMError."""

    def __call__(
        self,
        step: Step,
        model: str,
        messages: list[dict[str, str]],
        json_mode: bool,
        max_tokens: int | None = None,
    ) -> Reply: ...


def _import_litellm() -> Any:
    with _import_lock:
        # Never reach the network at import: use litellm's bundled price map.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        logging.getLogger("LiteLLM").setLevel(logging.ERROR)
        litellm.telemetry = False
        litellm.suppress_debug_info = True
        # No litellm.drop_params: with it, litellm answers a 422 with None instead of an error.
        return litellm


class Models:
    """The models of one settings object: the offline model, or any model through litellm."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._litellm: Any = None

    def litellm(self) -> Any:
        """litellm, imported on first use and given these settings' prices."""
        if self._litellm is None:
            litellm = _import_litellm()
            s = self.settings
            if s.input_cost_per_token is not None or s.output_cost_per_token is not None:
                for name in {s.model_for(step) for step in Step} - {OFFLINE_MODEL}:
                    provider = name.split("/", 1)[0] if "/" in name else "openai"
                    price = {
                        "input_cost_per_token": s.input_cost_per_token or 0.0,
                        "output_cost_per_token": s.output_cost_per_token or 0.0,
                        "litellm_provider": provider,
                        "mode": "chat",
                    }
                    litellm.register_model({name: price})
            self._litellm = litellm
        return self._litellm

    def warm(self) -> None:
        """Pay litellm's import now (at worker start), not on the first node; the offline
        model does not need it."""
        if any(self.settings.model_for(step) != OFFLINE_MODEL for step in Step):
            self.litellm()

    def __call__(
        self,
        step: Step,
        model: str,
        messages: list[dict[str, str]],
        json_mode: bool = False,
        max_tokens: int | None = None,
    ) -> Reply:
        if model == OFFLINE_MODEL:
            return offline_reply(self.settings, step, messages, max_tokens)
        return complete_with(self.litellm(), self.settings, model, messages, json_mode, max_tokens)


@dataclass(frozen=True)
class Estimate:
    """A call's worst case before it is made: its prompt's tokens and the model's prices."""

    prompt_tokens: int
    input_cost: float  # USD per token; 0 when unknown
    output_cost: float


def estimate(settings: Settings, model: str, messages: list[dict[str, str]]) -> Estimate:
    """Count a prompt's tokens locally and price the model, for a budget reservation."""
    local = (settings.input_cost_per_token or 0.0, settings.output_cost_per_token or 0.0)
    if model == OFFLINE_MODEL:
        from tasktree.offline import count_tokens

        tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
        return Estimate(tokens, *local)
    litellm = _import_litellm()
    try:
        tokens = int(litellm.token_counter(model=model, messages=messages))
    except Exception:  # noqa: BLE001 - no tokenizer for this model: about four characters a token
        tokens = sum(len(str(m.get("content", ""))) for m in messages) // 3 + 8
    if settings.input_cost_per_token is not None or settings.output_cost_per_token is not None:
        return Estimate(tokens, *local)
    info = litellm.model_cost.get(model) or litellm.model_cost.get(model.split("/", 1)[-1]) or {}
    return Estimate(
        tokens,
        float(info.get("input_cost_per_token") or 0.0),
        float(info.get("output_cost_per_token") or 0.0),
    )


def keyless_server(settings: Settings, model: str) -> bool:
    """An OpenAI-compatible server at TASKTREE_API_BASE with no key configured: tasktree sends
    a placeholder key, which such a server ignores."""
    return bool(settings.api_base) and not settings.api_key and model.startswith("openai/")


def _supports_json_mode(litellm: Any, model: str) -> bool:
    try:
        return "response_format" in (litellm.get_supported_openai_params(model=model) or [])
    except Exception:  # noqa: BLE001 - litellm raises for providers it does not know
        return False


def _retry_after(e: Exception) -> float | None:
    headers = getattr(e, "litellm_response_headers", None)
    if headers is None:
        response = getattr(e, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        return float(headers.get("retry-after") or headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


# litellm's own prefixes before the provider's reason:
# "litellm.AuthenticationError: AuthenticationError: OpenAIException - Incorrect API key ..."
_PREFIX_RE = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+Error:\s*)?(?:\w+Exception\s*-\s*)?")
# Reasons that no retry heals, whatever status code the provider or litellm put on them.
_PERMANENT_RE = re.compile(
    r"missing credentials|api[_ ]key|unauthori[sz]ed|authentication|permission|"
    r"invalid model|model[_ ]not[_ ]found|does not exist|not supported|LLM Provider NOT provided",
    re.IGNORECASE,
)


def reason(e: Exception) -> str:
    """The useful part of a litellm error: the provider's reason, without litellm's prefixes."""
    text = str(getattr(e, "message", "") or e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return _PREFIX_RE.sub("", line).strip()[:500] or line[:500]


def _translate(e: Exception, model: str) -> LLMError:
    status = getattr(e, "status_code", None)
    why = reason(e)
    what = f"{model}: " + (f"{status} " if status else "") + why
    name = type(e).__name__
    if status in (408, 425, 429):  # a timeout or a rate limit always heals with time
        return TransientLLMError(what, retry_after=_retry_after(e), rate_limited=status == 429)
    if name in {"AuthenticationError", "PermissionDeniedError", "NotFoundError", "BadRequestError"}:
        return LLMError(what)
    if _PERMANENT_RE.search(why):
        return LLMError(what)
    if status in TRANSIENT_STATUS or (
        status is None
        and name
        in {
            "APIConnectionError",
            "Timeout",
            "APITimeoutError",
            "ServiceUnavailableError",
            "InternalServerError",
        }
    ):
        return TransientLLMError(what, retry_after=_retry_after(e))
    return LLMError(what)


def complete_with(
    litellm: Any,
    settings: Settings,
    model: str,
    messages: list[dict[str, str]],
    json_mode: bool,
    max_tokens: int | None = None,
) -> Reply:
    """One chat completion. Raises TransientLLMError (retry later) or LLMError (final)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "timeout": settings.llm_timeout,
        "num_retries": 0,
        "max_retries": 0,
    }
    if max_tokens:  # a budget reservation's completion cap
        kwargs["max_tokens"] = max_tokens
    if model != OFFLINE_MODEL:
        if settings.api_base:
            kwargs["api_base"] = settings.api_base
        if settings.api_key:
            kwargs["api_key"] = settings.api_key.get_secret_value()
        elif keyless_server(settings, model) and not os.environ.get("OPENAI_API_KEY"):
            kwargs["api_key"] = "none"  # a local server without keys; the client wants one
        if json_mode and _supports_json_mode(litellm, model):
            kwargs["response_format"] = {"type": "json_object"}
    start = time.perf_counter()
    try:
        resp = litellm.completion(**kwargs)
    except Exception as e:  # noqa: BLE001 - litellm maps provider errors onto many classes
        raise _translate(e, model) from None
    latency = time.perf_counter() - start
    choices = getattr(resp, "choices", None)
    if not choices:  # seen when the connection drops mid-response
        raise TransientLLMError(f"{model}: empty response (no choices)")
    text = choices[0].message.content or ""
    usage = getattr(resp, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    # litellm prices every response it returns; None means it has no price for the model.
    priced = (getattr(resp, "_hidden_params", None) or {}).get("response_cost")
    cost, known = (float(priced), True) if priced is not None else (0.0, False)
    return Reply(text, model, prompt_tokens, completion_tokens, cost, known, latency)


def offline_reply(
    settings: Settings, step: Step, messages: list[dict[str, str]], max_tokens: int | None = None
) -> Reply:
    """The built-in offline model, called directly: no network, no litellm import. Priced only
    when TASKTREE_INPUT_COST_PER_TOKEN / TASKTREE_OUTPUT_COST_PER_TOKEN are set."""
    from tasktree.offline import OfflineModel, count_tokens

    model = OfflineModel(settings)
    start = time.perf_counter()
    pause = model.delay(messages)
    if pause:
        time.sleep(pause)
    if model.fails(messages):
        raise LLMError(
            f"{OFFLINE_MODEL}: a planned failure (TASKTREE_OFFLINE_FAIL={settings.offline_fail:g})"
        )
    text = model.reply(step, messages)
    if max_tokens:  # as a provider does: the completion stops at the cap
        text = text[: max_tokens * 4]
    prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
    completion_tokens = count_tokens(text)
    priced = settings.input_cost_per_token is not None or settings.output_cost_per_token is not None
    cost = prompt_tokens * (settings.input_cost_per_token or 0.0) + completion_tokens * (
        settings.output_cost_per_token or 0.0
    )
    latency = time.perf_counter() - start
    return Reply(text, OFFLINE_MODEL, prompt_tokens, completion_tokens, cost, priced, latency)
