"""The authenticator chain fails closed: nothing an authenticator does wrong yields an
anonymous (or any) principal, and ``LLMAUTH_AUTH_ORDER`` decides who answers first."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask, g

from flask_llmauth import Principal, Role, signals
from flask_llmauth.authn.base import AuthContext, Chain
from flask_llmauth.errors import Forbidden, LLMAuthError, TooManyRequests
from flask_llmauth.extension import AUTHENTICATOR_FACTORIES
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key, record_secret

CHAT = "/v1/chat/completions"
HOOK_SECRET = record_secret("sk-hook-" + "Vb6Nm1Qw8Er3Ty5Ui0Op2As7Df4Gh9Jk")


class Scripted:
    """A test-only authenticator that does whatever ``behaviour`` says."""

    def __init__(self, name: str, behaviour: Any) -> None:
        self.name = name
        self.behaviour = behaviour
        self.calls = 0

    def authenticate(self, ctx: AuthContext) -> Any:
        self.calls += 1
        return self.behaviour(ctx)


def raise_(exc: BaseException) -> Any:
    def behaviour(ctx: AuthContext) -> Any:
        raise exc
    return behaviour


@pytest.fixture
def app(app_factory: Any) -> Flask:
    return app_factory()


@pytest.fixture
def seen(app: Flask) -> dict[str, list[Any]]:
    """What reached the view, and what the signals said."""
    out: dict[str, list[Any]] = {"views": [], "succeeded": [], "failed": [], "principals": []}

    @app.after_request
    def record(response: Any) -> Any:
        out["principals"].append(g.get("_llmauth_principal"))
        return response

    def on_success(sender: Any, **data: Any) -> None:
        out["succeeded"].append(data)

    def on_failure(sender: Any, **data: Any) -> None:
        out["failed"].append(data)

    signals.auth_succeeded.connect(on_success, app)
    signals.auth_failed.connect(on_failure, app)
    yield out
    signals.auth_succeeded.disconnect(on_success, app)
    signals.auth_failed.disconnect(on_failure, app)


def install(app: Flask, first: Scripted) -> None:
    """Put ``first`` ahead of the app's real authenticators (master key, virtual key)."""
    state = app.extensions["llmauth"]
    state.chain = Chain([first, *state.chain.authenticators])


BROKEN = [
    ("raises RuntimeError", raise_(RuntimeError(f"backend said {HOOK_SECRET}"))),
    ("raises KeyError", raise_(KeyError("sub"))),
    ("raises RecursionError", raise_(RecursionError())),
    ("returns a string", lambda ctx: "proxy_admin"),
    ("returns a dict", lambda ctx: {"user_id": "mallory", "role": "proxy_admin"}),
    ("returns True", lambda ctx: True),
    ("returns a principal with no identity",
     lambda ctx: Principal(method="scripted", role=Role.PROXY_ADMIN)),
    ("returns a principal with a blank identity",
     lambda ctx: Principal(method="scripted", role=Role.PROXY_ADMIN, user_id="")),
    ("returns a principal whose role is a string",
     lambda ctx: Principal(method="scripted", role="proxy_admin", user_id="mallory")),
    ("returns a principal with no method",
     lambda ctx: Principal(method="", role=Role.INTERNAL_USER, user_id="mallory")),
    ("raises an auth error with a 200 status",
     raise_(LLMAuthError("fine", status=200))),
    ("raises an auth error with a 302 status",
     raise_(LLMAuthError("go", status=302, headers={"Location": "/"}))),
]


