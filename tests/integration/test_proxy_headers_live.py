"""Proxy-header auth over real sockets: the app served on 127.0.0.1, peers connecting from
trusted and untrusted loopback addresses, and Apache ``mod_auth_openidc`` in front doing a
real OIDC login against the test IdP and setting ``X-Forwarded-*``."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from tests.helpers import ADMIN, record_secret, serve_in_thread
from tests.idp_fixture import IdP, free_port, peer_missing

pytestmark = pytest.mark.integration

MAPPING = {"user_id": "X-Forwarded-User", "user_email": "X-Forwarded-Email",
           "team_id": "X-Forwarded-Groups"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def serve(app: Flask, host: str = "127.0.0.1") -> Iterator[int]:
    """Serve ``app`` on a real socket (a free port) for the duration of the block."""
    server = make_server(host, 0, app, threaded=True)
    thread = serve_in_thread(server)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(timeout=10)


def call(port: int, method: str, path: str, headers: dict[str, str], *,
         source: str = "127.0.0.1", body: Any = None) -> tuple[int, Any]:
    """One request from a chosen loopback source address (the peer the app sees)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers = {**headers, "Content-Type": "application/json"}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None
    finally:
        conn.close()


def proxy_app(app_factory: Any, ranges: list[str]) -> Flask:
    return app_factory({
        "LLMAUTH_ENABLE_OAUTH2_PROXY_AUTH": True,
        "LLMAUTH_OAUTH2_CONFIG_MAPPINGS": MAPPING,
        "LLMAUTH_TRUSTED_PROXY_RANGES": ranges,
    })


def test_socket_peer_inside_and_outside_the_trusted_ranges(app_factory: Any) -> None:
    app = proxy_app(app_factory, ["127.0.0.1/32"])
    with serve(app) as port:
        status, body = call(port, "POST", "/v1/chat/completions",
                            {"X-Forwarded-User": "alice"}, body=CHAT)
        assert status == 200 and body["principal"]["user_id"] == "alice"
        assert body["principal"]["method"] == "oauth2_proxy"
        # same headers from another loopback address: outside the boundary
        status, body = call(port, "POST", "/v1/chat/completions",
                            {"X-Forwarded-User": "alice"}, source="127.0.0.2", body=CHAT)
        assert status == 401 and body["error"]["code"] == "401"
        status, _ = call(port, "POST", "/v1/chat/completions",
                         {"X-Forwarded-User": "alice", "X-Forwarded-For": "127.0.0.1"},
                         source="127.0.0.2", body=CHAT)
        assert status == 401
        # a header spelled with underscores never reaches the app as the mapped header
        status, _ = call(port, "POST", "/v1/chat/completions",
                         {"X_Forwarded_User": "admin"}, body=CHAT)
        assert status == 401
        status, body = call(port, "POST", "/v1/chat/completions",
                            {"X-Forwarded-User": "alice", "X_Forwarded_User": "admin"},
                            body=CHAT)
        assert status == 200 and body["principal"]["user_id"] == "alice"


def test_socket_ranges_that_exclude_the_peer(app_factory: Any) -> None:
    app = proxy_app(app_factory, ["10.0.0.0/8", "fd00::/8"])
    with serve(app) as port:
        status, _ = call(port, "POST", "/v1/chat/completions",
                         {"X-Forwarded-User": "alice", "X-Forwarded-For": "10.0.0.1"},
                         body=CHAT)
        assert status == 401
        status, body = call(port, "POST", "/v1/chat/completions", ADMIN, body=CHAT)
        assert status == 200 and body["principal"]["method"] == "master_key"


# -- Apache mod_auth_openidc in front --------------------------------------------------------------

APACHE_MODULES = ("mpm_event", "authz_core", "authz_user", "authn_core", "headers", "proxy",
                  "proxy_http", "auth_openidc")
MODULE_DIR = Path("/usr/lib/apache2/modules")


def apache_conf(workdir: Path, port: int, app_port: int, idp: IdP, client_secret: str) -> str:
    passphrase = record_secret("pp-" + secrets.token_urlsafe(24))
    modules = "\n".join(f"LoadModule {name}_module {MODULE_DIR}/mod_{name}.so"
                        for name in APACHE_MODULES)
    user = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
    return f"""
ServerRoot {workdir}
DefaultRuntimeDir {workdir}
PidFile {workdir}/apache.pid
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
{modules}
{user}ErrorLog {workdir}/error.log
LogLevel warn auth_openidc:warn
StartServers 1
ServerLimit 1
ThreadsPerChild 8

OIDCProviderMetadataURL {idp.discovery_url}
OIDCClientID llmauth-apache
OIDCClientSecret {client_secret}
OIDCRedirectURI http://127.0.0.1:{port}/redirect_uri
OIDCCryptoPassphrase {passphrase}
OIDCScope "openid email profile"
OIDCPKCEMethod S256
OIDCRemoteUserClaim sub
OIDCPassClaimsAs environment
OIDCPassIDTokenAs claims
OIDCClaimDelimiter ,

<Location />
    AuthType openid-connect
    Require valid-user
    RequestHeader set X-Forwarded-User "%{{OIDC_CLAIM_sub}}e"
    RequestHeader set X-Forwarded-Email "%{{OIDC_CLAIM_email}}e"
    RequestHeader set X-Forwarded-Groups "%{{OIDC_CLAIM_groups}}e"
</Location>
ProxyPass /redirect_uri !
ProxyPass / http://127.0.0.1:{app_port}/
ProxyPassReverse / http://127.0.0.1:{app_port}/
"""


