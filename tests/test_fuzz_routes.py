"""A seeded fuzz of every route: the rules of ``app.url_map`` (the management API, the test
routes, the example gateway's LLM routes), so a new route is fuzzed the day it is added.

Each rule gets requests from its own ``random.Random`` (seeded by the rule), as the master
key, a proxy admin's, viewer's, internal user's, team and customer key, a team admin's team
key, and without or with a broken credential: bodies with wrong types, huge, negative and
non-finite numbers, nesting, NUL and lone surrogates, duplicate keys and other raw JSON
tricks, odd content types; repeated and malformed query parameters; credential headers in
odd schemes and combinations; other methods. Each answer must be:

* below 500 (``TESTING`` propagates a view's exception: the test fails with its traceback);
* an error in the JSON envelope with ``code`` = the status (the extension's answers and the
  management API's routing errors; a host's own 404/405 page is the host's);
* free of tracebacks, digests and the credentials used;
* never a 2xx on a non-public rule without a valid credential, nor a management change by a
  viewer or customer key;
* when a refusal, without any change to the database (budget leases and the ``failure`` row
  the spend log keeps of an LLM request a view refused aside).

The run's logs and tables are searched for every key by the session's leak check.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from example_app import create_app
from flask_llmauth.api import BLUEPRINT_NAME
from flask_llmauth.spend import flush
from tests.conftest import AppFactory, migrated_sqlite_url
from tests.helpers import ADMIN, MASTER_KEY, record_secret, role_keys

REQUESTS_PER_RULE = 60
DIGEST = re.compile(r"\b[0-9a-f]{64}\b")
API_SOURCE = Path(__file__).resolve().parent.parent / "flask_llmauth" / "api"
#: Every field name the management API declares (new fields are fuzzed too).
API_FIELDS = sorted(set(re.findall(r'"([a-z_]+)": Field\(', "".join(
    path.read_text() for path in sorted(API_SOURCE.glob("*.py"))))))
LLM_FIELDS = ["model", "messages", "max_tokens", "stream", "stream_options", "prompt", "input",
              "user", "metadata", "tags", "temperature", "n", "customer_id"]
QUERY_NAMES = ["page", "size", "page_size", "limit", "start_date", "end_date", "user_id",
               "team_id", "key", "key_alias", "key_hash", "sort_by", "sort_order", "status",
               "return_full_object", "include_team_keys", "summarize", "api_key", "model",
               "request_id", "role", "user_ids", "x"]
STRINGS = ["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "日本語", "🙂", "\n",
           "null", "NaN", "-1", "0", "1e999", "true", "' OR 1=1 --", "../../etc/passwd",
           "%00", "x" * 256, "y" * 70_000, "-1d", "30d", "1mo", "99999999d", "2024-13-45",
           "2024-01-01", "9999-12-31T23:59:59", "proxy_admin", "admin", "gpt-4o", "*",
           "u-internal_user", "t-team", "t-fuzz", "c-fuzz", "10.0.0.0/8", "999.1.1.1",
           "1" * 5000, " 5", "+5", "٣", "00000000-0000-0000-0000-000000000000"]
NUMBERS = [0, -1, 1, -0.0, 0.5, -1.5, 2**31, 2**53 + 1, 2**62, 2**63, 2**64, -2**63, 10**30,
           1e308, -1e308, 5e-324]
RAW_BODIES = [
    b"", b" ", b"null", b"[]", b"0", b'"s"', b"[{}]", b'{"key_alias": "a", "key_alias": 1}',
    b'{"max_budget": NaN}', b'{"max_budget": Infinity}', b'{"spend": -Infinity}',
    b'{"max_budget": 1e400}', b'{"tpm_limit": ' + b"9" * 4400 + b"}",
    b'{"metadata": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", b"[" * 20_000,
    b"\xef\xbb\xbf{}", b'{"key_alias": "\xff"}', b'{"key_alias": "\\ud800"}',
    b'{"models": ["\\udfff"]}', b'{"user_id": "\\u0000"}', "{}".encode("utf-16"),
    b'{"model": "gpt-4o", "model": "claude-3-5-sonnet", "messages": [{"content": "x"}]}',
    b'{"model": ["gpt-4o"], "messages": [1]}', b'{"model": {"a": 1}}', b'{"model": null}',
    b'{"model": "gpt-4o\\u0000", "messages": [{"content": "x"}]}',
    b'{"model": "gpt-4o\\ud800", "input": "x", "messages": [{"content": "\\udc00"}]}',
]
CONTENT_TYPES = ["application/json"] * 6 + [
    "application/json; charset=utf-16", "application/json; charset=latin-1", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "", None,
    "application/vnd.api+json", "APPLICATION/JSON", "application/json, text/x"]
PRINCIPALS = ["master", "proxy_admin", "proxy_admin_viewer", "org_admin", "internal_user",
              "internal_user_viewer", "team", "customer", "team_admin", "none"]
READ_ONLY = ("proxy_admin_viewer", "internal_user_viewer", "customer")
#: Self-service fields any user may change on its own row.
SELF_SERVICE = {"/user/update"}
IGNORED_COLUMNS = {"reserved", "last_used_at"}
IGNORED_TABLES = {"llmauth_budget_reservation", "llmauth_invalidation", "llmauth_cache_event"}


class World:
    """An app with a key per role, a team, a customer, and the database to compare."""

    def __init__(self, app: Flask, database: str) -> None:
        self.app = app
        self.client = app.test_client()
        self.database = database
        self.keys = role_keys(self.client, app)
        team = self.client.post("/team/new", headers=ADMIN, json={
            "team_id": "t-fuzz", "members_with_roles": [{"user_id": "u-internal_user",
                                                         "role": "admin"}]})
        assert team.status_code == 200, team.get_json()
        self.keys["team_admin"] = self._key(user_id="u-internal_user", team_id="t-fuzz",
                                            max_budget=5, max_parallel_requests=2)
        self.keys["master"] = MASTER_KEY
        customer = self.client.post("/customer/new", json={"user_id": "c-fuzz"}, headers=ADMIN)
        assert customer.status_code == 200, customer.get_json()
        listed = self.client.get("/key/list?size=100", headers=ADMIN).get_json()
        self.key_ids: list[str] = listed["keys"]
        self.state = app.extensions["llmauth"]
        self._snapshot: list[tuple[str, list[str]]] | None = None

    def _key(self, **fields: Any) -> str:
        response = self.client.post("/key/generate", json=fields, headers=ADMIN)
        assert response.status_code == 200, response.get_json()
        return record_secret(response.get_json()["key"])

    def snapshot(self) -> list[tuple[str, list[str]]]:
        """Every row the API could change (queued spend written first); kept until a
        request that may change something (anything but a refusal) was answered."""
        if self._snapshot is None:
            flush(self.app)
            with sqlite3.connect(self.database) as db:
                tables = [name for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
                out = []
                for table in tables:
                    if table in IGNORED_TABLES:
                        continue
                    cursor = db.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - test dump
                    keep = [i for i, column in enumerate(cursor.description)
                            if column[0] not in IGNORED_COLUMNS]
                    rows = [repr(tuple(row[i] for i in keep)) for row in cursor.fetchall()]
                    out.append((table, sorted(rows)))
            self._snapshot = out
        return self._snapshot

    def changed(self) -> None:
        """The database may have changed: the next :meth:`snapshot` reads it again."""
        self._snapshot = None

    def is_public(self, rule: Any) -> bool:
        return bool(self.state.routes.info(rule, self.app.view_functions[rule.endpoint]).public)


class Fuzzer:
    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng

    def string(self) -> str:
        rng = self.rng
        if rng.random() < 0.7:
            return rng.choice(STRINGS + self.world.key_ids[:3])
        return "".join(chr(rng.choice((rng.randint(32, 126), rng.randint(0, 0x2FFF),
                                       rng.randint(0xD800, 0xDFFF))))
                       for _ in range(rng.choice((1, 8, 300))))

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        pick = rng.random()
        if pick < 0.12:
            return None
        if pick < 0.22:
            return rng.choice((True, False))
        if pick < 0.45:
            return rng.choice(NUMBERS)
        if pick < 0.7 or depth > 2:
            return self.string()
        if pick < 0.85:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {self.string(): self.value(depth + 1) for _ in range(rng.randint(0, 3))}

    def plausible(self, name: str) -> Any:
        """A value of the right kind for a field the endpoint required."""
        world, rng = self.world, self.rng
        if "team" in name:
            one: Any = rng.choice(["t-fuzz", "t-team", "t-none"])
        elif "key" in name:
            one = rng.choice(world.key_ids)
        elif name == "member":
            return {"user_id": rng.choice(["u-org_admin", "u-internal_user_viewer"])}
        elif name in ("reset_to",):
            return rng.choice((0, 0.5))
        else:
            one = rng.choice(["u-internal_user", "u-org_admin", "c-fuzz", "nobody"])
        return [one] if name.endswith("s") else one

    def body(self, rule: str, llm: bool, required: dict[str, Any]) -> tuple[bytes, str | None]:
        rng = self.rng
        if rng.random() < 0.25:
            return rng.choice(RAW_BODIES), rng.choice(CONTENT_TYPES)
        body: dict[str, Any] = dict(required)
        if llm:
            body.update(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                        input="hi")
        names = LLM_FIELDS if llm else API_FIELDS
        for _ in range(rng.randint(0, 3)):
            body[rng.choice(names) if rng.random() < 0.9 else self.string()] = self.value()
        text = json.dumps(body)  # NaN/Infinity become JSON's NaN/Infinity literals
        content_type = "application/json" if rng.random() < 0.8 else rng.choice(CONTENT_TYPES)
        return text.encode("utf-8", "surrogatepass"), content_type

    def path(self, rule: str) -> tuple[str, bool]:
        """``rule`` with each variable part filled in (a key id or something odd), and
        sometimes a path trick; whether it was tricked."""
        rng = self.rng
        path = re.sub(r"<[^>]+>", lambda _: rng.choice(
            [rng.choice(self.world.key_ids), "%00", "a" * 300, "%ED%A0%80", "x:y"]), rule)
        if rng.random() < 0.9:
            return path, False
        inner = path[1:]
        tricked = rng.choice([path + "/", path.upper(), "/" + inner.replace("/", "%2F", 1),
                              path + "/..", path + "/./x/..", path + "%00", path + ";x=1",
                              path + "%20", "/x/.." + path, "/" + inner.replace("/", "\\", 1),
                              "/" + inner.replace("/", "//", 1)])
        return "/" + tricked.lstrip("/"), True  # "//x" would be a host to the test client

    def query(self) -> list[tuple[str, str]]:
        rng = self.rng
        pairs = []
        for _ in range(rng.randint(0, 3)):
            name = rng.choice(QUERY_NAMES)
            value = rng.choice([self.string(), "0", "-1", "101", "1.5", "nan", "2024-02-30",
                                "2024-01-01T00:00:00+25:00", "yes", "deleted", "spend"])
            pairs.append((name, value.encode("utf-8", "surrogatepass").decode("utf-8",
                                                                              "replace")))
            if rng.random() < 0.15:
                pairs.append((name, "again"))
        return pairs

    def headers(self, who: str) -> list[tuple[str, str]]:
        rng = self.rng
        if who == "none":
            return rng.choice([[], [("Authorization", "Bearer")], [("Authorization", "Basic eA==")],
                               [("x-api-key", " ")], [("Authorization", "Bearer " + "A" * 9000)],
                               [("Authorization", "Bearer sk-é-0123456789abcdefghijkl")],
                               [("Authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")],
                               [("x-api-key", "sk-guess-0123456789abcdefghijklmn")]])
        key = self.world.keys[who]
        if rng.random() < 0.7:
            return [("Authorization", f"Bearer {key}")]
        return rng.choice([
            [("x-api-key", key)], [("x-litellm-api-key", key)], [("api-key", key)],
            [("Authorization", f"bearer {key}")], [("Authorization", f"Bearer  {key} ")],
            [("Authorization", key)], [("Authorization", f"Basic {key}")],
            [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {MASTER_KEY}")],
            [("Authorization", "Bearer sk-nope-0123456789abcdefghijklmn"), ("x-api-key", key)],
            [("Authorization", f"Bearer {key}"), ("x-api-key", MASTER_KEY)],
            [("x-litellm-api-key", "garbage"), ("Authorization", f"Bearer {MASTER_KEY}")],
        ])


def presented_token(headers: list[tuple[str, str]]) -> str | None:
    """The credential the extension reads, in LiteLLM's header order (duplicates joined)."""
    joined: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        joined[name] = f"{joined[name]}, {value}" if name in joined else value

    def bearer_token(value: str) -> str | None:
        scheme, _, rest = value.strip().partition(" ")
        return rest.strip() or None if scheme.lower() == "bearer" else None

    if joined.get("x-litellm-api-key"):
        value = joined["x-litellm-api-key"]
        return bearer_token(value) or value.strip()
    token = bearer_token(joined.get("authorization", ""))
    if token:
        return token
    for name in ("api-key", "x-api-key", "x-goog-api-key"):
        if joined.get(name, "").strip():
            return joined[name].strip()
    return None


