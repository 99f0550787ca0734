"""docs/api.md documents every endpoint of the management API, each with a curl example."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from example_app import create_app
from flask_llmauth.api import API_ROUTES
from tests.helpers import record_secret

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_every_management_endpoint_is_documented_with_a_curl_example(app_factory: Any) -> None:
    app = app_factory(routes=False)  # registers the blueprint, which fills API_ROUTES
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    documented: dict[tuple[str, str], str] = {}
    for section in sections:
        heading = section.splitlines()[0]
        for method, path in re.findall(r"`(GET|POST) ([^`?]+)", heading):
            documented[(method, path.replace("{key}", "{key_id}"))] = section
    missing, no_example = [], []
    for rule in app.url_map.iter_rules():
        path = API_ROUTES.get(rule.endpoint)
        if path is None:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if (method, path) not in documented:
                missing.append(f"{method} {path}")
            elif "curl " not in documented[(method, path)]:
                no_example.append(f"{method} {path}")
    assert not missing, f"endpoints missing from docs/api.md: {sorted(set(missing))}"
    assert not no_example, f"endpoints without a curl example: {sorted(set(no_example))}"


#: What the examples call ``$MASTER_KEY`` (any strong value: the test app is configured with it).
MASTER_KEY = "sk-DocsWalkthrough-" + "q7Zx3Vb9Nm2Lk5Jh8Gf4Dd6Ss1Aa0Pp"
#: Responses whose ``key``/``key_id`` become ``$KEY``/``$KEY_ID`` for the examples after them.
KEY_SOURCES = ("/key/generate", "/user/new", "/regenerate")


def curl_commands(text: str) -> list[str]:
    """Every ``curl`` command of the doc's ``bash`` blocks, in order (continuation lines
    joined; ``$VARS`` left in place)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [part.strip() for part in re.split(r"\n(?=curl )", joined)
                     if part.startswith("curl ")]
    return commands


def run_curl(client: Any, command: str, variables: dict[str, str]) -> Any:
    """Send one documented ``curl`` command to the test client, as curl would send it."""
    for name, value in sorted(variables.items(), key=lambda item: -len(item[0])):
        command = command.replace("$" + name, value)
    assert "$" not in command, f"an example uses an undefined variable: {command}"
    words = shlex.split(command)
    headers: dict[str, str] = {}
    data: str | None = None
    url = None
    i = 1
    while i < len(words):
        word = words[i]
        if word == "-H":
            name, _, value = words[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 2
        elif word == "-d":
            data = words[i + 1]
            i += 2
        elif word.startswith("-"):
            i += 1
        else:
            url = word
            i += 1
    assert url is not None and url.startswith("localhost:5000/"), command
    path = url[len("localhost:5000"):]
    return client.open(path, method="POST" if data is not None else "GET", headers=headers,
                       data=data)


def test_the_api_examples_run_in_order_on_a_fresh_example_gateway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user pasting docs/api.md's examples top to bottom into a shell next to a fresh
    ``flask --app example_app run`` gets a 200 from every one of them."""
    monkeypatch.setenv("GATEWAY_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app({"LLMAUTH_MASTER_KEY": MASTER_KEY})
    client = app.test_client()
    variables = {"MASTER_KEY": record_secret(MASTER_KEY)}
    text = DOC.read_text(encoding="utf-8")
    commands = curl_commands(text)
    assert len(commands) >= 30
    for command in commands:
        response = run_curl(client, command, variables)
        assert response.status_code == 200, (command, response.get_json())
        path = command.split()[2]
        body = response.get_json()
        if isinstance(body, dict) and any(source in path for source in KEY_SOURCES):
            record_secret(body["key"])
            variables.update(KEY=body["key"], KEY_ID=body["key_id"])
    app.extensions["llmauth"].close()
