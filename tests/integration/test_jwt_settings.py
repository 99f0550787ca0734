"""The JWT hardening and caching settings, each through the real OpenID provider's tokens
(or tokens signed with its keys): leeway, algorithms, maximum lifetime, token size, required
claims, the verified-token cache, the HTTP timeout and the plain-http opt-in, the failed
fetch backoff, the userinfo cache, and the per-issuer fields of ``issuers``."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from flask_llmauth.authn.jwt import JWTAuthenticator
from flask_llmauth.errors import ConfigurationError
from tests.helpers import assert_error, bearer, record_secret
from tests.idp_fixture import ES256, RS256, IdP
from tests.integration.test_jwt import add_echo, call, new_team, ok

pytestmark = pytest.mark.integration


def signed(provider: IdP, claims: dict[str, Any], *, alg: str = "RS256") -> str:
    """A token signed with the provider's own key (``keep_keys`` providers only)."""
    assert provider.keys_file is not None
    kty = {"RS256": "RSA", "ES256": "EC"}[alg]
    jwk = next(k for k in json.loads(provider.keys_file.read_text())["keys"] if k["kty"] == kty)
    return record_secret(jwt.encode(claims, jwt.PyJWK(jwk).key, algorithm=alg,
                                    headers={"kid": jwk["kid"], "typ": "at+jwt"}))


def base_claims(provider: IdP, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": RS256, "sub": "svc-settings",
              "email": "s@corp.example", "iat": now - 5, "exp": now + 300, "jti": "j-1"}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


# -- verification knobs ---------------------------------------------------------------------------


def test_leeway_accepts_a_just_expired_token(make_app: Any, idp: IdP) -> None:
    token = idp.token(ttl=1, extra_claims={"email": "late@corp.example"})
    time.sleep(2.2)
    assert_error(call(make_app().test_client(), token), 401)  # default leeway 0
    assert ok(call(make_app(leeway=30).test_client(), token))["user_id"] == "late@corp.example"
    assert_error(call(make_app(leeway=1).test_client(), token), 401)


def test_leeway_applies_to_nbf(make_app: Any, idp_factory: Any) -> None:
    provider = idp_factory(keep_keys=True)
    early = signed(provider, base_claims(provider, nbf=int(time.time()) + 20))
    assert_error(call(make_app(provider).test_client(), early), 401)
    assert ok(call(make_app(provider, leeway=60).test_client(), early))


def test_algorithms_allow_list(make_app: Any, idp: IdP) -> None:
    rs = idp.token(resource=RS256, extra_claims={"email": "a@corp.example"})
    es = idp.token(resource=ES256, extra_claims={"email": "a@corp.example"})
    only_es = make_app(algorithms=["ES256"]).test_client()
    assert_error(call(only_es, rs), 401)
    assert ok(call(only_es, es))["user_id"] == "a@corp.example"
    only_rs = make_app(algorithms="RS256,PS256").test_client()
    assert ok(call(only_rs, rs)) and assert_error(call(only_rs, es), 401)
    with pytest.raises(ConfigurationError, match="LLMAUTH_JWT_ALGORITHMS"):
        make_app(algorithms=["HS256"])


def test_max_lifetime(make_app: Any, idp: IdP) -> None:
    long = idp.token(ttl=7200, extra_claims={"email": "a@corp.example"})
    short = idp.token(ttl=600, extra_claims={"email": "a@corp.example"})
    capped = make_app(max_lifetime=3600).test_client()
    assert_error(call(capped, long), 401)
    assert ok(call(capped, short))
    week = idp.token(ttl=7 * 86400, extra_claims={"email": "a@corp.example"})
    assert_error(call(make_app().test_client(), week), 401)  # default: one day
    assert ok(call(make_app(max_lifetime=0).test_client(), week))  # 0: no cap


def test_max_token_length(make_app: Any, idp: IdP) -> None:
    big = idp.token(extra_claims={"email": "a@corp.example", "pad": "p" * 1500})
    assert 1500 < len(big) < 8192
    assert ok(call(make_app().test_client(), big))
    assert_error(call(make_app(max_token_length=1024).test_client(), big), 401)
    small = idp.token(extra_claims={"email": "a@corp.example"})
    assert len(small) < 1024
    assert ok(call(make_app(max_token_length=1024).test_client(), small))


