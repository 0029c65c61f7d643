"""Model calls through litellm: timeouts, error classes, usage and cost. Imported lazily."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from tasktree.errors import LLMError, TransientLLMError
from tasktree.settings import OFFLINE_MODEL, Settings

# Never reach the network at import: use litellm's bundled price map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})

_lock = threading.Lock()
_configured: dict[str, Any] = {}


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


def _litellm(settings: Settings) -> Any:
    """Import and configure litellm once per process (the offline provider, prices)."""
    with _lock:
        if "litellm" in _configured:
            return _configured["litellm"]
        import litellm
        from litellm.utils import custom_llm_setup

        from tasktree.offline import PROVIDER, make_provider

        logging.getLogger("LiteLLM").setLevel(logging.ERROR)
        litellm.telemetry = False
        litellm.suppress_debug_info = True
        # No litellm.drop_params: with it, litellm answers a 422 with None instead of an error.
        litellm.custom_provider_map = [
            {"provider": PROVIDER, "custom_handler": make_provider(settings)}
        ]
        custom_llm_setup()
        if settings.input_cost_per_token is not None or settings.output_cost_per_token is not None:
            for name in {settings.model_for(s) for s in ("decide", "execute", "synthesize")}:
                provider = name.split("/", 1)[0] if "/" in name else "openai"
                litellm.register_model(
                    {
                        name: {
                            "input_cost_per_token": settings.input_cost_per_token or 0.0,
                            "output_cost_per_token": settings.output_cost_per_token or 0.0,
                            "litellm_provider": provider,
                            "mode": "chat",
                        }
                    }
                )
        _configured["litellm"] = litellm
        return litellm


def warm(settings: Settings) -> None:
    """Pay litellm's import cost now (at worker start) rather than on the first node."""
    _litellm(settings)


def _supports_json_mode(litellm: Any, model: str) -> bool:
    try:
        return "response_format" in (litellm.get_supported_openai_params(model=model) or [])
    except Exception:  # litellm raises for providers it does not know
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


def _translate(e: Exception, model: str) -> LLMError:
    status = getattr(e, "status_code", None)
    message = str(getattr(e, "message", "") or e).strip().splitlines()[0][:500]
    what = f"{model}: {type(e).__name__}" + (f" {status}" if status else "") + f": {message}"
    name = type(e).__name__
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


def complete(
    settings: Settings, model: str, messages: list[dict[str, str]], json_mode: bool = False
) -> Reply:
    """One chat completion. Raises TransientLLMError (retry later) or LLMError (final)."""
    litellm = _litellm(settings)
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "timeout": settings.llm_timeout,
        "num_retries": 0,
        "max_retries": 0,
    }
    if model != OFFLINE_MODEL:
        if settings.api_base:
            kwargs["api_base"] = settings.api_base
        if settings.api_key:
            kwargs["api_key"] = settings.api_key.get_secret_value()
        if json_mode and _supports_json_mode(litellm, model):
            kwargs["response_format"] = {"type": "json_object"}
    start = time.perf_counter()
    try:
        resp = litellm.completion(**kwargs)
    except Exception as e:  # litellm maps every provider error onto its own classes
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
