"""``flask llmauth ...`` through ``app.test_cli_runner()``: every command, clean errors, and
no secret on the terminal except a new key, once."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from flask import Flask

from tests.helpers import MASTER_KEY, assert_error, bearer, record_secret

CHAT = "/v1/chat/completions"


@pytest.fixture
def app(app_factory: Any, db_url: str) -> Flask:
    """The commands that write run on SQLite and Postgres."""
    return app_factory(db_url=db_url)


@pytest.fixture
def sqlite_app(app_factory: Any) -> Flask:
    """Error handling does not depend on the database: SQLite only."""
    return app_factory()


class Terminal:
    """Runs commands and keeps everything they printed (for the secret checks)."""

    def __init__(self, app: Flask) -> None:
        self.runner = app.test_cli_runner()
        self.transcript: list[str] = []

    def __call__(self, *args: str, ok: bool = True) -> Any:
        result = self.runner.invoke(args=["llmauth", *args])
        self.transcript.append(result.output)
        if ok:
            assert result.exit_code == 0, (args, result.output)
            assert result.exception is None
        return result

    def fails(self, *args: str) -> str:
        result = self(*args, ok=False)
        assert result.exit_code == 1, (args, result.exit_code, result.output)
        assert isinstance(result.exception, SystemExit)  # a ClickException, not a crash
        assert result.stdout == ""
        assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
        return str(result.stderr[len("Error: "):].strip())

    @property
    def everything(self) -> str:
        return "\n".join(self.transcript)


def chat(app: Flask, key: str, model: str = "gpt-4o") -> Any:
    return app.test_client().post(CHAT, json={"model": model}, headers=bearer(key))


def test_create_key_prints_the_key_once_on_stdout(app: Flask,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    term = Terminal(app)
    with caplog.at_level(logging.DEBUG):
        result = term("create-key", "--user-id", "alice", "--alias", "svc", "--models",
                      "gpt-4o, gpt-4o-mini", "--duration", "30d", "--max-budget", "12.5")
    key = record_secret(result.stdout.strip())
    assert key.startswith("sk-") and len(key) == 46 and result.stdout == key + "\n"
    assert "shown only once" in result.stderr and key not in result.stderr
    assert result.output.count(key) == 1
    assert key not in caplog.text
    assert chat(app, key).status_code == 200
    assert_error(chat(app, key, "claude-3-5-sonnet"), 403)
    info = app.test_client().get("/key/info", headers=bearer(key)).get_json()["info"]
    assert (info["user_id"], info["key_alias"], info["models"], info["max_budget"]) == \
        ("alice", "svc", ["gpt-4o", "gpt-4o-mini"], 12.5)
    assert info["expires"] is not None and info["created_by"] == "default_user_id"
    as_json = json.loads(term("create-key", "--json").stdout)
    record_secret(as_json["key"])
    assert as_json["key"].startswith("sk-") and as_json["key_id"] == as_json["token"]
    assert MASTER_KEY not in term.everything


def test_create_key_sets_the_budget_window_and_the_rate_limits(app: Flask) -> None:
    term = Terminal(app)
    key = record_secret(term("create-key", "--max-budget", "10", "--budget-duration", "30d",
                             "--rpm-limit", "1", "--tpm-limit", "5000",
                             "--max-parallel-requests", "2").stdout.strip())
    info = app.test_client().get("/key/info", headers=bearer(key)).get_json()["info"]
    assert (info["max_budget"], info["budget_duration"], info["rpm_limit"], info["tpm_limit"],
            info["max_parallel_requests"]) == (10.0, "30d", 1, 5000, 2)
    assert info["budget_reset_at"] is not None
    assert chat(app, key).status_code == 200
    assert "Limit type: requests" in assert_error(chat(app, key), 429)["message"]


#: create-key's options and the /key/generate fields they set.
_LIMIT_OPTIONS = (("--budget-duration", "budget_duration"), ("--rpm-limit", "rpm_limit"),
                  ("--tpm-limit", "tpm_limit"),
                  ("--max-parallel-requests", "max_parallel_requests"))


@pytest.mark.parametrize("value", ["-1", "2147483648", "4611686018427387905", "soon", "0"])
def test_create_key_limits_are_checked_as_key_generate_checks_them(sqlite_app: Flask,
                                                                   value: str) -> None:
    """The same value is refused (with the same reason) or taken by both."""
    term = Terminal(sqlite_app)
    client = sqlite_app.test_client()
    for option, field in _LIMIT_OPTIONS:
        number = value.lstrip("-").isdigit() and field != "budget_duration"
        api = client.post("/key/generate", json={field: int(value) if number else value},
                          headers=bearer(MASTER_KEY))
        if field != "budget_duration" and not number:
            assert term("create-key", option, value, ok=False).exit_code == 2  # Click's
            assert_error(api, 400)  # usage error for a value that is not an integer
        elif api.status_code == 200:
            record_secret(api.get_json()["key"])
            record_secret(term("create-key", option, value).stdout.strip())
        else:
            reason = assert_error(api, 400)["message"].removeprefix(
                f"Invalid value for '{field}': ")
            assert term.fails("create-key", option, value) == f"{option}: {reason}"


def test_list_keys_never_prints_a_secret_and_pages_through_everything(app: Flask) -> None:
    term = Terminal(app)
    keys = [record_secret(term("create-key", "--user-id", f"u{i % 3}").stdout.strip())
            for i in range(103)]
    listed = term("list-keys").stdout.splitlines()
    assert len(listed) == 103
    for key in keys:
        assert key not in term.transcript[-1]
        assert any(f"sk-...{key[-4:]}" in line for line in listed)
    only_u1 = term("list-keys", "--user-id", "u1").stdout.splitlines()
    assert len(only_u1) == 34 and all("user=u1" in line for line in only_u1)
    key_id = listed[0].split()[0]
    term("revoke-key", key_id)
    deleted = term("list-keys", "--deleted").stdout.splitlines()
    assert len(deleted) == 1 and deleted[0].startswith(key_id)
    assert len(term("list-keys").stdout.splitlines()) == 102


def test_list_keys_prints_only_the_fields_a_key_has(sqlite_app: Flask) -> None:
    term = Terminal(sqlite_app)
    plain = record_secret(term("create-key", "--user-id", "bob").stdout.strip())
    full = record_secret(term("create-key", "--user-id", "carol", "--alias", "ci",
                              "--duration", "30d").stdout.strip())
    term("revoke-key", full)
    term("create-team", "t-cli")
    team = record_secret(term("create-key", "--team-id", "t-cli").stdout.strip())
    lines = {line.split()[1][-4:]: line for line in term("list-keys").stdout.splitlines()}
    assert "None" not in term.transcript[-1]
    plain_line = lines[plain[-4:]]
    assert plain_line.split("  ")[1:] == [f"sk-...{plain[-4:]}", "user=bob"], plain_line
    assert lines[team[-4:]].split("  ")[2:] == ["team=t-cli"]
    deleted = term("list-keys", "--deleted").stdout.splitlines()
    assert len(deleted) == 1
    assert deleted[0].split("  ")[2:4] == ["alias=ci", "user=carol"]
    assert deleted[0].split("  ")[4].startswith("expires=20")


def test_rotate_key_with_and_without_grace_period(app: Flask) -> None:
    term = Terminal(app)
    old = record_secret(term("create-key", "--user-id", "alice").stdout.strip())
    key_id = app.test_client().get("/key/info", headers=bearer(old)).get_json()["key"]
    result = term("rotate-key", key_id, "--grace-period", "1h")
    new = record_secret(result.stdout.strip())
    assert new.startswith("sk-") and new != old and result.stdout == new + "\n"
    assert "old secret works until" in result.stderr and old not in result.output
    assert chat(app, old).status_code == 200 and chat(app, new).status_code == 200
    result = term("rotate-key", key_id)
    newest = record_secret(result.stdout.strip())
    assert "old secret revoked" in result.stderr
    assert_error(chat(app, new), 401)
    assert chat(app, old).status_code == 200  # the first grace period still runs
    assert chat(app, newest).status_code == 200
    info = app.test_client().get("/key/info", headers=bearer(newest)).get_json()
    assert info["key"] == key_id and info["info"]["rotation_count"] == 2


def test_revoke_key_takes_effect_at_once(app: Flask) -> None:
    term = Terminal(app)
    keys = [record_secret(term("create-key").stdout.strip()) for _ in range(2)]
    ids = [app.test_client().get("/key/info", headers=bearer(k)).get_json()["key"] for k in keys]
    for key in keys:
        assert chat(app, key).status_code == 200  # cached
    result = term("revoke-key", *ids)
    assert result.stdout.splitlines() == [f"revoked {i}" for i in ids]
    for key in keys:
        assert_error(chat(app, key), 401)
    assert term.fails("revoke-key", ids[0]) == "Key not found."


def test_create_user_and_team(app: Flask) -> None:
    term = Terminal(app)
    user = json.loads(term("create-user", "bob", "--email", "bob@example.com", "--role",
                           "PROXY_ADMIN_VIEWER", "--models", "gpt-4o", "--max-budget",
                           "3").stdout)
    assert (user["user_id"], user["user_email"], user["user_role"], user["models"],
            user["max_budget"]) == ("bob", "bob@example.com", "proxy_admin_viewer",
                                    ["gpt-4o"], 3.0)
    assert "key" not in user or user["key"] is None  # no key is created for a CLI user
    term("create-user", "carol")
    term("create-user", "dan")
    team = json.loads(term("create-team", "research", "--alias", "Research", "--models",
                           "gpt-4o,claude-3-5-sonnet", "--admin", "carol",
                           "--member", "dan").stdout)
    assert (team["team_id"], team["team_alias"], team["models"]) == \
        ("research", "Research", ["gpt-4o", "claude-3-5-sonnet"])
    members = {m["user_id"]: m["role"] for m in team["members_with_roles"]}
    assert members == {"carol": "admin", "dan": "user"}
    # a plain member may have a team key made for it
    dans = record_secret(term("create-key", "--team-id", "research", "--user-id",
                              "dan").stdout.strip())
    assert chat(app, dans, "gpt-4o").status_code == 200
    key = record_secret(term("create-key", "--team-id", "research", "--user-id",
                             "carol").stdout.strip())
    assert chat(app, key, "claude-3-5-sonnet").status_code == 200
    assert_error(chat(app, key, "gpt-4o-mini"), 403)


@pytest.mark.parametrize("args,message", [
    (("create-key", "--duration", "soon"), "--duration: invalid duration 'soon'"),
    (("create-key", "--max-budget", "-5"), "--max-budget: must not be negative"),
    (("create-key", "--budget-duration", "soon"), "--budget-duration: invalid duration 'soon'"),
    (("create-key", "--rpm-limit", "-1"), "--rpm-limit: must be between 1 and"),
    (("create-key", "--tpm-limit", "-1"), "--tpm-limit: must be between 1 and"),
    (("create-key", "--max-parallel-requests", "2147483648"),
     "--max-parallel-requests: must be between 1 and 2147483647"),
    # The API's field rules: what /key/generate, /user/new and /team/new refuse.
    (("create-key", "--user-id", "a\tb"), "--user-id: must be printable text"),
    (("create-key", "--alias", "x" * 256), "--alias: must be 1 to 255 characters"),
    (("create-key", "--models", "gpt-4o,\x1b[31m"), "--models: must be printable text"),
    (("create-user", "a\nb"), "USER_ID: must be printable text"),
    (("create-user", "dave", "--email", "\x00"), "--email: must be printable text"),
    (("create-team", "t\tx"), "TEAM_ID: must be printable text"),
    (("create-team", "t2", "--admin", "c\rd"), "--admin: must be printable text"),
    (("create-team", "t2", "--member", "c\rd"), "--member: must be printable text"),
    (("create-team", "t2", "--max-budget", "-1"), "--max-budget: must not be negative"),
    (("create-key", "--team-id", "nope"), "Team not found: team_id=nope"),
    (("rotate-key", "00000000-0000-0000-0000-000000000000"), "Key not found."),
    (("rotate-key", "sk-not-a-real-key-0123456789abcdef"), "Key not found."),
    (("rotate-key", "x", "--grace-period", "a while"),
     "--grace-period: invalid duration 'a while'"),
    (("revoke-key", "missing"), "Key not found."),
    (("create-user", "dave", "--role", "superuser"), "--role: unknown role 'superuser'"),
    (("create-user", "dave", "--role", "team"), "--role: a user cannot have the role 'team'"),
])
def test_errors_are_clean(sqlite_app: Flask, args: tuple[str, ...], message: str) -> None:
    term = Terminal(sqlite_app)
    error = term.fails(*args)
    assert message in error, error
    assert "sk-not-a-real-key" not in error


@pytest.mark.parametrize("role", ["superuser", "team", "customer"])
def test_a_refused_role_lists_only_the_roles_a_user_may_have(sqlite_app: Flask,
                                                              role: str) -> None:
    error = Terminal(sqlite_app).fails("create-user", "dave", "--role", role)
    assert error.endswith("; expected one of proxy_admin, proxy_admin_viewer, org_admin, "
                          "internal_user, internal_user_viewer"), error
    assert "team," not in error and "customer" not in error.replace(f"'{role}'", "")


def test_duplicate_user_and_team_are_clean_errors(sqlite_app: Flask) -> None:
    term = Terminal(sqlite_app)
    term("create-user", "erin")
    assert "erin" in term.fails("create-user", "erin")
    term("create-team", "t1")
    assert "t1" in term.fails("create-team", "t1")


def test_usage_errors_exit_2_without_a_traceback(sqlite_app: Flask) -> None:
    result = Terminal(sqlite_app)("revoke-key", ok=False)
    assert result.exit_code == 2 and "Missing argument" in result.output
    result = Terminal(sqlite_app)("create-key", "--max-budget", "lots", ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_database_down_is_a_clean_error(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_AUTO_MIGRATE": False},
                      db_url="postgresql://postgres@127.0.0.1:9/nowhere")
    term = Terminal(app)
    for args in (("list-keys",), ("create-key",), ("init-db",), ("db", "status"),
                 ("revoke-key", "x")):
        assert term.fails(*args) == \
            "Service Unavailable, the database is temporarily unreachable."


def test_cli_group_name_is_configurable(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_CLI_NAME": "keys"})
    result = app.test_cli_runner().invoke(args=["keys", "show-config"])
    assert result.exit_code == 0 and json.loads(result.output)["LLMAUTH_CLI_NAME"] == "keys"
    result = app.test_cli_runner().invoke(args=["llmauth", "show-config"])
    assert result.exit_code == 2