def only_failure_rows(before: list[Any], after: list[Any]) -> bool:
    """The only change: spend-log rows of refused LLM requests (status failure, no cost)."""
    for (table, rows), (_, rows_after) in zip(before, after, strict=True):
        if rows == rows_after:
            continue
        added = set(rows_after) - set(rows)
        if (table != "llmauth_spend_log" or set(rows) - set(rows_after)
                or not all(row.endswith(", 0, 0, 0, 0, 'failure')") for row in added)):
            return False
    return True


def check(world: World, rule: Any, method: str, who: str, headers: list[tuple[str, str]],
          sent: bytes, response: Any, before: list[Any], tricked: bool) -> None:
    status, text = response.status_code, response.get_data(as_text=True)
    where = (rule.rule, method, who, headers[:1], sent[:200], status, text[:300])
    assert status < 500, where
    assert "Traceback" not in text, where
    for secret in (MASTER_KEY, *world.keys.values()):
        assert secret not in text, where
    echoed = sent.decode("utf-8", "replace")
    assert all(m.group(0) in echoed for m in DIGEST.finditer(text)), where
    api = rule.endpoint.startswith(BLUEPRINT_NAME + ".") and not tricked
    if status >= 400 and method != "HEAD" and (api or status not in (404, 405)):
        error = response.get_json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert error["code"] == str(status), where
    if 200 <= status < 300 and method != "OPTIONS":
        token = presented_token(headers)
        assert world.is_public(rule) or token in world.keys.values(), where
        if api and method == "POST" and token is not None and rule.rule not in SELF_SERVICE:
            assert token not in (world.keys[role] for role in READ_ONLY), where
    world.changed()
    if status >= 400:
        after = world.snapshot()
        assert after == before or only_failure_rows(before, after), where


