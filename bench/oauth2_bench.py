"""Cached OAuth2 introspection compared with a bare Flask route, in the same run.

    python bench/oauth2_bench.py [--requests 20000] [--repeats 5]

Three apps answer ``POST /v1/chat/completions`` with the same small JSON view (the body is
parsed, the model echoed):

* ``bare``: plain Flask, no extension;
* ``oauth2 (cached)``: the extension with OAuth2 introspection; the token was introspected
  once by a real HTTP endpoint on loopback (a stand-in that answers RFC 7662 JSON), every
  measured request is served from the cache — the chain, RBAC and the model check all run;
* the same with rate limiting switched off (``LLMAUTH_RATELIMIT_ENABLED=False``), which
  isolates the cost of authentication and authorization;
* ``virtual key (cached)``: the first app with a cached virtual key, for reference.

Requests go through ``app.test_client()`` in-process, interleaved case by case, and the
median of the repeats is reported as µs per request and as a ratio to ``bare``. The run
fails if any response is not 200 or if the introspection endpoint was called more than
once per app (a cache miss on the hot path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask, jsonify, request  # noqa: E402

from flask_llmauth import LLMAuth, current_principal  # noqa: E402

MASTER_KEY = "sk-bench-master-" + "x" * 32
TOKEN = "bench-opaque-token-" + "y" * 40
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def introspection_endpoint() -> Iterator[tuple[str, list[int]]]:
    """A loopback HTTP endpoint answering introspection requests; counts its calls."""
    calls: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append(1)
            body = json.dumps({"active": True, "sub": "bench-user", "scope": "read",
                               "exp": int(time.time()) + 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/oauth2/introspect", calls
    finally:
        server.shutdown()


def bare_app() -> Flask:
    app = Flask("bare")

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        return jsonify(model=request.get_json()["model"], user="anonymous")

    return app


def llmauth_app(workdir: str, endpoint: str, name: str, **config: Any) -> Flask:
    app = Flask(name, instance_path=workdir)
    app.config.update({
        "LLMAUTH_MASTER_KEY": MASTER_KEY,
        "LLMAUTH_DATABASE_URL": f"sqlite:///{workdir}/{name}.db",
        "LLMAUTH_ENABLE_OAUTH2_AUTH": True,
        "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT": endpoint,
        "LLMAUTH_OAUTH2_CLIENT_ID": "bench",
        "LLMAUTH_OAUTH2_CLIENT_SECRET": "bench-secret-" + "z" * 20,
        "LLMAUTH_OAUTH2_CACHE_TTL": 3600,
        **config,
    })
    LLMAuth(app)

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        return jsonify(model=request.get_json()["model"], user=current_principal.user_id)

    return app


def runner(app: Flask, token: str | None) -> Callable[[int], float]:
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    payload = json.dumps(BODY)

    def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            response = client.post("/v1/chat/completions", data=payload, headers=headers,
                                   content_type="application/json")
            if response.status_code != 200:
                raise SystemExit(f"unexpected {response.status_code}: {response.get_data()!r}")
        return (time.perf_counter() - started) / n * 1e6

    return run


def authenticator_cost(app: Flask, token: str, n: int = 100_000) -> float:
    """µs per call of the OAuth2 authenticator alone, on a cached token."""
    from flask_llmauth.authn.base import AuthContext
    from flask_llmauth.credentials import read_credentials

    state = app.extensions["llmauth"]
    authenticator = state.authenticators["oauth2"]
    with app.test_request_context("/v1/chat/completions", method="POST", json=BODY,
                                  headers={"Authorization": f"Bearer {token}"}):
        rule = request.url_rule
        info = state.routes.info(rule, app.view_functions[rule.endpoint])
        ctx = AuthContext(request, read_credentials(request, max_length=8192), info)
        assert authenticator.authenticate(ctx).user_id == "bench-user"
        started = time.perf_counter()
        for _ in range(n):
            authenticator.authenticate(ctx)
        return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("LLMAUTH_CONFIG_FILE", None)

    with tempfile.TemporaryDirectory() as workdir, introspection_endpoint() as (url, calls):
        app = llmauth_app(workdir, url, "defaults")
        no_limits = llmauth_app(workdir, url, "no_limits", LLMAUTH_RATELIMIT_ENABLED=False)
        key_response = app.test_client().post(
            "/key/generate", json={"models": ["gpt-4o"]},
            headers={"Authorization": f"Bearer {MASTER_KEY}"})
        virtual_key = key_response.get_json()["key"]
        cases = {
            "bare Flask": runner(bare_app(), None),
            "oauth2 introspection (cached)": runner(app, TOKEN),
            "  same, rate limiting off": runner(no_limits, TOKEN),
            "virtual key (cached)": runner(app, virtual_key),
        }
        for run in cases.values():  # warm-up: imports, route classification, cache fill
            run(500)
        results: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, run in cases.items():
                results[name].append(run(args.requests))
        alone = statistics.median(authenticator_cost(no_limits, TOKEN) for _ in range(3))
        if len(calls) != 2:  # one cache fill per app
            raise SystemExit(f"introspection endpoint called {len(calls)} times (expected 2)")
        for flask_app in (app, no_limits):
            flask_app.extensions["llmauth"].close()

    bare = statistics.median(results["bare Flask"])
    print(f"{args.requests} requests x {args.repeats} repeats, in-process test client, "
          f"Python {sys.version.split()[0]}")
    print(f"{'case':34} {'median µs/req':>14} {'runs (µs)':>32} {'× bare':>8}")
    for name, values in results.items():
        median = statistics.median(values)
        runs = " / ".join(f"{v:.1f}" for v in values)
        print(f"{name:34} {median:14.1f} {runs:>32} {median / bare:8.3f}")
    print(f"OAuth2 authenticator alone, cached token: {alone:.2f} µs/call")
    print(f"introspection endpoint calls: {len(calls)} (one cache fill per app)")


if __name__ == "__main__":
    main()
