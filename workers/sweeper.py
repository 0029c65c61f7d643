"""Re-drive what a crash can lose beyond Celery's redelivery.

Two windows lose work for good even with late acknowledgement: Celery's Redis chord join claims
a callback's dispatch before publishing it (a worker killed in between leaves a chord whose
callback never comes), and kombu's Redis transport moves a message from its queue to the
unacked set in two steps. Every worker runs this loop; under a lock, one at a time looks at
trees quiet for `stall_seconds` and re-sends the synthesis of each delegated node whose children
are all closed, and the task of each open node that holds no live claim (at most once per three
stall periods). Both tasks are idempotent, so a spare message is harmless.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tasktree.errors import TaskTreeError

log = logging.getLogger(__name__)


def sweep_once(app: Any) -> int:
    """One sweep; returns how many messages were re-sent."""
    from workers.tasks import NODE, SYNTHESIZE, describe

    runtime = app.tasktree
    store, settings = runtime.store, runtime.settings
    if not store.take_sweep_lock(settings.restore_interval):
        return 0
    sent = 0
    for tree_id in store.stalled_trees(settings.stall_seconds):
        due, lost = store.stuck(tree_id, redrive_after=3 * settings.stall_seconds)
        for node_id in due:
            log.warning("re-sending the synthesis of node %s in tree %s", node_id, tree_id)
            app.send_task(SYNTHESIZE, args=[tree_id, node_id], ignore_result=True)
            sent += 1
        for node in lost:
            log.warning("re-sending node %s (%s) of tree %s", node.id, node.status, tree_id)
            if node.status == "synthesizing":
                app.send_task(SYNTHESIZE, args=[tree_id, node.id], ignore_result=True)
            else:
                from tasktree.proto import to_dict

                req = node.request(tree_id)
                app.send_task(NODE, args=[to_dict(req)], argsrepr=describe(req), ignore_result=True)
            sent += 1
    return sent


def start(app: Any) -> threading.Event:
    """Sweep every restore_interval seconds in a daemon thread until the event is set."""
    stop = threading.Event()
    interval = app.tasktree.settings.restore_interval

    def loop() -> None:
        while not stop.wait(interval):
            try:
                sweep_once(app)
            except TaskTreeError as e:  # Redis away: try again next time
                log.warning("sweep skipped: %s", e)

    threading.Thread(target=loop, name="tasktree-sweeper", daemon=True).start()
    return stop
