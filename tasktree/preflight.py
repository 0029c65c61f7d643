"""What `submit` checks before it writes anything: each model's credentials, its server, and
whether a cost budget can be enforced. Imports litellm only when a real model is configured."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from tasktree.errors import ConfigError
from tasktree.llm import keyless_server
from tasktree.settings import OFFLINE_MODEL, Settings

STEPS = ("decide", "execute", "synthesize")


def models_of(settings: Settings, tree_model: str | None) -> list[str]:
    """The distinct litellm model strings a tree will call."""
    return sorted({settings.model_for(step, tree_model) for step in STEPS})


def check(settings: Settings, tree_model: str | None = None, max_cost: float = 0.0) -> None:
    """Raise ConfigError, one line naming what to fix, when a tree could not run as asked."""
    models = models_of(settings, tree_model)
    priced_locally = (
        settings.input_cost_per_token is not None or settings.output_cost_per_token is not None
    )
    if max_cost and OFFLINE_MODEL in models and not priced_locally:
        raise ConfigError(
            "--max-cost cannot be enforced: the offline model has no price; set "
            "TASKTREE_INPUT_COST_PER_TOKEN and TASKTREE_OUTPUT_COST_PER_TOKEN"
        )
    real = [m for m in models if m != OFFLINE_MODEL]
    if not real:
        return
    if settings.api_base:
        _probe(settings.api_base)
    from tasktree.llm import Models

    litellm = Models(settings).litellm()
    for model in real:
        try:
            litellm.get_llm_provider(model)
        except Exception:  # noqa: BLE001 - litellm raises its own classes for an unroutable model
            raise ConfigError(
                f"unknown model {model!r}: litellm knows no provider for it "
                "(write it as provider/model, e.g. openai/gpt-4o-mini)"
            ) from None
        env = litellm.validate_environment(model, api_base=settings.api_base)
        missing = [] if settings.api_key else list(env.get("missing_keys") or [])
        if keyless_server(settings, model):
            missing = [k for k in missing if not k.endswith("_API_KEY")]
        if missing:
            raise ConfigError(
                f"model {model} needs {' and '.join(missing)} in the environment "
                "(or TASKTREE_API_KEY); nothing was submitted"
            )
        if max_cost and not priced_locally and not _priced(litellm, model):
            raise ConfigError(
                f"--max-cost cannot be enforced: litellm has no price for {model}; set "
                "TASKTREE_INPUT_COST_PER_TOKEN and TASKTREE_OUTPUT_COST_PER_TOKEN"
            )


def _priced(litellm: object, model: str) -> bool:
    try:
        info = litellm.get_model_info(model)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - litellm raises for a model missing from its prices
        return False
    return info.get("input_cost_per_token") is not None


def _probe(url: str, timeout: float = 3.0) -> None:
    """A TCP connection to the API server, so a wrong URL fails now and not in every node."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"TASKTREE_API_BASE={url} is not an http(s) URL")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"cannot reach TASKTREE_API_BASE={url}: {why}") from None