def fuzz_rules(world: World, api: bool = True) -> dict[str, set[int]]:
    """Fuzz every rule (the management API's too, with ``api``); the statuses each
    answered."""
    statuses: dict[str, set[int]] = {}
    rules = sorted((r for r in world.app.url_map.iter_rules() if r.endpoint != "static"
                    and (api or not r.endpoint.startswith(BLUEPRINT_NAME + "."))),
                   key=lambda r: (r.rule, r.endpoint))
    for rule in rules:
        rng = random.Random(zlib.crc32(rule.rule.encode()))
        fuzzer = Fuzzer(world, rng)
        required: dict[str, Any] = {}
        api = rule.endpoint.startswith(BLUEPRINT_NAME + ".")
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        for _ in range(REQUESTS_PER_RULE):
            method = rng.choice(methods) if rng.random() < 0.9 else rng.choice(
                ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
            path, tricked = fuzzer.path(rule.rule)
            who = rng.choice(PRINCIPALS) if rng.random() < 0.6 else "master"
            headers = fuzzer.headers(who)
            sent, content_type = b"", None
            if method in ("POST", "PUT", "PATCH"):
                sent, content_type = fuzzer.body(rule.rule, not api, required)
            if content_type is not None:
                headers.append(("Content-Type", content_type))
            before = world.snapshot()
            response = world.client.open(path, method=method, headers=headers, data=sent,
                                         query_string=fuzzer.query() or None)
            check(world, rule, method, who, headers, sent, response, before, tricked)
            statuses.setdefault(rule.rule, set()).add(response.status_code)
            if response.status_code == 400 and method != "HEAD" and not tricked:
                error = response.get_json()["error"]
                if error["message"].startswith("Missing required field") and error["param"]:
                    required[error["param"]] = fuzzer.plausible(error["param"])
    return statuses


@pytest.fixture
def extension_world(app_factory: AppFactory, tmp_path: Path) -> World:
    url = migrated_sqlite_url(tmp_path)
    app = app_factory(config={"LLMAUTH_AUTH_FAILURE_LIMIT": ""}, db_url=url)
    return World(app, url[len("sqlite:///"):])


@pytest.fixture
def gateway_world(tmp_path: Path) -> Iterator[World]:
    url = migrated_sqlite_url(tmp_path)
    app = create_app({"TESTING": True, "LLMAUTH_MASTER_KEY": MASTER_KEY,
                      "LLMAUTH_DATABASE_URL": url, "LLMAUTH_AUTH_FAILURE_LIMIT": ""})
    yield World(app, url[len("sqlite:///"):])
    app.extensions["llmauth"].close()


def test_every_rule_of_the_extension_and_the_test_routes(extension_world: World) -> None:
    statuses = fuzz_rules(extension_world)
    rules = {r.rule for r in extension_world.app.url_map.iter_rules() if r.endpoint != "static"}
    assert set(statuses) == rules
    # The fuzz gets past authentication to validation and to answers on every API rule.
    api = {r.rule for r in extension_world.app.url_map.iter_rules()
           if r.endpoint.startswith(BLUEPRINT_NAME + ".")}
    for rule in api:
        assert {400, 401} <= statuses[rule], (rule, statuses[rule])
    assert sum(1 for rule in api if 200 in statuses[rule]) >= len(api) * 2 // 3


def test_every_rule_of_the_example_gateway(gateway_world: World) -> None:
    statuses = fuzz_rules(gateway_world, api=False)  # the API's rules: the test above
    for rule in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages"):
        assert {200, 400} <= statuses[rule], (rule, statuses[rule])


def test_the_token_the_fuzz_expects_follows_the_documented_header_order() -> None:
    assert presented_token([("x-api-key", "a"), ("Authorization", "Bearer b")]) == "b"
    assert presented_token([("Authorization", "Basic x"), ("x-api-key", "a")]) == "a"
    assert presented_token([("x-litellm-api-key", "c"), ("Authorization", "Bearer b")]) == "c"
    assert presented_token([("Authorization", "Bearer a"), ("Authorization", "Bearer b")]) == \
        "a, Bearer b"
    assert presented_token([]) is None