def test_required_claims(make_app: Any, idp: IdP, idp_factory: Any) -> None:
    token = idp.token(extra_claims={"email": "a@corp.example"})
    assert "jti" in jwt.decode(token, options={"verify_signature": False})
    assert ok(call(make_app(required_claims=["exp", "iat", "jti"]).test_client(), token))
    provider = idp_factory(keep_keys=True)
    no_jti = signed(provider, base_claims(provider, jti=None))
    no_iat = signed(provider, base_claims(provider, iat=None))
    strict = make_app(provider, required_claims=["exp", "iat", "jti"]).test_client()
    assert_error(call(strict, no_jti), 401)
    assert_error(call(strict, no_iat), 401)
    assert_error(call(make_app(provider).test_client(), no_iat), 401)  # default: exp, iat
    relaxed = make_app(provider, required_claims=["exp"]).test_client()
    assert ok(call(relaxed, no_iat)) and ok(call(relaxed, no_jti))
    no_exp = signed(provider, base_claims(provider, exp=None))
    assert_error(call(relaxed, no_exp), 401)  # exp is always required


# -- caching ---------------------------------------------------------------------------------------


def _count_verify(monkeypatch: Any) -> list[int]:
    calls: list[int] = []
    original = JWTAuthenticator.verify

    def counting(self: JWTAuthenticator, token: str) -> Any:
        calls.append(1)
        return original(self, token)

    monkeypatch.setattr(JWTAuthenticator, "verify", counting)
    return calls


def test_cache_ttl(make_app: Any, idp: IdP, monkeypatch: Any) -> None:
    calls = _count_verify(monkeypatch)
    token = idp.token(extra_claims={"email": "a@corp.example"})
    off = make_app(cache_ttl=0).test_client()
    for _ in range(3):
        assert ok(call(off, token))
    assert len(calls) == 3, "cache_ttl 0: every request verifies"
    calls.clear()
    short = make_app(cache_ttl=1).test_client()
    for _ in range(3):
        assert ok(call(short, token))
    assert len(calls) == 1
    time.sleep(1.2)
    assert ok(call(short, token))
    assert len(calls) == 2, "the entry ended after cache_ttl seconds"


def test_cached_token_ends_at_its_exp(make_app: Any, idp: IdP) -> None:
    client = make_app(cache_ttl=3600).test_client()
    # exp is a whole second (iat rounded down + ttl): at least 2 s left for the first call
    token = idp.token(ttl=3, extra_claims={"email": "a@corp.example"})
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert ok(call(client, token))
    time.sleep(max(0.0, exp + 0.2 - time.time()))
    assert_error(call(client, token), 401)  # never served from the cache past exp


def test_userinfo_cache_ttl(make_app: Any, idp_factory: Any) -> None:
    provider = idp_factory()
    client = make_app(provider, oidc_userinfo_enabled=True,
                      oidc_userinfo_endpoint=provider.userinfo_endpoint,
                      oidc_userinfo_cache_ttl=1).test_client()
    access = provider.code_flow("alice")["access_token"]
    assert ok(call(client, access))["user_id"] == "alice@example.com"
    provider.stop()
    assert ok(call(client, access))["user_id"] == "alice@example.com"  # cached
    time.sleep(1.2)
    assert_error(call(client, access), 503, "auth_provider_unavailable")


# -- fetching ------------------------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/jwks.json"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()


def test_http_timeout(make_app: Any, idp: IdP, silent_server: str) -> None:
    client = make_app(http_timeout=0.3, config={
        "LLMAUTH_JWT_PUBLIC_KEY_URL": silent_server}).test_client()
    token = idp.token(extra_claims={"email": "a@corp.example"})
    started = time.monotonic()
    assert_error(call(client, token), 503, "auth_provider_unavailable")
    assert time.monotonic() - started < 3.0, "0.3 s for the fetch (its retry included), not 5 s"