@contextmanager
def apache(workdir: Path, conf: str, port: int) -> Iterator[str]:
    binary = shutil.which("apache2") or ("/usr/sbin/apache2"
                                         if os.path.exists("/usr/sbin/apache2") else None)
    if binary is None or not (MODULE_DIR / "mod_auth_openidc.so").exists():
        peer_missing("apache2 with mod_auth_openidc is not installed (apt-get install -y "
                     "--no-install-recommends apache2-bin libapache2-mod-auth-openidc)")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    (workdir / "apache.conf").write_text(conf)
    process = subprocess.Popen([binary, "-f", str(workdir / "apache.conf"), "-DFOREGROUND"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"apache exited: {process.stderr.read().decode()[-2000:]}"
                                   f"{_log(workdir)}")
            try:
                requests.get(base + "/", allow_redirects=False, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("apache did not answer" + _log(workdir)) from None
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def _log(workdir: Path) -> str:
    path = workdir / "error.log"
    return "\n" + path.read_text()[-3000:] if path.exists() else ""


def login_through(session: requests.Session, url: str, login: str, password: str,
                  method: str = "GET", **kwargs: Any) -> requests.Response:
    """Follow the OIDC login that Apache starts (IdP login form included) to the app."""
    response = session.request(method, url, allow_redirects=False, timeout=10, **kwargs)
    for _ in range(15):
        if response.status_code in (301, 302, 303, 307):
            url = urljoin(url, response.headers["Location"])
            response = session.get(url, allow_redirects=False, timeout=10)
        elif response.status_code == 200 and 'name="password"' in response.text:
            url = url.rstrip("/") + "/login"
            response = session.post(url, data={"login": login, "password": password},
                                    allow_redirects=False, timeout=10)
        else:
            return response
    raise AssertionError("too many redirects")


def test_apache_mod_auth_openidc_in_front(app_factory: Any, idp_factory: Any,
                                          tmp_path: Path) -> None:
    apache_port = free_port()
    apache_secret = record_secret("apache-" + secrets.token_urlsafe(24))
    passwords = {name: record_secret(f"{name}-" + secrets.token_urlsafe(12))
                 for name in ("alice", "carol")}
    provider = idp_factory({
        "clients": [{
            "client_id": "llmauth-apache", "client_secret": apache_secret,
            "grant_types": ["authorization_code"], "response_types": ["code"],
            "redirect_uris": [f"http://127.0.0.1:{apache_port}/redirect_uri"],
            "scope": "openid email profile",
        }],
        "accounts": {
            "alice": {"password": passwords["alice"], "sub": "alice-sub",
                      "claims": {"email": "alice@example.com", "groups": ["team-a"]}},
            "carol": {"password": passwords["carol"], "sub": "carol-sub",
                      "claims": {"email": "carol@example.com", "groups": ["team-a", "team-b"]}},
        },
    })
    app = proxy_app(app_factory, ["127.0.0.1/32"])
    client = app.test_client()
    assert client.post("/team/new", json={"team_id": "team-a", "models": ["gpt-4o"]},
                       headers=ADMIN).status_code == 200

    with serve(app) as app_port:
        conf = apache_conf(tmp_path / "apache", apache_port, app_port, provider, apache_secret)
        with apache(tmp_path / "apache", conf, apache_port) as base:
            # no session: Apache sends the browser to the IdP, the app is never reached
            first = requests.get(base + "/v1/whoami", allow_redirects=False, timeout=10,
                                 headers={"X-Forwarded-User": "admin"})
            assert first.status_code == 302
            assert urlparse(first.headers["Location"]).netloc == urlparse(provider.issuer).netloc

            # a wrong password never gets a session
            refused = login_through(requests.Session(), base + "/v1/models", "alice", "wrong")
            assert refused.status_code == 401 and 'name="password"' in refused.text
            session = requests.Session()
            response = login_through(session, base + "/v1/models", "alice", passwords["alice"])
            assert response.status_code == 200, response.text[:500]
            assert response.json()["data"] == ["gpt-4o"]  # team-a's models

            # client-sent identity headers are replaced by Apache's
            forged = {"X-Forwarded-User": "admin", "X-Forwarded-Email": "admin@corp",
                      "X-Forwarded-Groups": "admins"}
            r = session.post(base + "/v1/chat/completions", json=CHAT, headers=forged,
                             timeout=10, allow_redirects=False)
            assert r.status_code == 200, r.text[:500]
            assert r.json()["principal"]["user_id"] == "alice-sub"
            assert r.json()["principal"]["team_id"] == "team-a"
            r = session.post(base + "/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"},
                             timeout=10, allow_redirects=False)
            assert r.status_code == 403 and r.json()["error"]["type"] == "team_model_access_denied"
            r = session.get(base + "/custom/admin", timeout=10, allow_redirects=False)
            assert r.status_code == 403

            # two groups arrive comma-joined: not one team id, so the app refuses
            carol = requests.Session()
            r = login_through(carol, base + "/v1/models", "carol", passwords["carol"])
            assert r.status_code == 401

            # the same headers sent straight to the app from outside the trusted range
            status, _ = call(app_port, "POST", "/v1/chat/completions",
                             {"X-Forwarded-User": "alice-sub"}, source="127.0.0.2", body=CHAT)
            assert status == 401
