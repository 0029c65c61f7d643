"""A worker app whose model call kills the worker process for a poisoned task (test only).

`celery -A tests.poison_app worker` is the real worker with one fault injected: any model call
made as the poison-pill expert (its system message) ends the process at once, as a segfault would."""

import os

import tasktree.llm
from workers import create_app

_complete = tasktree.llm.complete


def _crashing(settings, model, messages, json_mode=False):  # type: ignore[no-untyped-def]
    if messages and messages[0].get("content") == "You are an expert in poison pill.":
        os._exit(70)
    return _complete(settings, model, messages, json_mode)


tasktree.llm.complete = _crashing
app = create_app(current=True)
