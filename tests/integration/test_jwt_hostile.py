"""Hostile JWTs: every check of the verification recipe, against the real provider's JWKS.

The provider runs with its keys kept in a file, so the tests hold its private keys (RSA for
RS256/PS256, P-256 for ES256, Ed25519 for EdDSA) and can mint tokens that are correctly
signed but wrong in exactly one way. A baseline token built the same way is accepted, so
each refusal is caused by the one defect. Every refusal is the same 401 body; the reason is
logged, the token never is (the session's leak check searches the whole log for them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from flask import Flask
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, RSAPSSAlgorithm

from tests.helpers import assert_error, bearer, record_secret, serve_in_thread
from tests.idp_fixture import RS256, IdP

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(part: dict[str, Any] | str | bytes) -> str:
    if isinstance(part, dict):
        part = json.dumps(part, separators=(",", ":"))
    if isinstance(part, str):
        part = part.encode()
    return b64(part)


_SIGNERS: dict[str, Callable[[bytes, Any], bytes]] = {
    "RS256": lambda m, k: RSAAlgorithm(RSAAlgorithm.SHA256).sign(m, k),
    "RS512": lambda m, k: RSAAlgorithm(RSAAlgorithm.SHA512).sign(m, k),
    "PS256": lambda m, k: RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256).sign(m, k),
    "ES256": lambda m, k: ECAlgorithm(ECAlgorithm.SHA256).sign(m, k),
    "EdDSA": lambda m, k: OKPAlgorithm().sign(m, k),
    "HS256": lambda m, k: hmac.new(k, m, hashlib.sha256).digest(),
}


def compact(header: dict[str, Any] | str, payload: dict[str, Any] | str, key: Any,
            alg: str | None = None) -> str:
    """A compact JWS over exactly these header and payload texts."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    if alg is None:
        alg = header["alg"] if isinstance(header, dict) else "RS256"
    signature = _SIGNERS[alg](signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


class Keys:
    """The provider's private keys (from its keys file) and an attacker's."""

    def __init__(self, idp: IdP) -> None:
        assert idp.keys_file is not None
        jwks = json.loads(idp.keys_file.read_text())["keys"]
        self.jwk = {k["kty"]: k for k in jwks}
        self.rsa = jwt.PyJWK(self.jwk["RSA"]).key
        self.ec = jwt.PyJWK(self.jwk["EC"]).key
        self.ed = jwt.PyJWK(self.jwk["OKP"]).key
        self.kid = {"RSA": self.jwk["RSA"]["kid"], "EC": self.jwk["EC"]["kid"],
                    "OKP": self.jwk["OKP"]["kid"]}
        self.rsa_public_pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.attacker_ec = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    idp = IdP(tmp_path_factory.mktemp("hostile-idp"), keep_keys=True).start()
    try:
        yield idp
    finally:
        idp.stop()


@pytest.fixture(scope="module")
def keys(provider: IdP) -> Keys:
    return Keys(provider)


@pytest.fixture
def app(app_factory: Any, provider: IdP) -> Flask:
    return app_factory({
        "LLMAUTH_ENABLE_JWT_AUTH": True, "LLMAUTH_JWT_PUBLIC_KEY_URL": provider.jwks_uri,
        "LLMAUTH_JWT_AUDIENCE": RS256, "LLMAUTH_JWT_ISSUER": provider.issuer,
        "LLMAUTH_JWT_KID_REFETCH_COOLDOWN": 3600,
        "LLMAUTH_AUTH_FAILURE_LIMIT": "",  # this test sends hundreds of bad tokens
    })


def claims(provider: IdP, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": provider.issuer, "aud": RS256, "sub": "svc-hostile",
                            "email": "svc@corp.example", "iat": now - 5, "exp": now + 300}
    for name, value in changes.items():
        if value is _DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


_DROP = object()


def rs(keys: Keys, header: dict[str, Any] | None = None, **payload: Any) -> dict[str, Any]:
    return {"alg": "RS256", "typ": "at+jwt", "kid": keys.kid["RSA"], **(header or {})}


GENERIC: dict[str, bytes] = {}


def refused(client: Any, token: str, caplog: Any) -> None:
    """401 with the one generic body; a reason in the log; the token nowhere in it."""
    if len(token) >= 24:
        record_secret(token)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        response = client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(token))
    assert_error(response, 401)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="llmauth"'
    reference = GENERIC.setdefault("body", response.get_data())
    assert response.get_data() == reference, response.get_data()
    lines = [r.getMessage() for r in caplog.records]
    assert any(" 401 " in f" {line} " for line in lines), lines
    assert all(token not in line for line in lines)


