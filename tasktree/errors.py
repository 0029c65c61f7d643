"""One root error for tasktree; everything the user can cause is a TaskTreeError."""

import logging


class TaskTreeError(Exception):
    """Raised for any failure tasktree reports to its user as one line (exit status 2)."""

    exit_status = 2


class ConfigError(TaskTreeError):
    """Raised when settings or the environment are invalid."""


class InputError(TaskTreeError):
    """Raised when a task, persona, budget or identifier given by the user is invalid."""


class NotFoundError(TaskTreeError):
    """Raised when a tree or node id does not exist in the store."""


class StoreError(TaskTreeError):
    """Raised when Redis cannot be reached or answers with an error."""


class PayloadError(TaskTreeError):
    """Raised when a task message does not decode or validate against agent.proto."""


class FencedError(TaskTreeError):
    """Raised when a write comes from a run whose claim on the step passed to another run."""


class EmbeddedError(TaskTreeError):
    """Raised when the embedded Redis cannot be started."""


class LLMError(TaskTreeError):
    """Raised when a model call fails for good (a client error, or retries spent)."""


class TransientLLMError(LLMError):
    """Raised when a model call failed in a way worth retrying later (429, 5xx, timeout)."""

    def __init__(
        self, message: str, retry_after: float | None = None, rate_limited: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.rate_limited = rate_limited  # the provider said 429: the model's limit adapts down
        self.failures = 0  # failed calls of the step so far, once counted in the store
        self.delay = 0.0  # seconds until the next try


class WaitTimeout(TaskTreeError):
    """Raised when a tree is still running after the time a caller would wait for it."""

    exit_status = 1


def log_loop_failure(log: logging.Logger, message: str, e: Exception, *args: object) -> None:
    """A background loop's failed turn: one line while Redis is away (the next turn tries
    again), with the traceback for anything else (a bug). `message` formats `e`, then args."""
    log.warning(message, e, *args, exc_info=not isinstance(e, StoreError))
