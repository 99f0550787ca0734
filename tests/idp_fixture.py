"""A real OpenID provider for the tests: npm ``oidc-provider`` run from ``tests/idp``.

``idp`` (session-scoped) is one provider shared by every test that only asks it for
tokens; ``idp_factory`` makes private providers a test may stop, restart (new signing
keys) or configure differently (a second issuer, other clients). Tokens and client secrets
the helpers produce are recorded with :func:`tests.helpers.record_secret`.

Without ``node`` the IdP tests are skipped (with the reason), except when
``LLMAUTH_TEST_REQUIRE_PEERS=1`` (``.ci/run``): then they fail.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlparse

import pytest
import requests

from tests.helpers import record_secret

IDP_DIR = Path(__file__).resolve().parent / "idp"
REQUIRE_PEERS = os.environ.get("LLMAUTH_TEST_REQUIRE_PEERS") == "1"
_NPM_LOCK = threading.Lock()

#: Scopes the default resource servers accept (tests map them with scope_mappings).
DEFAULT_SCOPES = ("litellm_proxy_admin gateway.admin litellm.api litellm.read models.gpt "
                  "models.claude read write")
#: Resource indicators of the default configuration.
RS256 = "urn:llmauth:rs256"
ES256 = "urn:llmauth:es256"
EDDSA = "urn:llmauth:eddsa"
OPAQUE = "urn:llmauth:opaque"
REDIRECT_URI = "http://127.0.0.1:9/callback"


def peer_missing(reason: str) -> None:
    """Skip, or fail when the run requires every peer."""
    if REQUIRE_PEERS:
        pytest.fail(f"{reason} (LLMAUTH_TEST_REQUIRE_PEERS=1)")
    pytest.skip(reason)


def ensure_node_modules() -> str:
    """The ``node`` executable, after ``npm ci`` when ``node_modules`` is missing."""
    node = shutil.which("node")
    if node is None:
        peer_missing("node is not installed: the OpenID provider tests need Node.js 20+")
    with _NPM_LOCK:
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            npm = shutil.which("npm")
            if npm is None:
                peer_missing("npm is not installed: cannot install tests/idp")
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=IDP_DIR,
                capture_output=True, text=True, timeout=300, check=False,
            )
            if done.returncode != 0:
                pytest.fail(f"npm ci in tests/idp failed: {done.stderr[-2000:]}")
    return node  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_config() -> dict[str, Any]:
    """Clients, resource servers and accounts most tests need; secrets are random."""
    svc = record_secret("svc-" + secrets.token_urlsafe(24))
    web = record_secret("web-" + secrets.token_urlsafe(24))
    rs = record_secret("rs-" + secrets.token_urlsafe(24))
    alice = record_secret("alice-" + secrets.token_urlsafe(12))
    bob = record_secret("bob-" + secrets.token_urlsafe(12))
    return {
        "clients": [
            {   # machine client: client_credentials, custom claims per request
                "client_id": "llmauth-svc", "client_secret": svc,
                "grant_types": ["client_credentials"], "redirect_uris": [],
                "response_types": [], "scope": DEFAULT_SCOPES,
                "allow_claims_param": True, "default_resource": RS256,
            },
            {   # a user-facing app: authorization code (+PKCE), userinfo, opaque tokens
                "client_id": "llmauth-web", "client_secret": web,
                "grant_types": ["authorization_code", "refresh_token"],
                "redirect_uris": [REDIRECT_URI], "response_types": ["code"],
                "scope": "openid email profile offline_access",
            },
            {   # a resource server that introspects opaque tokens
                "client_id": "llmauth-gateway", "client_secret": rs,
                "grant_types": ["client_credentials"], "redirect_uris": [],
                "response_types": [], "scope": "read",
            },
        ],
        "resource_servers": {
            RS256: {"format": "jwt", "alg": "RS256", "scope": DEFAULT_SCOPES},
            ES256: {"format": "jwt", "alg": "ES256", "scope": DEFAULT_SCOPES},
            EDDSA: {"format": "jwt", "alg": "EdDSA", "scope": DEFAULT_SCOPES},
            OPAQUE: {"format": "opaque", "scope": DEFAULT_SCOPES},
        },
        "accounts": {
            "alice": {"password": alice, "sub": "alice-sub",
                      "claims": {"email": "alice@example.com", "email_verified": True,
                                 "name": "Alice", "groups": ["team-a"]},
                      "token_claims": {"email": "alice@example.com"}},
            "bob": {"password": bob, "sub": "bob-sub",
                    "claims": {"email": "bob@other.example", "email_verified": True,
                               "name": "Bob", "groups": []}},
        },
    }


class IdP:
    """One ``oidc-provider`` process on a loopback port (the port survives restarts)."""

    def __init__(self, workdir: Path, config: Mapping[str, Any] | None = None, *,
                 keep_keys: bool = False) -> None:
        self.config = copy.deepcopy(dict(config) if config is not None else default_config())
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "idp.json"
        self.config_file.write_text(json.dumps(self.config))
        self.keys_file = workdir / "keys.json" if keep_keys else None
        self.log_file = workdir / "idp.log"
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.node = ensure_node_modules()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20.0) -> IdP:
        if self.running:
            return self
        args = [self.node, "server.mjs", "--port", str(self.port),
                "--config", str(self.config_file)]
        if self.keys_file is not None:
            args += ["--keys", str(self.keys_file)]
        log = open(self.log_file, "ab")  # noqa: SIM115 - owned by the child's lifetime
        try:
            self.process = subprocess.Popen(args, cwd=IDP_DIR, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"oidc-provider exited: {self.log_file.read_text()[-2000:]}")
            try:
                if requests.get(self.discovery_url, timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"oidc-provider did not answer: {self.log_file.read_text()[-2000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> IdP:
        """Stop and start again on the same port: new signing keys (unless ``keep_keys``);
        every token issued before is forgotten by the provider (in-memory storage)."""
        self.stop()
        return self.start()

    # -- addresses ------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.issuer + path

    @property
    def discovery_url(self) -> str:
        return self.url("/.well-known/openid-configuration")

    @property
    def jwks_uri(self) -> str:
        return self.url("/jwks")

    @property
    def userinfo_endpoint(self) -> str:
        return self.url("/me")

    @property
    def introspection_endpoint(self) -> str:
        return self.url("/token/introspection")

    def client(self, client_id: str) -> dict[str, Any]:
        return next(c for c in self.config["clients"] if c["client_id"] == client_id)

    def secret(self, client_id: str) -> str:
        return str(self.client(client_id)["client_secret"])

    def jwks(self) -> dict[str, Any]:
        return requests.get(self.jwks_uri, timeout=5).json()  # type: ignore[no-any-return]

    # -- tokens ---------------------------------------------------------------------------------

    def token_response(self, client_id: str = "llmauth-svc", *, resource: str | None = RS256,
                       scope: str | None = None, extra_claims: Mapping[str, Any] | None = None,
                       ttl: int | None = None) -> dict[str, Any]:
        """A client_credentials token response (``access_token`` recorded as a secret)."""
        data: dict[str, Any] = {"grant_type": "client_credentials"}
        if resource is not None:
            data["resource"] = resource
        if scope is not None:
            data["scope"] = scope
        if extra_claims is not None:
            data["extra_claims"] = json.dumps(dict(extra_claims))
        if ttl is not None:
            data["ttl"] = str(ttl)
        response = requests.post(self.url("/token"), data=data, timeout=10,
                                 auth=(client_id, self.secret(client_id)))
        body = response.json()
        if response.status_code != 200:
            raise AssertionError(f"token request refused: {response.status_code} {body}")
        record_secret(body["access_token"])
        return body  # type: ignore[no-any-return]

    def token(self, client_id: str = "llmauth-svc", **kwargs: Any) -> str:
        """A client_credentials access token (a JWT for the JWT resource servers)."""
        return str(self.token_response(client_id, **kwargs)["access_token"])

    def code_flow(self, login: str = "alice", password: str | None = None, *,
                  client_id: str = "llmauth-web", scope: str = "openid email profile",
                  resource: str | None = None) -> dict[str, Any]:
        """Sign in through the login form and exchange the code; the token response.

        Raises :class:`PermissionError` when the provider refuses the password.
        """
        password = password if password is not None else self.config["accounts"][login]["password"]
        session = requests.Session()
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        params = {"client_id": client_id, "response_type": "code", "scope": scope,
                  "redirect_uri": REDIRECT_URI, "state": secrets.token_urlsafe(8),
                  "nonce": secrets.token_urlsafe(8), "code_challenge": challenge,
                  "code_challenge_method": "S256"}
        if resource is not None:
            params["resource"] = resource
        url = self.url("/auth?" + urlencode(params))
        response = session.get(url, allow_redirects=False, timeout=10)
        for _ in range(12):
            if response.status_code in (302, 303):
                location = urljoin(url, response.headers["Location"])
                if location.startswith(REDIRECT_URI):
                    query = parse_qs(urlparse(location).query)
                    if "code" not in query:
                        raise AssertionError(f"authorization failed: {query}")
                    return self._exchange(client_id, query["code"][0], verifier)
                url = location
                response = session.get(url, allow_redirects=False, timeout=10)
            elif response.status_code == 200 and 'name="password"' in response.text:
                url = url.rstrip("/") + "/login"
                response = session.post(url, data={"login": login, "password": password},
                                        allow_redirects=False, timeout=10)
                if response.status_code == 401:
                    raise PermissionError("the provider refused the login")
            else:
                raise AssertionError(f"unexpected {response.status_code} at {url}")
        raise AssertionError("too many redirects in the code flow")

    def _exchange(self, client_id: str, code: str, verifier: str) -> dict[str, Any]:
        response = requests.post(self.url("/token"), timeout=10, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }, auth=(client_id, self.secret(client_id)))
        body = response.json()
        if response.status_code != 200:
            raise AssertionError(f"code exchange refused: {body}")
        for name in ("access_token", "id_token", "refresh_token"):
            if name in body:
                record_secret(body[name])
        return body  # type: ignore[no-any-return]

    def introspect(self, token: str, client_id: str = "llmauth-gateway") -> dict[str, Any]:
        response = requests.post(self.introspection_endpoint, data={"token": token},
                                 auth=(client_id, self.secret(client_id)), timeout=10)
        return response.json()  # type: ignore[no-any-return]

    def userinfo(self, token: str) -> requests.Response:
        return requests.get(self.userinfo_endpoint, timeout=10,
                            headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    """The shared provider (default config). Do not stop or restart it: use idp_factory."""
    provider = IdP(tmp_path_factory.mktemp("idp")).start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def idp_factory(tmp_path: Path) -> Iterator[Any]:
    """``idp_factory(config=None, keep_keys=False, start=True)`` → a private provider,
    stopped after the test."""
    made: list[IdP] = []

    def make(config: Mapping[str, Any] | None = None, *, keep_keys: bool = False,
             start: bool = True) -> IdP:
        provider = IdP(tmp_path / f"idp{len(made)}", config, keep_keys=keep_keys)
        made.append(provider)
        return provider.start() if start else provider

    yield make
    for provider in made:
        provider.stop()