def accepted(client: Any, token: str) -> None:
    record_secret(token)
    response = client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(token))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["principal"]["method"] == "jwt"


# -- the baseline: the same construction, nothing wrong -------------------------------------------


@pytest.mark.parametrize("kty,alg", [("RSA", "RS256"), ("EC", "ES256"), ("OKP", "EdDSA")])
def test_baseline_tokens_signed_with_provider_keys_are_accepted(
        app: Flask, provider: IdP, keys: Keys, kty: str, alg: str) -> None:
    key = {"RSA": keys.rsa, "EC": keys.ec, "OKP": keys.ed}[kty]
    token = compact({"alg": alg, "typ": "at+jwt", "kid": keys.kid[kty]}, claims(provider), key)
    accepted(app.test_client(), token)


# -- algorithms -----------------------------------------------------------------------------------


def test_alg_none_variants(app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    client = app.test_client()
    body = segment(claims(provider))
    for alg in ("none", "None", "NONE", "nOnE"):
        for header in ({"alg": alg}, {"alg": alg, "kid": keys.kid["RSA"]}):
            head = segment(header)
            refused(client, f"{head}.{body}.", caplog)
            refused(client, f"{head}.{body}.{b64(b'signature')}", caplog)
            refused(client, f"{head}.{body}", caplog)  # two segments: not even a JWT


def test_hs256_with_the_public_key_as_secret(app: Flask, provider: IdP, keys: Keys,
                                             caplog: Any) -> None:
    client = app.test_client()
    secrets_tried = [keys.rsa_public_pem, keys.rsa_public_pem.strip(),
                     json.dumps({k: v for k, v in keys.jwk["RSA"].items()
                                 if k in ("kty", "n", "e", "kid")}).encode(),
                     keys.rsa.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                        serialization.PublicFormat.OpenSSH)]
    for secret in secrets_tried:
        for kid in (keys.kid["RSA"], None):
            header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
            refused(client, compact(header, claims(provider), secret), caplog)


def test_algorithm_must_fit_the_key(app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    client = app.test_client()
    payload = claims(provider)
    # an ES256 header naming the RSA key; an RS256 header naming the EC key
    refused(client, compact({"alg": "ES256", "kid": keys.kid["RSA"]}, payload, keys.ec), caplog)
    refused(client, compact({"alg": "RS256", "kid": keys.kid["EC"]}, payload, keys.rsa), caplog)
    refused(client, compact({"alg": "EdDSA", "kid": keys.kid["RSA"]}, payload, keys.ed), caplog)
    # the header says PS256, the signature is RS256 (and the other way round)
    refused(client, compact({"alg": "PS256", "kid": keys.kid["RSA"]}, payload, keys.rsa,
                            alg="RS256"), caplog)
    refused(client, compact({"alg": "RS256", "kid": keys.kid["RSA"]}, payload, keys.rsa,
                            alg="PS256"), caplog)
    # the provider's RSA key declares RS256: RS512 and PS256 signatures by it are refused
    refused(client, compact({"alg": "RS512", "kid": keys.kid["RSA"]}, payload, keys.rsa),
            caplog)
    refused(client, compact({"alg": "PS256", "kid": keys.kid["RSA"]}, payload, keys.rsa),
            caplog)
    refused(client, compact({"alg": "RS256x", "kid": keys.kid["RSA"]}, payload, keys.rsa,
                            alg="RS256"), caplog)
    refused(client, compact({"alg": ["RS256"], "kid": keys.kid["RSA"]}, payload, keys.rsa,
                            alg="RS256"), caplog)


# -- key material in the token --------------------------------------------------------------------


class _CountingServer:
    """A loopback HTTP server offering the attacker's JWKS; counts every request."""

    def __init__(self, body: bytes) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        serve_in_thread(self.server)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_embedded_and_remote_keys_are_never_used(app: Flask, provider: IdP, keys: Keys,
                                                 caplog: Any) -> None:
    client = app.test_client()
    attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.attacker.public_key()))
    attacker_jwk["kid"] = "attacker"
    server = _CountingServer(json.dumps({"keys": [attacker_jwk]}).encode())
    cert = _self_signed(keys.attacker)
    try:
        payload = claims(provider, scope="litellm_proxy_admin")
        for kid in ("attacker", keys.kid["RSA"]):
            for extra in ({"jwk": attacker_jwk}, {"jku": server.url}, {"x5u": server.url},
                          {"x5c": [base64.b64encode(cert).decode()]},
                          {"jku": server.url, "jwk": attacker_jwk}):
                header = {"alg": "RS256", "kid": kid, **extra}
                refused(client, compact(header, payload, keys.attacker), caplog)
        # even correctly signed by the provider, a token naming remote key material is refused
        refused(client, compact(rs(keys, {"jku": server.url}), payload, keys.rsa), caplog)
        refused(client, compact(rs(keys, {"crit": ["exp"]}), payload, keys.rsa), caplog)
        assert server.hits == [], "a token-supplied URL was fetched"
    finally:
        server.close()


