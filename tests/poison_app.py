"""A worker app whose model call kills the worker process for a poisoned task (test only).

`celery -A tests.poison_app worker` is the real worker with one fault injected through the
model callable it is given: any model call made as the poison-pill expert (its system
message) ends the process at once, as a segfault would."""

import os

from tasktree.llm import Models
from tasktree.models import Reply
from tasktree.settings import load
from tasktree.states import Step
from workers import create_app

settings = load()
models = Models(settings)


def crashing(step: Step, model: str, messages: list[dict[str, str]], json_mode: bool) -> Reply:
    if messages and messages[0].get("content") == "You are an expert in poison pill.":
        os._exit(70)
    return models(step, model, messages, json_mode)


app = create_app(settings, crashing)