def test_fetch_failure_backoff(make_app: Any, idp_factory: Any) -> None:
    provider = idp_factory(keep_keys=True)
    token = provider.token(extra_claims={"email": "a@corp.example"})
    provider.stop()
    held = make_app(provider, fetch_failure_backoff=3600).test_client()
    retrying = make_app(provider, fetch_failure_backoff=0).test_client()
    assert_error(call(held, token), 503, "auth_provider_unavailable")
    assert_error(call(retrying, token), 503, "auth_provider_unavailable")
    provider.start()
    assert_error(call(held, token), 503, "auth_provider_unavailable")  # not retried yet
    assert ok(call(retrying, token))["user_id"] == "a@corp.example"


def test_allow_insecure_http(make_app: Any, idp: IdP) -> None:
    remote = "http://idp.llmauth.invalid/jwks.json"
    with pytest.raises(ConfigurationError, match="must use https"):
        make_app(config={"LLMAUTH_JWT_PUBLIC_KEY_URL": remote})
    with pytest.raises(ConfigurationError, match="must use https"):
        make_app(oidc_userinfo_enabled=True,
                 oidc_userinfo_endpoint="http://idp.llmauth.invalid/userinfo")
    client = make_app(allow_insecure_http=True,
                      config={"LLMAUTH_JWT_PUBLIC_KEY_URL": remote}).test_client()
    token = idp.token(extra_claims={"email": "a@corp.example"})
    assert_error(call(client, token), 503, "auth_provider_unavailable")  # fetched, not refused
    assert ok(call(make_app().test_client(), token))  # loopback http needs no opt-in


# -- issuers: the per-entry fields ---------------------------------------------------------------


def test_issuer_entry_fields(make_app: Any, idp_factory: Any) -> None:
    a, b = idp_factory(), idp_factory()
    issuers = [
        {"issuer": a.issuer, "jwks_url": a.jwks_uri, "audience": RS256,
         "user_id_jwt_field": "sub", "team_id_jwt_field": "org.team",
         "org_id_jwt_field": "org.id", "end_user_id_jwt_field": "act.sub",
         "user_id_prefix": "a:"},
        {"issuer": b.issuer, "audience": [ES256], "user_email_jwt_field": "mail"},
    ]
    app = make_app(a, config={"LLMAUTH_JWT_PUBLIC_KEY_URL": "", "LLMAUTH_JWT_AUDIENCE": ""},
                   issuers=issuers, team_ids_field="groups")
    client = app.test_client()
    new_team(client, "t-a", models=["gpt-4o"])
    new_team(client, "t-b", models=["gpt-4o"])
    body = ok(call(client, a.token(extra_claims={
        "org": {"team": "t-a", "id": "org-a"}, "act": {"sub": "cust-1"}})))
    assert (body["user_id"], body["team_id"], body["org_id"], body["end_user_id"]) == (
        "a:llmauth-svc", "t-a", "org-a", "cust-1")
    # B: its own email field; the fields it leaves out fall back to the global ones
    body = ok(call(client, b.token(resource=ES256, extra_claims={
        "mail": "m@corp.example", "groups": ["t-b"]})))
    assert body["user_id"] == f"{b.issuer}#m@corp.example"
    assert body["user_email"] == "m@corp.example" and body["team_id"] == "t-b"
    # each entry's audience: B's token for RS256 is refused, A's for ES256 too
    assert_error(call(client, b.token(resource=RS256, extra_claims={"mail": "m@x.example"})),
                 401)
    assert_error(call(client, a.token(resource=ES256)), 401)


def test_flat_enforce_rbac_and_admin_scope_from_yaml(app_factory: Any, idp: IdP,
                                                     tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "general_settings:\n"
        "  enable_jwt_auth: true\n"
        f"  jwt_public_key_url: {idp.jwks_uri}\n"
        f"  jwt_audience: {RS256}\n"
        f"  jwt_issuer: {idp.issuer}\n"
        "  enforce_rbac: true\n"
        "  litellm_jwtauth:\n"
        "    user_id_jwt_field: uid\n"
    )
    app = app_factory({"LLMAUTH_CONFIG_FILE": str(config)})
    add_echo(app)
    client = app.test_client()
    error = assert_error(call(client, idp.token()), 403)
    assert "Unmatched token passed in" in error["message"]
    assert ok(call(client, idp.token(extra_claims={"uid": "u-1"})))["user_id"] == "u-1"
    response = client.get("/key/list", headers=bearer(idp.token(scope="litellm_proxy_admin")))
    assert response.status_code == 200, response.get_json()