def test_only_public_signature_keys_of_a_jwks_verify(app_factory: Any, provider: IdP,
                                                     keys: Keys, caplog: Any) -> None:
    """jwt.md's "Keys kept": in a JWKS, an encryption key, a key whose ``key_ops`` do not
    include ``verify``, a key published with its private members and a symmetric key never
    verify a token — each is signed for here, and only the plain signature key is accepted."""
    def public(kid: str, **members: Any) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(keys.attacker.public_key()))
        return {**jwk, "kid": kid, **members}

    private = json.loads(RSAAlgorithm.to_jwk(keys.attacker))
    private.pop("key_ops")  # ["sign"]: the private members alone must keep it out
    served = [public("enc", use="enc"), public("wrap", key_ops=["wrapKey"]),
              {**private, "kid": "private"}, {"kty": "oct", "kid": "oct", "k": b64(b"1" * 32)},
              public("sig", use="sig", key_ops=["verify"])]
    server = _CountingServer(json.dumps({"keys": served}).encode())
    try:
        client = app_factory({
            "LLMAUTH_ENABLE_JWT_AUTH": True, "LLMAUTH_JWT_PUBLIC_KEY_URL": server.url,
            "LLMAUTH_JWT_AUDIENCE": RS256, "LLMAUTH_JWT_ISSUER": provider.issuer,
            "LLMAUTH_JWT_KID_REFETCH_COOLDOWN": 3600, "LLMAUTH_AUTH_FAILURE_LIMIT": "",
        }).test_client()
        payload = claims(provider)
        accepted(client, compact({"alg": "RS256", "kid": "sig"}, payload, keys.attacker))
        for kid in ("enc", "wrap", "private"):
            refused(client, compact({"alg": "RS256", "kid": kid}, payload, keys.attacker),
                    caplog)
            assert "jwt_unknown_kid" in caplog.text, kid
        refused(client, compact({"alg": "HS256", "kid": "oct"}, payload, b"1" * 32), caplog)
    finally:
        server.close()


def _self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + __import__("datetime").timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_kid_tricks(app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    client = app.test_client()
    payload = claims(provider)
    for kid in ("", "../../../../../../dev/null", "/dev/null", "/invalid_path", "|sleep 10",
                "| curl http://127.0.0.1:9/x", "x' UNION SELECT '1';--", "attacker",
                keys.kid["RSA"] + " ", keys.kid["RSA"].upper(), 1, None, [keys.kid["RSA"]],
                {"kid": keys.kid["RSA"]}, "k" * 300):
        header = {"alg": "RS256", "kid": kid}
        refused(client, compact(header, payload, keys.rsa), caplog)
        refused(client, compact({"alg": "HS256", "kid": kid}, payload, b"1"), caplog)
    refused(client, compact({"alg": "RS256"}, payload, keys.rsa), caplog)  # several keys


# -- signatures -----------------------------------------------------------------------------------


def test_bad_and_stripped_signatures(app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    client = app.test_client()
    good = compact(rs(keys), claims(provider), keys.rsa)
    head, body, sig = good.split(".")
    refused(client, f"{head}.{body}.", caplog)
    refused(client, f"{head}.{body}.{sig[:-4]}", caplog)
    refused(client, f"{head}.{body}.{sig[::-1]}", caplog)
    refused(client, f"{head}.{body}.{sig}AAAA", caplog)
    other = segment(claims(provider, scope="litellm_proxy_admin"))
    refused(client, f"{head}.{other}.{sig}", caplog)  # payload swapped under a real signature
    refused(client, compact(rs(keys), claims(provider), keys.attacker), caplog)
    es_head = segment({"alg": "ES256", "kid": keys.kid["EC"]})
    refused(client, f"{es_head}.{body}.MAYCAQACAQA", caplog)  # psychic signature
    refused(client, f"{es_head}.{body}.{b64(bytes(64))}", caplog)  # r = s = 0
    refused(client, compact({"alg": "ES256", "kid": keys.kid["EC"]}, claims(provider),
                            keys.attacker_ec), caplog)


# -- time claims ----------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"exp": _DROP}, {"exp": "9999999999"}, {"exp": True}, {"exp": None}, {"exp": [1]},
    {"exp": 1}, {"exp": int(time.time()) - 60}, {"exp": {"$gt": 0}},
    {"nbf": int(time.time()) + 600}, {"nbf": "0"}, {"nbf": True}, {"nbf": None},
    {"iat": _DROP}, {"iat": int(time.time()) + 600}, {"iat": "1"}, {"iat": False},
    {"iat": int(time.time()) - 5, "exp": int(time.time()) + 10 * 86400},  # lifetime too long
], ids=lambda c: ",".join(f"{k}={'drop' if v is _DROP else v!r}"[:40] for k, v in c.items()))
def test_time_claims(app: Flask, provider: IdP, keys: Keys, caplog: Any,
                     changes: dict[str, Any]) -> None:
    refused(app.test_client(), compact(rs(keys), claims(provider, **changes), keys.rsa), caplog)


