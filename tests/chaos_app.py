"""The worker app of the chaos suite (`celery -A tests.chaos_app worker`): the real worker,
whose offline model also fails transiently at random (TASKTREE_CHAOS_FAIL_RATE) and lists
every reply it gives in Redis (`chaos:accepted`), the provider's side of the bill."""

import os
import random
import uuid

from tasktree.connection import connect
from tasktree.errors import TransientLLMError
from tasktree.llm import Models
from tasktree.models import Reply
from tasktree.settings import load
from tasktree.states import Step
from tests.chaos import ACCEPTED
from workers import create_app

settings = load()
models = Models(settings)
fail_rate = float(os.environ.get("TASKTREE_CHAOS_FAIL_RATE", "0"))
ledger = connect(settings.redis_url or "", settings)  # rides out a Redis restart


def flaky(step: Step, model: str, messages: list[dict[str, str]], json_mode: bool) -> Reply:
    if random.random() < fail_rate:
        raise TransientLLMError(f"{model}: 503 chaos says try again")
    reply = models(step, model, messages, json_mode)
    # Answered: the provider bills it, recorded or not. A set of reply ids, not a counter:
    # a command re-sent after a Redis stall must not count one reply twice.
    ledger.sadd(ACCEPTED, uuid.uuid4().hex)
    return reply


app = create_app(settings, flaky)