@pytest.mark.parametrize("what,behaviour", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_authenticator_is_a_401_and_never_falls_through(
        app: Flask, seen: dict[str, list[Any]], caplog: pytest.LogCaptureFixture, what: str,
        behaviour: Any) -> None:
    scripted = Scripted("scripted", behaviour)
    install(app, scripted)
    client = app.test_client()
    # Even the master key, which the next authenticator would accept, does not get through.
    with caplog.at_level(logging.DEBUG):
        for headers in (ADMIN, {}, bearer("sk-whatever-0123456789abcdef")):
            response = client.post(CHAT, json={"model": "gpt-4o"}, headers=headers)
            error = assert_error(response, 401, "auth_error")
            assert error["message"] == "Authentication Error, invalid API key."
    assert scripted.calls == 3
    assert seen["succeeded"] == [] and seen["principals"] == [None, None, None]
    assert [f["status"] for f in seen["failed"]] == [401, 401, 401]
    assert HOOK_SECRET not in caplog.text and MASTER_KEY not in caplog.text


def test_an_authenticator_may_refuse_with_its_own_error(app: Flask,
                                                        seen: dict[str, list[Any]]) -> None:
    install(app, Scripted("scripted", raise_(Forbidden("Not during maintenance."))))
    error = assert_error(app.test_client().post(CHAT, json={}, headers=ADMIN), 403)
    assert error["message"] == "Not during maintenance."
    install(app, Scripted("later", raise_(TooManyRequests(headers={"Retry-After": "7"}))))
    response = app.test_client().post(CHAT, json={}, headers=ADMIN)
    assert_error(response, 429)
    assert response.headers["Retry-After"] == "7"
    assert seen["principals"] == [None, None]


def test_not_mine_lets_the_next_authenticator_decide(app: Flask,
                                                     seen: dict[str, list[Any]]) -> None:
    scripted = Scripted("scripted", lambda ctx: None)
    install(app, scripted)
    client = app.test_client()
    response = client.post(CHAT, json={}, headers=ADMIN)
    assert response.status_code == 200
    assert response.get_json()["principal"]["method"] == "master_key"
    error = assert_error(client.post(CHAT, json={}), 401)
    assert error["message"] == "Authentication Error, No api key passed in."
    assert scripted.calls == 2
    principal = seen["succeeded"][0]["principal"]
    assert principal.role is Role.PROXY_ADMIN and principal.user_id == "default_user_id"


def test_a_valid_principal_from_an_authenticator_is_authorized_like_any_other(
        app: Flask, seen: dict[str, list[Any]]) -> None:
    viewer = Principal(method="scripted", role=Role.INTERNAL_USER_VIEWER, user_id="vera")
    install(app, Scripted("scripted", lambda ctx: viewer))
    client = app.test_client()
    response = client.post(CHAT, json={"model": "gpt-4o"})
    assert response.get_json()["principal"]["user_id"] == "vera"
    assert_error(client.post("/key/generate", json={}), 403)
    assert seen["principals"][0] is viewer and seen["principals"][1] is None


# -- LLMAUTH_AUTH_ORDER ----------------------------------------------------------------------------


@pytest.fixture
def two_methods(monkeypatch: pytest.MonkeyPatch) -> dict[str, Scripted]:
    """Register two test-only authenticators by name, as another method would plug in."""
    made: dict[str, Scripted] = {}

    def factory(name: str) -> Any:
        def build(state: Any, ext: Any) -> Scripted:
            made[name] = Scripted(name, lambda ctx: Principal(
                method=name, role=Role.INTERNAL_USER, user_id=f"user-of-{name}"))
            return made[name]
        return build

    monkeypatch.setitem(AUTHENTICATOR_FACTORIES, "alpha", factory("alpha"))
    monkeypatch.setitem(AUTHENTICATOR_FACTORIES, "beta", factory("beta"))
    return made


@pytest.mark.parametrize("order,winner", [
    ("alpha,beta,master_key,virtual_key", "alpha"),
    ("beta,alpha,master_key,virtual_key", "beta"),
    ("master_key,alpha,beta,virtual_key", "master_key"),
])
def test_auth_order_decides_who_answers_first(app_factory: Any, two_methods: Any, order: str,
                                               winner: str) -> None:
    app = app_factory({"LLMAUTH_AUTH_ORDER": order})
    state = app.extensions["llmauth"]
    assert [a.name for a in state.chain.authenticators] == order.split(",")
    response = app.test_client().post(CHAT, json={}, headers=ADMIN)
    assert response.status_code == 200
    assert response.get_json()["principal"]["method"] == winner
    if winner != "master_key":
        loser = "beta" if winner == "alpha" else "alpha"
        assert two_methods[winner].calls == 1 and two_methods[loser].calls == 0


def test_a_method_left_out_of_the_order_is_off(app_factory: Any, tmp_path: Any) -> None:
    app = app_factory({"LLMAUTH_AUTH_ORDER": ["virtual_key"]})
    client = app.test_client()
    assert [a.name for a in app.extensions["llmauth"].chain.authenticators] == ["virtual_key"]
    assert_error(client.get("/key/list", headers=ADMIN), 401)  # the master key is not read

    other = app_factory({"LLMAUTH_AUTH_ORDER": "master_key",
                         "LLMAUTH_DATABASE_URL": f"sqlite:///{tmp_path}/other.db"})
    other_client = other.test_client()
    key = new_key(other_client)["key"]
    assert_error(other_client.post(CHAT, json={}, headers=bearer(key)), 401)
    assert other_client.post(CHAT, json={}, headers=ADMIN).status_code == 200


def test_unknown_or_repeated_names_fail_at_init_app(app_factory: Any) -> None:
    from flask_llmauth.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="unknown authenticator.*kerberos"):
        app_factory({"LLMAUTH_AUTH_ORDER": "kerberos,master_key"})
    with pytest.raises(ConfigurationError, match="names master_key more than once"):
        app_factory({"LLMAUTH_AUTH_ORDER": ["master_key", "virtual_key", "master_key"]})
    with pytest.raises(ConfigurationError, match="at least one authenticator"):
        app_factory({"LLMAUTH_AUTH_ORDER": ""})