def test_claims_are_checked_only_once_the_signature_verifies(
        app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    """docs/jwt.md's order: a forged token is refused for its signature, whatever its claims
    say (expired, wrong audience, too long-lived): nothing a forger wrote is evaluated."""
    client = app.test_client()
    now = int(time.time())
    for changes in ({"exp": now - 600}, {"aud": "urn:llmauth:other"},
                    {"exp": now + 10 * 86400}, {"iat": _DROP}):
        forged = compact(rs(keys), claims(provider, **changes), keys.attacker)
        refused(client, forged, caplog)
        assert "jwt_InvalidSignatureError" in caplog.text, (changes, caplog.text)
        genuine = compact(rs(keys), claims(provider, **changes), keys.rsa)
        refused(client, genuine, caplog)
        assert "jwt_InvalidSignatureError" not in caplog.text, (changes, caplog.text)


def test_non_finite_numbers_in_raw_json(app: Flask, provider: IdP, keys: Keys,
                                        caplog: Any) -> None:
    text = json.dumps(claims(provider)).replace(
        f'"exp": {claims(provider)["exp"]}', '"exp": Infinity')
    assert "Infinity" in text
    refused(app.test_client(), compact(rs(keys), text, keys.rsa), caplog)
    text = json.dumps(claims(provider)).replace('"sub"', '"nbf": NaN, "sub"')
    refused(app.test_client(), compact(rs(keys), text, keys.rsa), caplog)


# -- audience and issuer --------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"aud": "urn:llmauth:other"}, {"aud": _DROP}, {"aud": ["urn:a", "urn:b"]}, {"aud": ""},
    {"aud": RS256.upper()}, {"aud": 1}, {"iss": "http://127.0.0.1:1"}, {"iss": _DROP},
    {"iss": ""}, {"iss": ["x"]}, {"iss": 7},
], ids=lambda c: ",".join(f"{k}={'drop' if v is _DROP else v!r}"[:40] for k, v in c.items()))
def test_audience_and_issuer(app: Flask, provider: IdP, keys: Keys, caplog: Any,
                             changes: dict[str, Any]) -> None:
    refused(app.test_client(), compact(rs(keys), claims(provider, **changes), keys.rsa), caplog)


def test_issuer_prefix_and_suffix_do_not_match(app: Flask, provider: IdP, keys: Keys,
                                               caplog: Any) -> None:
    client = app.test_client()
    for iss in (provider.issuer + "/", provider.issuer + "0", provider.issuer[:-1],
                provider.issuer.replace("127.0.0.1", "localhost")):
        refused(client, compact(rs(keys), claims(provider, iss=iss), keys.rsa), caplog)


# -- size, shape, parsing -------------------------------------------------------------------------


