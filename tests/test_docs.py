"""Docs are part of the feature: the configuration table is generated from the code, and the
CLI's documented sessions print what they show."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from example_app import create_app
from flask_llmauth.config import PREFIX, Settings, documentation_table
from tests.helpers import record_secret

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-CliDocsSession-" + "w4Rt7Yu1Io3Pa5Sd8Fg0Hj2Kl6Zx9Cv"


def test_configuration_doc_lists_every_setting_as_generated() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert documentation_table() in doc, "regenerate: python docs/generate.py"
    for field in Settings.table():
        assert f"`{PREFIX}{field.name.upper()}`" in doc


def console_sessions(text: str) -> list[tuple[str, list[str]]]:
    """``(command, documented output lines)`` of every ``$ flask llmauth ...`` line in the
    doc's ``console`` blocks, in order (a trailing ``# comment`` dropped)."""
    sessions: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                sessions.append((line[2:].split("#")[0].strip(), []))
            elif sessions:
                sessions[-1][1].append(line)
    return [s for s in sessions if s[0].startswith("flask llmauth ")]


def matches(documented: str, printed: str) -> bool:
    """A documented line matches when equal up to its numbers; a line with ``...`` is an
    abridged illustration (a random key or id) and matches any line."""
    if "..." in documented:
        return True
    pattern = r"\d+".join(re.escape(part) for part in re.split(r"\d+", documented))
    return re.fullmatch(pattern, printed) is not None


