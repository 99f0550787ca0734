"""The Python examples of docs/oauth2.md and docs/spend.md, run as written: the custom auth
hook and its default mode, ``custom_key_validate``, and the spend ledger's host hooks."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

from flask import Flask, jsonify

from flask_llmauth import current_principal
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def run(source: str, page: str, **names: Any) -> dict[str, Any]:
    namespace: dict[str, Any] = dict(names)
    exec(compile(source, f"docs/{page}", "exec"), namespace)  # noqa: S102
    return namespace


def test_custom_auth_example_and_its_default_mode(tmp_path: Path) -> None:
    """oauth2.md's hook, as written: the mapping it returns is the caller, its
    ``Unauthenticated`` is sent as it is, and in the default mode ``on`` the master key gets
    the hook's answer too (401), as the page warns."""
    block = next(b for b in python_blocks("oauth2.md") if "@llmauth.custom_auth" in b)
    users = {"corp-alice": types.SimpleNamespace(id="alice", team=None)}
    directory = types.SimpleNamespace(lookup_token=users.get)
    app = Flask("custom_auth_example")
    app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY,
                      LLMAUTH_DATABASE_URL=f"sqlite:///{tmp_path}/example.db")

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        return jsonify(user_id=current_principal.user_id, method=current_principal.method)

    run(block, "oauth2.md", app=app, my_directory=directory)
    try:
        client = app.test_client()
        good = client.post("/v1/chat/completions", json=CHAT, headers=bearer("corp-alice"))
        assert good.get_json() == {"user_id": "alice", "method": "custom"}
        other_model = client.post("/v1/chat/completions", json={**CHAT, "model": "o3"},
                                  headers=bearer("corp-alice"))
        assert_error(other_model, 403)  # "models": ["gpt-4o"] limits the caller
        unknown = client.post("/v1/chat/completions", json=CHAT, headers=bearer("corp-bob"))
        assert assert_error(unknown, 401)["message"] == "Unknown token"
        master = client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
        assert assert_error(master, 401)["message"] == "Unknown token"
        assert assert_error(client.get("/key/list", headers=ADMIN), 401)
    finally:
        app.extensions["llmauth"].close()


def test_custom_key_validate_example(app_factory: Any) -> None:
    block = next(b for b in python_blocks("oauth2.md") if "@llmauth.custom_key_validate" in b)
    app = app_factory()
    run(block, "oauth2.md", llmauth=app.llmauth)  # type: ignore[attr-defined]
    client = app.test_client()
    suspended = new_key(client, metadata={"tier": "suspended"})["key"]
    active = new_key(client, metadata={"tier": "gold"})["key"]
    plain = new_key(client)["key"]
    assert_error(client.post("/v1/chat/completions", json=CHAT, headers=bearer(suspended)), 403)
    for key in (active, plain):
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers=bearer(key)).status_code == 200


def test_spend_host_code_example(app_factory: Any) -> None:
    """spend.md's ledger hooks, as written: the callback takes ``(events, db)`` in the
    batch's transaction, and ``flush(app)`` writes the queue now."""
    block = next(b for b in python_blocks("spend.md") if "on_batch" in b)
    app = app_factory({"LLMAUTH_SPEND_FLUSH_INTERVAL": 3600})
    client = app.test_client()
    key = new_key(client)["key"]
    with app.app_context():
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers=bearer(key)).status_code == 200
        namespace = run(block, "spend.md", app=app)
    ledger = app.extensions["llmauth"].spend_ledger
    assert namespace["ledger"] is ledger and namespace["export"] in ledger._callbacks
    logs = client.get("/spend/logs", headers=ADMIN).get_json()
    assert len(logs) == 1, "flush(app) wrote the queued event (a callback error drops it)"
