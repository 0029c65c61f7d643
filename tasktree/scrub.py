"""The one scrubber every error message, event and log line passes through before it is
stored, logged or returned: the configured secrets go, and so do key-shaped strings."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from tasktree.settings import Settings

MASK = "[redacted]"
#: Environment variables whose values are secrets (provider keys that litellm reads).
SECRET_ENV_RE = re.compile(r".*(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)", re.IGNORECASE)
#: A secret shorter than this is not scrubbed by value (it would mask ordinary words).
MIN_SECRET = 6

# Key-shaped strings, whatever their value: provider keys (also masked ones, "sk-...abcd"),
# bearer tokens, key=value credentials, and the password of a URL.
_SHAPES = [
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*.]{6,}"), MASK),
    (re.compile(r"\b(Bearer|Basic)\s+[^\s'\",;]+", re.IGNORECASE), rf"\1 {MASK}"),
    (
        re.compile(
            r"\b(api[_-]?key|access[_-]?token|auth[_-]?token|token|secret|password|passwd)"
            r"(['\"]?\s*[:=]\s*['\"]?)[^\s'\",;&}]+",
            re.IGNORECASE,
        ),
        rf"\1\2{MASK}",
    ),
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@/\s]+@", re.IGNORECASE), rf"\1{MASK}@"),
]
#: Every key-shaped string holds one of these, in some case: an ASCII text with none skips
#: the patterns, a tenth of their time on an ordinary log line. (Non-ASCII text always runs
#: them: the patterns' case-blind match takes a dotless i for an i, a long s for an s.)
_CUES = ("sk-", "pk-", "rk-", "bearer", "basic", "key", "token", "secret", "passw", "://")


def secrets_of(settings: Settings, environ: dict[str, str] | None = None) -> list[str]:
    """The configured secrets: the API key, the Redis password, provider keys in the
    environment."""
    env = os.environ if environ is None else environ
    found = [v for k, v in env.items() if SECRET_ENV_RE.fullmatch(k)]
    for secret in (settings.api_key, settings.web_token):
        if secret:
            found.append(secret.get_secret_value())
    if settings.redis_url:
        password = urlsplit(settings.redis_url).password
        if password:
            found.append(password)
    return found


class Scrubber:
    """scrub(text): the text without the given secrets and without key-shaped strings."""

    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, values))) if values else None

    @classmethod
    def of(cls, settings: Settings) -> Scrubber:
        return cls(secrets_of(settings))

    def secrets_only(self, text: str) -> str:
        """Only the configured secrets: for model output, where a key-shaped string may be
        the content."""
        return self._values.sub(MASK, text) if self._values and text else text

    def __call__(self, text: str) -> str:
        if not text:
            return text
        text = self.secrets_only(text)
        if text.isascii():
            lower = text.lower()
            if not any(cue in lower for cue in _CUES):
                return text
        for pattern, replacement in _SHAPES:
            text = pattern.sub(replacement, text)
        return text


class LogFilter(logging.Filter):
    """Scrubs each record a handler writes: its message, arguments and traceback."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logged as it is
            message = str(record.msg)
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


def install(scrub: Scrubber, logger: logging.Logger | None = None) -> None:
    """Put the scrubbing filter on every handler of `logger` (the root by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, LogFilter) for f in handler.filters):
            handler.addFilter(LogFilter(scrub))