def test_generate_check_reports_a_stale_table_without_writing(tmp_path: Path) -> None:
    """``python docs/generate.py --check`` reads the settings of its own checkout, wherever
    it runs from, and exits 1 (writing nothing) when the table is stale."""
    import shutil
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "generate.py", docs / "generate.py")
    stale = docs / "configuration.md"
    stale.write_text("# Configuration\n\n| an old table |\n")
    done = subprocess.run([sys.executable, str(docs / "generate.py"), "--check"],
                          cwd=tmp_path, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "out of date" in done.stderr
    assert stale.read_text() == "# Configuration\n\n| an old table |\n"


def test_the_cli_doc_sessions_print_what_they_show(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/cli.md's ``$ flask llmauth ...`` sessions, run in order against a fresh example
    gateway with ``LLMAUTH_AUTO_MIGRATE=False`` (as the doc's first session sets), print
    the lines shown (the database-down one is left out: it needs a database that is down)."""
    monkeypatch.setenv("GATEWAY_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app({"LLMAUTH_MASTER_KEY": record_secret(MASTER_KEY),
                      "LLMAUTH_AUTO_MIGRATE": False})
    runner = app.test_cli_runner()
    sessions = console_sessions((ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    assert len(sessions) >= 7
    for command, documented in sessions:
        result = runner.invoke(args=shlex.split(command)[1:])
        printed = result.output.splitlines()
        if documented and documented[0].startswith("sk-"):
            record_secret(printed[0])
        assert len(printed) == len(documented), (command, printed)
        for want, got in zip(documented, printed, strict=True):
            assert matches(want, got), (command, want, got)
        assert result.exit_code == (1 if documented[0].startswith("Error:") else 0), command
    app.extensions["llmauth"].close()


def test_the_extension_guide_example_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extension.md's factory app, as written: its views, hooks, signal receiver and
    error handler do what the guide says."""
    import json
    import logging
    import time
    import types

    from flask_llmauth import signals
    from tests.helpers import MASTER_KEY, bearer, record_secret

    source = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extension.md").read_text(), re.S)
    module = types.ModuleType("extension_guide")
    exec(compile(source[0], "docs/extension.md", "exec"), module.__dict__)  # noqa: S102
    monkeypatch.setenv("FLASK_LLMAUTH_SPEND_FLUSH_INTERVAL", "0.05")
    app = module.create_app({"LLMAUTH_MASTER_KEY": MASTER_KEY,
                             "LLMAUTH_DATABASE_URL": f"sqlite:///{tmp_path}/guide.db"})
    try:
        client = app.test_client()
        admin = bearer(MASTER_KEY)
        key = client.post("/key/generate", json={"models": ["gpt-4o"]}, headers=admin).get_json()
        headers = bearer(record_secret(key["key"]))
        chat = {"model": "gpt-4o", "messages": []}
        assert client.post("/v1/chat/completions", json=chat, headers=headers).status_code == 200
        streamed = client.post("/v1/chat/completions", json={**chat, "stream": True},
                               headers=headers)
        assert streamed.get_data(as_text=True).endswith("data: [DONE]\n\n")
        assert client.post("/generate", json=chat, headers=headers).status_code == 200
        # no model named: the chat view answers 400; /generate's default is checked (403)
        missing = client.post("/v1/chat/completions", json={"messages": []}, headers=headers)
        assert missing.status_code == 400 and missing.get_json()["error"]["param"] == "model"
        default = client.post("/generate", json={}, headers=headers)
        assert default.status_code == 403
        assert default.get_json()["error"]["type"] == "key_model_access_denied"
        corp = bearer("corp-alice")
        assert client.get("/internal/reports", headers=corp).get_json() == {
            "scopes": ["reports:read"]}
        assert client.post("/v1/chat/completions", json={"model": "o3"},
                           headers=corp).status_code == 403
        assert client.get("/internal/admin", headers=admin).get_json() == {
            "role": "proxy_admin"}
        assert client.get("/healthz").get_json() == {"ok": True}
        assert client.get("/health/readiness").get_json() == {"status": "healthy",
                                                              "db": "connected"}
        with caplog.at_level(logging.INFO):
            refused = client.get("/internal/admin", headers=headers)
            revoked = client.get("/internal/reports", headers=bearer("corp-revoked"))
        assert refused.status_code == 403 and revoked.status_code == 401
        assert revoked.get_json()["error"]["message"] == "This corporate token was revoked."
        for response in (refused, revoked):
            assert response.headers["X-Request-Failed-By"] == "llmauth"
        assert revoked.headers["WWW-Authenticate"] == 'Bearer realm="llmauth"'
        assert "refused 403 required_role_missing on /internal/admin" in caplog.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            logs = client.get("/spend/logs", headers=admin).get_json()
            if len(logs) == 5:
                break
            time.sleep(0.05)
        assert sorted((row["call_type"], row["prompt_tokens"], row["completion_tokens"],
                       row["status"]) for row in logs) == [
            ("/generate", 0, 0, "failure"),  # the refused default model
            ("/generate", 5, 20, "success"),
            ("/v1/chat/completions", 0, 0, "failure"),  # no model: 400
            ("/v1/chat/completions", 12, 1, "success"),
            ("/v1/chat/completions", 12, 1, "success")], json.dumps(logs)
    finally:
        signals.auth_failed.disconnect(module.audit_refusal)
        app.extensions["llmauth"].close()


def test_the_readme_app_example_runs(tmp_path: Path) -> None:
    """README's "Use it in your app" example, with a real master key and a SQLite file in
    place of its placeholders: the LLM route takes any key for its models, the admin route
    only the proxy admin, the exempt route no credential; no view answers a 500."""
    import types

    from tests.helpers import MASTER_KEY, bearer

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    source = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                  if "LLMAuth(app)" in block)
    placeholders = {'"sk-..."': repr(MASTER_KEY),
                    '"postgresql://llmauth@db/llmauth"': repr(f"sqlite:///{tmp_path}/app.db")}
    for placeholder, value in placeholders.items():
        assert source.count(placeholder) == 1, placeholder
        source = source.replace(placeholder, value)
    module = types.ModuleType("readme_app")
    exec(compile(source, "README.md", "exec"), module.__dict__)  # noqa: S102
    app = module.app
    try:
        client = app.test_client()
        admin = bearer(MASTER_KEY)
        key = client.post("/key/generate", json={"models": ["gpt-4o"]}, headers=admin).get_json()
        user = bearer(record_secret(key["key"]))
        chat = {"model": "gpt-4o", "messages": []}
        assert client.post("/v1/chat/completions", json=chat, headers=admin).get_json() == {
            "caller": "default_user_id"}
        assert client.post("/v1/chat/completions", json=chat, headers=user).status_code == 200
        other = client.post("/v1/chat/completions", json={**chat, "model": "o3"}, headers=user)
        assert other.status_code == 403
        assert client.post("/v1/chat/completions", json=chat).status_code == 401
        assert client.get("/admin/report", headers=admin).status_code == 200
        assert client.get("/admin/report", headers=user).status_code == 403
        assert client.get("/status").get_json() == {"ok": True}
    finally:
        app.extensions["llmauth"].close()


def _heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower-cased, characters other than
    letters, digits, spaces, ``-`` and ``_`` dropped, spaces made ``-``; a repeated anchor
    gets ``-1``, ``-2``... (headings inside code fences are not headings)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_heading_anchors_follow_githubs_rules() -> None:
    page = "# Cost\n## The chain (`bench/run.py`)\n```\n# not a heading\n```\n## Cost\n"
    assert _heading_anchors(page) == {"cost", "the-chain-benchrunpy", "cost-1"}


def test_every_relative_link_of_the_docs_finds_its_page_and_heading() -> None:
    """A link between the README and docs/ pages (or within one) points at a file that
    exists and, with ``#anchor``, at one of that page's headings."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        text_outside_code = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text_outside_code):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _heading_anchors(
                    linked.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []
