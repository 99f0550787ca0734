"""The background runner: a final pass at stop, and none after the app closed."""

from __future__ import annotations

import atexit
import gc
import time
import weakref
from typing import Any

from flask import Flask

from flask_llmauth import LLMAuth
from flask_llmauth.background import Background
from tests.conftest import migrated_sqlite_url
from tests.helpers import ADMIN, MASTER_KEY


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


def test_an_app_dropped_by_its_factory_is_collected_and_its_thread_ends(tmp_path: Any) -> None:
    """``llmauth = LLMAuth()`` at import time, one app per test from a factory: an app the
    host drops is collected and its background thread (which polls the database every
    second) ends. The extension's hook listeners, the exception signal and the thread's
    own frame each kept every app, its thread and its connection pool alive for good."""
    llmauth = LLMAuth()

    def create_app() -> Flask:
        app = Flask("factory_app", instance_path=str(tmp_path / "instance"))
        app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY,
                          LLMAUTH_DATABASE_URL=migrated_sqlite_url(tmp_path))

        @app.post("/v1/chat/completions")
        def chat() -> Any:
            return {"ok": True}

        llmauth.init_app(app)
        return app

    threads = []
    apps = []
    for _ in range(3):
        app = create_app()
        assert app.test_client().post("/v1/chat/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN).status_code == 200
        threads.append(app.extensions["llmauth"].background._thread)
        apps.append(weakref.ref(app))
        del app
    assert all(thread.is_alive() for thread in threads)
    deadline = time.monotonic() + 5  # a thread running a task holds its app for that long
    while any(ref() is not None for ref in apps) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert [ref() for ref in apps] == [None, None, None]
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
