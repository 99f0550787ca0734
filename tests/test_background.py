"""The background runner: a final pass at stop, and none after the app closed."""

from __future__ import annotations

import atexit
from typing import Any

from flask_llmauth.background import Background


def test_stop_runs_every_task_once_more_and_exit_does_not_repeat_it(monkeypatch: Any) -> None:
    hooks: list[Any] = []
    monkeypatch.setattr(atexit, "register", hooks.append)
    background = Background()
    runs: list[str] = []
    background.every(3600, "count", lambda: runs.append("run"))
    (exit_hook,) = hooks

    exit_hook()  # never stopped: the exit hook is the final pass (a clean shutdown flushes)
    assert runs == ["run"]

    background.ensure_started()
    assert background.started and not background.stopped
    background.stop()  # e.g. LLMAuthState.close(): final pass, then the store is closed
    assert runs == ["run", "run"] and background.stopped
    exit_hook()  # at interpreter exit nothing runs against the closed store
    assert runs == ["run", "run"]

    background.ensure_started()  # used again after a stop: the exit hook applies again
    assert not background.stopped
    exit_hook()
    assert runs == ["run", "run", "run"]
