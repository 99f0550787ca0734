"""gunicorn server hooks for the test servers (passed with ``-c``).

A stopping worker runs its exit hooks (the app's final flush) as usual; then the
interpreter's finalization collects garbage over the whole heap several times, which on a
busy two-core machine took 1-2 s per worker and made every server stop wait for it (at
worst the master's graceful timeout SIGKILLed a worker still finalizing). Freezing the heap
once the worker leaves its loop skips those collections: the stop stays a graceful SIGTERM,
the exit hooks still run, the process just exits sooner.
"""

from __future__ import annotations

import gc
from typing import Any


def worker_exit(server: Any, worker: Any) -> None:
    gc.freeze()
