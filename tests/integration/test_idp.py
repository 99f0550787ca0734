"""The test OpenID provider itself: the tokens other tests rely on are what they claim."""

from __future__ import annotations

import re

import jwt
import pytest
import requests

from tests.idp_fixture import ES256, OPAQUE, RS256, IdP

pytestmark = pytest.mark.integration


def _verify(idp: IdP, token: str, audience: str) -> dict:
    header = jwt.get_unverified_header(token)
    jwk = next(k for k in idp.jwks()["keys"] if k["kid"] == header["kid"])
    key = jwt.PyJWK(jwk)
    return jwt.decode(token, key, algorithms=[header["alg"]], audience=audience,
                      issuer=idp.issuer)


def test_discovery_names_loopback_issuer_and_endpoints(idp: IdP) -> None:
    doc = requests.get(idp.discovery_url, timeout=5).json()
    assert doc["issuer"] == idp.issuer
    assert doc["jwks_uri"] == idp.jwks_uri
    assert doc["userinfo_endpoint"] == idp.userinfo_endpoint
    assert doc["introspection_endpoint"] == idp.introspection_endpoint
    assert {k["kty"] for k in idp.jwks()["keys"]} == {"RSA", "EC", "OKP"}
    assert all("d" not in k for k in idp.jwks()["keys"]), "private parts must not be published"


@pytest.mark.parametrize(("resource", "alg"), [(RS256, "RS256"), (ES256, "ES256")])
def test_client_credentials_jwt_carries_custom_claims(idp: IdP, resource: str, alg: str) -> None:
    token = idp.token(resource=resource, scope="litellm.api read",
                      extra_claims={"groups": ["t1", "t2"], "org": {"id": "o1"}})
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg and header["typ"] == "at+jwt"
    claims = _verify(idp, token, resource)
    assert claims["sub"] == "llmauth-svc"
    assert claims["groups"] == ["t1", "t2"] and claims["org"] == {"id": "o1"}
    assert claims["scope"] == "litellm.api read"
    assert claims["exp"] - claims["iat"] == 600


def test_requested_ttl_and_unknown_scope_dropped(idp: IdP) -> None:
    claims = _verify(idp, idp.token(ttl=5), RS256)
    assert claims["exp"] - claims["iat"] == 5
    claims = _verify(idp, idp.token(scope="read not-a-scope"), RS256)
    assert claims["scope"] == "read"


def test_restart_rotates_signing_keys_and_stop_refuses_connections(idp_factory) -> None:
    provider = idp_factory()
    before = {k["kid"] for k in provider.jwks()["keys"]}
    old = provider.token()
    provider.restart()
    after = {k["kid"] for k in provider.jwks()["keys"]}
    assert before.isdisjoint(after)
    with pytest.raises(StopIteration):
        _verify(provider, old, RS256)
    provider.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(provider.discovery_url, timeout=2)


def test_keep_keys_survives_restart(idp_factory) -> None:
    provider = idp_factory(keep_keys=True)
    before = provider.jwks()
    provider.restart()
    assert provider.jwks() == before


def test_login_form_refuses_a_wrong_password_and_loads_nothing_external(idp: IdP) -> None:
    with pytest.raises(PermissionError):
        idp.code_flow("alice", "wrong-password")
    with pytest.raises(PermissionError):
        idp.code_flow("nobody", "whatever")
    page = requests.get(idp.url("/session/end"), timeout=5).text
    assert not re.search(r"https?://(?!127\.0\.0\.1)", page), page


def test_code_flow_token_works_at_userinfo_and_introspection(idp: IdP) -> None:
    tokens = idp.code_flow("alice")
    access = tokens["access_token"]
    assert access.count(".") == 0, "a token without resource is opaque"
    info = idp.userinfo(access)
    assert info.status_code == 200
    assert info.json()["sub"] == "alice-sub" and info.json()["email"] == "alice@example.com"
    assert idp.introspect(access)["active"] is True
    assert idp.userinfo(access + "x").status_code == 401


def test_opaque_resource_token_introspects_with_claims(idp: IdP) -> None:
    token = idp.token(resource=OPAQUE, scope="read", extra_claims={"role": "internal_user"})
    assert token.count(".") == 0
    result = idp.introspect(token)
    assert result["active"] is True and result["role"] == "internal_user"
    assert result["client_id"] == "llmauth-svc"
    assert idp.introspect("not-a-token")["active"] is False
