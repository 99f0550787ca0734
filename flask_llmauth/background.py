"""One daemon thread per app and process for periodic work (cache sync, batched writes).

It starts lazily on the first request of each process (so it survives a pre-fork server's
fork) and runs every task one last time at interpreter exit, so batched writes are not lost
on a clean shutdown.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LLMAuthError

log = logging.getLogger("flask_llmauth")


@dataclass
class _Task:
    name: str
    interval: float
    run: Callable[[], object]
    due: float = 0.0
    failing: bool = False
    reported: float = 0.0
    #: Run once more by :meth:`Background.stop` (flushes); a poll or sweep whose work
    #: only matters to a running process is not.
    at_stop: bool = True


class Background:
    def __init__(self) -> None:
        self._tasks: list[_Task] = []
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: False until the thread runs in this process; reset in a forked child.
        self.started = False
        #: True once :meth:`stop` ran its final pass and no thread started since: the exit
        #: hook then has nothing left to do (the app closed its store already).
        self.stopped = False
        ref = weakref.ref(self)
        atexit.register(lambda: None if (obj := ref()) is None or obj.stopped else obj.stop())
        os.register_at_fork(after_in_child=lambda: None if (o := ref()) is None else o._forked())

    def _forked(self) -> None:
        self.started = False
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        """True during :meth:`stop`'s last pass of the tasks (and after it)."""
        return self._stop.is_set()

    def every(self, interval: float, name: str, run: Callable[[], object], *,
              at_stop: bool = True) -> None:
        """Run ``run`` every ``interval`` seconds (and once more at shutdown unless
        ``at_stop`` is false)."""
        self._tasks.append(_Task(name, interval, run, time.monotonic() + interval,
                                 at_stop=at_stop))

    def ensure_started(self) -> None:
        """Start the thread in this process unless it runs (cheap: a flag on later calls)."""
        if self.started or not self._tasks:
            return
        with self._lock:
            if self._pid == os.getpid():
                self.started = True
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_loop, args=(weakref.ref(self), self._stop), name="llmauth-background",
                daemon=True,
            )
            self._pid = os.getpid()
            self._thread.start()
            self.started = True
            self.stopped = False

    def run_all(self) -> None:
        """Run every task now (tests, shutdown)."""
        for task in self._tasks:
            _run(task)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        self._pid = None
        self.started = False
        for task in self._tasks:
            if task.at_stop:
                _run(task)
        self.stopped = True


def _run(task: _Task) -> None:
    try:
        task.run()
    except LLMAuthError as exc:  # e.g. the database is down: expected, already logged
        _note_failure(task, f"{exc.status} {exc.reason}")
    except Exception as exc:
        _note_failure(task, type(exc).__name__, exc_info=True)
    else:
        if task.failing:
            log.warning("llmauth: background task %s recovered", task.name)
            task.failing = False


#: A task that keeps failing is reported at most this often (seconds).
_REPORT_EVERY = 60.0


def _note_failure(task: _Task, what: str, exc_info: bool = False) -> None:
    now = time.monotonic()
    if not task.failing or now - task.reported >= _REPORT_EVERY:
        log.error("llmauth: background task %s failed: %s", task.name, what,
                  exc_info=exc_info)
        task.reported = now
    task.failing = True


def _loop(ref: weakref.ref[Background], stop: threading.Event) -> None:
    """Run the due tasks while the :class:`Background` lives. Between passes the thread
    holds only the weak reference, so a dropped app (and its state) can be collected and
    the thread ends; a task left in a local variable here kept them alive for good."""
    while not stop.is_set():
        owner = ref()
        if owner is None:
            return
        wait = _run_due(owner)
        del owner
        stop.wait(max(0.01, min(wait, 1.0)))


def _run_due(owner: Background) -> float:
    """Run the tasks that are due; the seconds until the next one is."""
    now = time.monotonic()
    for task in owner._tasks:
        if task.due <= now:
            task.due = now + task.interval
            _run(task)
    return min((t.due for t in owner._tasks), default=now + 1.0) - time.monotonic()