def test_hooks_registered_after_the_first_request_join_the_chain(app_factory: Any) -> None:
    """An idle custom-auth step is skipped per request; registering its hook (or the key
    validation hook) later, even after requests were served, puts it back at once."""
    app = app_factory(custom_auth_mode="auto")
    client = app.test_client()
    key = new_key(client)["key"]
    state = app.extensions["llmauth"]
    assert [a.name for a, _ in state.chain._steps] == ["master_key", "virtual_key"]
    assert client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key)).status_code == 200
    hook_token = "opaque-" + "Zq4" * 12

    @app.llmauth.custom_auth
    def custom(request: Any, api_key: str) -> Any:
        return {"user_id": "hooked", "user_role": "internal_user"} if api_key == hook_token \
            else None

    assert [a.name for a, _ in state.chain._steps][0] == "custom"
    response = client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(hook_token))
    assert response.status_code == 200, response.get_json()
    assert client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key)).status_code == 200

    @app.llmauth.custom_key_validate
    def refuse_keys(request: Any, principal: Any) -> bool:
        return False

    assert_error(client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key)), 403)
    del app.llmauth.callbacks["custom_key_validate"]
    assert client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key)).status_code == 200


# -- the master key's whole-header compare answers what the chain would ----------------------


def test_master_key_header_yields_to_a_header_read_before_it(app: Flask) -> None:
    """``Authorization: Bearer <master key>`` is compared whole before the credential is
    parsed; ``x-litellm-api-key`` is read first, so it still decides."""
    client = app.test_client()
    key = new_key(client, user_id="vera")["key"]
    both = {**ADMIN, "x-litellm-api-key": key}
    response = client.post(CHAT, json={}, headers=both)
    assert response.status_code == 200
    assert response.get_json()["principal"]["user_id"] == "vera"
    assert_error(client.post(CHAT, json={}, headers={**ADMIN, "x-litellm-api-key": "sk-nope"}),
                 401)
    assert client.post(CHAT, json={}, headers=ADMIN).get_json()["principal"]["method"] == (
        "master_key")


@pytest.mark.parametrize("value", [f"bearer {MASTER_KEY}", f"Bearer  {MASTER_KEY}",
                                   f"Bearer {MASTER_KEY} ", f"Bearer {MASTER_KEY}x",
                                   f"Bearer {MASTER_KEY[:-1]}", f"Bearer {MASTER_KEY}\u00e9"])
def test_near_misses_of_the_master_key_header_take_the_general_path(app: Flask,
                                                                     value: str) -> None:
    response = app.test_client().post(CHAT, json={}, headers={"Authorization": value})
    if value.split() == ["bearer", MASTER_KEY] or value.split() == ["Bearer", MASTER_KEY]:
        # The general reader takes any case and spacing: still the master key.
        assert response.get_json()["principal"]["method"] == "master_key"
    else:
        assert_error(response, 401)


def test_a_method_registered_later_ahead_of_the_master_key_is_asked_first(
        app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_AUTH_ORDER": "custom,master_key,virtual_key"})
    client = app.test_client()
    assert client.post(CHAT, json={}, headers=ADMIN).get_json()["principal"]["method"] == (
        "master_key")
    seen: list[str] = []

    @app.llmauth.custom_auth  # type: ignore[attr-defined]
    def hook(request: Any, api_key: str) -> Any:
        seen.append(api_key)
        return {"user_id": "hooked"}

    principal = client.post(CHAT, json={}, headers=ADMIN).get_json()["principal"]
    assert principal["method"] == "custom" and principal["user_id"] == "hooked"
    assert seen == [MASTER_KEY]


def test_a_custom_key_header_turns_the_master_authorization_off(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_KEY_HEADER_NAME": "X-Gateway-Key"})
    client = app.test_client()
    assert_error(client.post(CHAT, json={}, headers=ADMIN), 401)
    response = client.post(CHAT, json={}, headers={"X-Gateway-Key": MASTER_KEY})
    assert response.get_json()["principal"]["method"] == "master_key"


def test_the_rate_limiters_hooks_leave_no_empty_registry(app: Flask) -> None:
    """Flask-Limiter's hooks run from the extension's; Flask walks an app-level registry
    per request even when it is empty, so none is left behind — and a hook the host adds
    later still runs."""
    for registry in (app.before_request_funcs, app.after_request_funcs,
                     app.teardown_request_funcs):
        assert all(hooks for hooks in registry.values()), registry
    ran: list[int] = []

    @app.after_request
    def later(response: Any) -> Any:
        ran.append(response.status_code)
        return response

    assert app.test_client().post(CHAT, json={}, headers=ADMIN).status_code == 200
    assert ran == [200]
