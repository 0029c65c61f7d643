"""The Celery app of the generic agent worker: `celery -A workers worker`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery

import celeryconfig
from tasktree.settings import Settings, load
from tasktree.store import Store


@dataclass
class Runtime:
    """What the tasks of one app share: the settings and the store built from them."""

    settings: Settings

    @cached_property
    def store(self) -> Store:
        url = self.settings.redis_url or celeryconfig.DEFAULT_URL
        return Store.from_settings(self.settings, url)


def create_app(settings: Settings | None = None, current: bool = False) -> Celery:
    """A Celery app for one settings object, with tasktree's tasks registered."""
    from workers import backend, tasks

    settings = settings or load()
    conf = celeryconfig.config(settings)
    app = Celery("tasktree", set_as_current=current)
    app.config_from_object(conf)
    app.backend_cls = backend.for_url(conf["result_backend"])
    app.tasktree = Runtime(settings)  # type: ignore[attr-defined]
    tasks.register(app)
    return app


app = create_app(current=True)
