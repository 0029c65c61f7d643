"""The Celery app of the generic agent worker: `celery -A workers worker`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from celery import Celery, bootsteps, signals

import celeryconfig
from tasktree import scrub
from tasktree.leases import Leases
from tasktree.llm import Complete, Models
from tasktree.settings import Settings, load
from tasktree.store import Store
from tasktree.tracing import Tracing
from tasktree.tracing import setup as setup_tracing


@dataclass
class Runtime:
    """What the tasks of one app share: the settings, the model, the store built from them."""

    settings: Settings
    complete: Complete
    embedded: bool = False  # runs inside a CLI or library process, not `celery worker`
    sweepers: list[threading.Event] = field(default_factory=list)  # set one to stop its loop

    @cached_property
    def store(self) -> Store:
        url = self.settings.redis_url or celeryconfig.DEFAULT_URL
        return Store.from_settings(self.settings, url)

    held: Callable[[], set[tuple[str, str]]] | None = None  # the live members its worker holds

    @cached_property
    def tracing(self) -> Tracing:
        """Traces as the OTel environment asks, set up in the process that runs the tasks."""
        return setup_tracing("tasktree-worker")

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.store, self.settings.lease_seconds, self.held)


class TaskTreeStep(bootsteps.StartStopStep):
    """The worker's own start and stop, bound to its app: say where it listens, import the
    model library, run the sweeper."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        from workers import sweeper

        runtime: Runtime = worker.app.tasktree
        if not runtime.embedded:
            announce(worker.app, worker.hostname)
        if isinstance(runtime.complete, Models):
            runtime.complete.warm()
        worker.app.backend  # noqa: B018 - the process's one backend, before the threads ask at once
        runtime.sweepers.append(sweeper.start(worker.app))

    def stop(self, worker: Any) -> None:
        runtime: Runtime = worker.app.tasktree
        if "tracing" in vars(runtime):  # send what is still batched
            runtime.tracing.flush()
        for stop in worker.app.tasktree.sweepers:
            stop.set()
        worker.app.tasktree.leases.stop()


class EventBatches(bootsteps.StartStopStep):
    """Task events (what Flower reads) leave in one message every EVENT_BATCH seconds.

    Celery buffers them and flushes at the event loop's next turn, which under load is every
    two or three events: a publish, its JSON and a Redis round trip each. Here the loop's
    timer flushes instead, and a burst flushes early only at 1,000 events. Flower sees each
    event at most EVENT_BATCH later, with the time it happened."""

    requires: ClassVar[set[str]] = {"celery.worker.consumer.events:Events"}
    EVENT_BATCH = 0.1
    LIMIT = 1000
    timer: Any = None

    def start(self, consumer: Any) -> None:
        dispatcher = consumer.event_dispatcher
        if consumer.hub is None or dispatcher is None or not dispatcher.buffer_group:
            return  # Celery buffers nothing without the event loop: every event goes at once
        dispatcher.on_send_buffered = None
        dispatcher.buffer_limit = self.LIMIT
        self.timer = consumer.hub.call_repeatedly(self.EVENT_BATCH, consumer._flush_events)

    def stop(self, consumer: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            consumer._flush_events()  # what is buffered leaves before the connection closes

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)


class Ready(bootsteps.StartStopStep):
    """The consumer's last step before its loop: say, at any log level, that the worker is ready."""

    requires: ClassVar[set[str]] = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, consumer: Any) -> None:
        if not consumer.app.tasktree.embedded:
            worker_log = logging.getLogger("tasktree.worker")
            worker_log.setLevel(logging.INFO)
            worker_log.info("tasktree worker %s ready", consumer.hostname)


def announce(app: Celery, hostname: str) -> None:
    """One line at any log level, before connecting: which Redis, queues and model."""
    from tasktree.connection import redact

    settings = app.tasktree.settings
    line = (
        f"tasktree worker {hostname} starting: broker {redact(app.conf.broker_url)}, queues "
        f"{settings.node_queue} and {settings.synth_queue}, model {settings.model_for('execute')}"
    )
    if not settings.redis_url:
        line += (
            " (TASKTREE_REDIS_URL is not set: this is the default Redis; a CLI without "
            "TASKTREE_REDIS_URL uses its own embedded store and never reaches this worker)"
        )
    worker_log = logging.getLogger("tasktree.worker")
    worker_log.setLevel(logging.INFO)  # shown at celery's default level (WARNING) too
    worker_log.info(line)


def create_app(
    settings: Settings, complete: Complete | None = None, *, embedded: bool = False
) -> Celery:
    """A Celery app for one settings object and model, with tasktree's tasks registered."""
    from workers import backend, tasks

    conf = celeryconfig.config(settings)
    app = Celery("tasktree", set_as_current=False)
    app.config_from_object(conf)
    app.backend_cls = backend.for_url(conf["result_backend"])
    app.tasktree = Runtime(settings, complete or Models(settings), embedded)
    app.tasktree.held = lambda: tasks.held_by(app)
    app.steps["worker"].add(TaskTreeStep)
    app.steps["consumer"].add(EventBatches)
    app.steps["consumer"].add(Ready)
    tasks.register(app)
    return app


#: The app `celery -A workers` runs: the one place that reads the environment.
app = create_app(load())


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def scrub_logs(logger: logging.Logger, **_: Any) -> None:
    """Every line the worker logs (the root's and the task logger's handlers) is scrubbed."""
    scrub.install(app.tasktree.store.scrub, logger)