def test_oversized_tokens(app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    client = app.test_client()
    refused(client, compact(rs(keys), claims(provider, pad="x" * 9000), keys.rsa), caplog)
    refused(client, compact(rs(keys), claims(provider, pad="x" * 70000), keys.rsa), caplog)


def test_malformed_tokens(app: Flask, provider: IdP, keys: Keys, caplog: Any) -> None:
    client = app.test_client()
    good = compact(rs(keys), claims(provider), keys.rsa)
    head, body, sig = good.split(".")
    deep = json.dumps(claims(provider))[:-1] + ', "n": ' + "[" * 3000 + "]" * 3000 + "}"
    for token in (
        f"{head}=.{body}.{sig}", f"{head}.{body}=.{sig}", f"{head}.{body}.{sig}=",
        f"{head.replace('J', '+')}.{body}.{sig}", f"{head}.{body}.{sig.replace('_', '/')}",
        f"{segment('not json')}.{body}.{sig}", f"{head}.{segment('[1,2]')}.{sig}",
        f"{segment('[]')}.{body}.{sig}", f"{segment(b'{}')}.{body}.{sig}",
        f"{segment(bytes([0xff, 0xfe]) + b'{}')}.{body}.{sig}", f"..{sig}", "..", "a.b.c",
        f"{head}.{body}.{sig}.", f"{head}..{sig}", compact(rs(keys), deep, keys.rsa),
        f"{head}.{body}.{sig}.{sig}.{sig}",  # JWE-shaped: five parts
        f"{head}.e30.{sig}",  # an empty claims object
    ):
        refused(client, token, caplog)


def test_jws_json_serialisation_is_refused(app: Flask, provider: IdP, keys: Keys,
                                           caplog: Any) -> None:
    good = compact(rs(keys), claims(provider), keys.rsa)
    head, body, sig = good.split(".")
    polyglot = json.dumps({"protected": head, "payload": body, "signature": sig},
                          separators=(",", ":"))
    refused(app.test_client(), polyglot, caplog)
    refused(app.test_client(), base64.urlsafe_b64encode(polyglot.encode()).decode(), caplog)


def test_duplicate_members_in_header_and_payload(app: Flask, provider: IdP, keys: Keys,
                                                 caplog: Any) -> None:
    client = app.test_client()
    kid = keys.kid["RSA"]
    payload = json.dumps(claims(provider))
    header = f'{{"alg":"none","alg":"RS256","kid":"{kid}"}}'
    refused(client, compact(header, payload, keys.rsa, alg="RS256"), caplog)
    header = f'{{"alg":"RS256","kid":"attacker","kid":"{kid}"}}'
    refused(client, compact(header, payload, keys.rsa, alg="RS256"), caplog)
    dup = payload[:-1] + ', "email": "admin@corp.example"}'
    refused(client, compact(rs(keys), dup, keys.rsa), caplog)
    dup = payload[:-1] + f', "iss": "{provider.issuer}"' + "}"
    refused(client, compact(rs(keys), dup, keys.rsa), caplog)


def test_internal_claims_cannot_be_set_by_a_token(app: Flask, provider: IdP, keys: Keys) -> None:
    token = compact(rs(keys), claims(provider, _litellm_user_id="admin",
                                     _llmauth_role="proxy_admin"), keys.rsa)
    record_secret(token)
    response = app.test_client().post(CHAT, json={"model": "gpt-4o"}, headers=bearer(token))
    assert response.status_code == 200
    assert response.get_json()["principal"]["user_id"] == "svc@corp.example"
    assert response.get_json()["principal"]["role"] == "internal_user"


# -- explicit typing ------------------------------------------------------------------------------


def test_id_tokens_refused_when_at_jwt_is_required(app_factory: Any, provider: IdP, keys: Keys,
                                                   caplog: Any) -> None:
    client = app_factory({
        "LLMAUTH_ENABLE_JWT_AUTH": True, "LLMAUTH_JWT_PUBLIC_KEY_URL": provider.jwks_uri,
        "LLMAUTH_JWT_AUDIENCE": RS256, "LLMAUTH_JWT_ISSUER": provider.issuer,
        "LLMAUTH_JWT_REQUIRE_AT_JWT_TYP": True, "LLMAUTH_AUTH_FAILURE_LIMIT": "",
    }).test_client()
    accepted(client, compact(rs(keys), claims(provider), keys.rsa))
    accepted(client, compact(rs(keys, {"typ": "application/at+JWT"}), claims(provider), keys.rsa))
    for typ in ("JWT", "jwt", "", None, 1):
        header = {k: v for k, v in rs(keys, {"typ": typ}).items() if v is not None}
        refused(client, compact(header, claims(provider), keys.rsa), caplog)
    refused(client, compact({k: v for k, v in rs(keys).items() if k != "typ"},
                            claims(provider), keys.rsa), caplog)
