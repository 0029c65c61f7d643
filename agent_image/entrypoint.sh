#!/bin/sh
# One image, every role:
#   worker [celery worker options]   the generic agent (the default)
#   flower [flower options]          Flower on the same broker
#   celery ...                       any celery command
#   anything else                    a tasktree command: submit "...", list, tree ID, ...
set -e
role="${1:-worker}"
[ "$#" -gt 0 ] && shift
case "$role" in
    worker) exec celery -A workers worker "$@" ;;
    flower) exec celery -A workers flower "$@" ;;
    celery) exec celery "$@" ;;
    -*) exec celery -A workers worker "$role" "$@" ;;  # options for the worker
    *) exec python -m tasktree "$role" "$@" ;;
esac
