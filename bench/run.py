#!/usr/bin/env python3
"""Per-request cost of flask_llmauth's authentication paths, next to a bare Flask route.

    python bench/run.py                 # the full run (builds bench/keys-1000000.db once)
    python bench/run.py --callgrind     # also count instructions per request (valgrind)
    python bench/run.py --bytecodes     # also count Python bytecodes per request
    python bench/run.py --help

One run measures, for the same view (``POST /v1/chat/completions`` that parses the JSON
body and answers JSON):

* ``bare``: a Flask app without the extension;
* ``master_key``: the extension, the master key;
* ``virtual_key_cached``: the extension, a virtual key found in the in-process cache
  (authenticator chain, RBAC role table, model check against the key's model list);
* ``virtual_key_cold``: the extension, a virtual key that is *not* in the in-process cache
  (every request presents a different key), looked up among 1,000,000 keys in SQLite;
* ``oauth2_cached``: the extension with OAuth2 introspection on, an opaque token whose
  introspection result is cached (the loopback endpoint that answers RFC 7662 is asked once,
  during warm-up; a second call fails the run);
* ``jwt_cached``: the extension with JWT auth on, an RS256 token signed by a local RSA key
  whose JWKS a loopback endpoint serves (asked once, during warm-up; a second call fails the
  run). Next to it the run times ``jwt.decode`` of the same token with the same checks
  (signature, ``exp``, ``aud``, ``iss``) and a ready key object: the JWT target is
  ``bare + 1.15 × jwt.decode``.

Each is driven two ways: ``wsgi`` calls the WSGI app directly with a prepared environ (the
app's own cost; what a WSGI server pays on top of its HTTP work) and ``test_client`` goes
through Flask's test client (also builds and wraps each request, like the published Flask
figures). Rounds are interleaved in a shuffled order so drift hits every variant alike; the
report gives medians over rounds and the median of the per-round ratios to ``bare``. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):  # the checkout's package, and keydb beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jwt  # noqa: E402
import keydb  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from flask import Flask, request  # noqa: E402
from jwt.algorithms import RSAAlgorithm  # noqa: E402
from opcodes import OpcodeCounter  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from flask_llmauth import LLMAuth  # noqa: E402

PATH = "/v1/chat/completions"
BODY = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}], '
        b'"max_tokens": 64, "temperature": 0}')
VARIANTS = ("bare", "master_key", "virtual_key_cached", "virtual_key_cold", "oauth2_cached",
            "jwt_cached")
DRIVERS = ("wsgi", "test_client")
TARGETS = {"master_key": "≤ 1.03×", "virtual_key_cached": "≤ 1.10×",
           "virtual_key_cold": "adds ≤ 50 µs", "oauth2_cached": "≤ 1.10×",
           "jwt_cached": "≤ bare + 1.15 × jwt.decode"}
#: An opaque access token (no dots, no ``sk-``): what the OAuth2 authenticator takes.
OAUTH2_TOKEN = "bench-opaque-" + "Tq9" * 14
JWT_ISSUER = "https://idp.bench.invalid"
JWT_AUDIENCE = "llm-gateway"
JWT_KID = "bench-rs256"


# -- the apps -------------------------------------------------------------------------------------


def add_view(app: Flask) -> None:
    @app.post(PATH)
    def chat_completions() -> Any:
        body = request.get_json()
        return {"object": "chat.completion", "model": body["model"], "choices": []}


def bare_app() -> Flask:
    app = Flask("bench_bare")
    add_view(app)
    return app


def auth_app(database: Path, instance: str, extra_config: dict[str, Any] | None = None,
             ) -> Flask:
    app = Flask("bench_llmauth", instance_path=instance)
    app.config.update(
        LLMAUTH_MASTER_KEY=keydb.BENCH_MASTER_KEY,
        LLMAUTH_DATABASE_URL=f"sqlite:///{database}",
        # The batched last_used_at write runs off the request path every 30 s by default;
        # pushed past the run so a flush of thousands of cold keys lands in no timed round.
        LLMAUTH_LAST_USED_FLUSH_INTERVAL=3600,
    )
    app.config.update(extra_config or {})
    LLMAuth(app)
    add_view(app)
    return app


class JSONEndpoint:
    """A loopback HTTP endpoint answering every GET and POST with ``document()`` as JSON;
    counts the calls it answers (the bench checks each cache filled exactly once)."""

    path = "/"

    def __init__(self) -> None:
        self.calls = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.calls += 1
                body = endpoint.document()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815 - http.server's name

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def document(self) -> bytes:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{self.path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class IntrospectionEndpoint(JSONEndpoint):
    """A loopback RFC 7662 endpoint for ``oauth2_cached``."""

    path = "/oauth2/introspect"

    def document(self) -> bytes:
        return json.dumps({"active": True, "sub": "bench-user", "team_id": "bench-team",
                           "scope": "llm", "exp": int(time.time()) + 86400}).encode()


class JwksEndpoint(JSONEndpoint):
    """A loopback JWKS endpoint for ``jwt_cached`` (one RSA key). The private key signs the
    bench token."""

    path = "/jwks.json"

    def __init__(self) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self.private_key.public_key()
        jwk = json.loads(RSAAlgorithm.to_jwk(self.public_key))
        self._document = json.dumps({"keys": [{**jwk, "kid": JWT_KID, "use": "sig",
                                               "alg": "RS256"}]}).encode()
        super().__init__()

    def document(self) -> bytes:
        return self._document

    def token(self) -> str:
        """An RS256 access token for a user of the bench team (valid for a day)."""
        now = int(time.time())
        return jwt.encode({"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "bench-jwt-user",
                           "email": "bench@corp.example", "team_id": "bench-team",
                           "scope": "llm", "iat": now, "exp": now + 86400},
                          self.private_key, algorithm="RS256",
                          headers={"kid": JWT_KID, "typ": "at+jwt"})

    def decode(self, token: str) -> dict[str, Any]:
        """``jwt.decode`` with the checks the extension makes, from a ready key object."""
        return jwt.decode(token, self.public_key, algorithms=["RS256"], audience=JWT_AUDIENCE,
                          issuer=JWT_ISSUER, options={"require": ["exp", "iss", "aud"]})


def add_team(app: Flask) -> None:
    """The team the OAuth2 and JWT tokens name, limited to two models."""
    response = app.test_client().post(
        "/team/new", json={"team_id": "bench-team", "models": ["gpt-4o", "gpt-4o-mini"]},
        headers=bearer(keydb.BENCH_MASTER_KEY))
    if response.status_code != 200:
        raise SystemExit(f"could not create the bench team: {response.get_data()!r}")


def jwt_app(instance: str, jwks_url: str, extra_config: dict[str, Any] | None) -> Flask:
    """The extension with JWT auth on (audience and issuer verified; the token's team claim
    names a team that limits its models)."""
    app = auth_app(Path(instance) / "jwt.db", instance, {
        **(extra_config or {}),
        "LLMAUTH_ENABLE_JWT_AUTH": True,
        "LLMAUTH_JWT_PUBLIC_KEY_URL": jwks_url,
        "LLMAUTH_JWT_AUDIENCE": JWT_AUDIENCE,
        "LLMAUTH_JWT_ISSUER": JWT_ISSUER,
        "LLMAUTH_JWT_TEAM_ID_FIELD": "team_id",
        "LLMAUTH_JWT_PUBLIC_KEY_TTL": 86400,
        "LLMAUTH_JWT_CACHE_TTL": 86400,
    })
    add_team(app)
    return app


def oauth2_app(instance: str, endpoint: str, extra_config: dict[str, Any] | None) -> Flask:
    """The extension with OAuth2 introspection on; the token's team limits its models."""
    app = auth_app(Path(instance) / "oauth2.db", instance, {
        **(extra_config or {}),
        "LLMAUTH_ENABLE_OAUTH2_AUTH": True,
        "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT": endpoint,
        "LLMAUTH_OAUTH2_CLIENT_ID": "bench",
        "LLMAUTH_OAUTH2_CLIENT_SECRET": "bench-client-secret-" + "s" * 16,
        "LLMAUTH_OAUTH2_CACHE_TTL": 86400,
    })
    add_team(app)
    return app


def environ(headers: dict[str, str]) -> dict[str, Any]:
    """A WSGI environ for one request (``wsgi.input`` is set per request)."""
    env = EnvironBuilder(path=PATH, method="POST", data=BODY, headers=list(headers.items()),
                         content_type="application/json").get_environ()
    del env["wsgi.input"]
    return env


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Workload:
    """The apps and the requests of every variant; cold keys are handed out once each."""

    def __init__(self, database: Path, key_count: int, seed: int = 1,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.instance = tempfile.mkdtemp(prefix="llmauth-bench-")
        self.introspection = IntrospectionEndpoint()
        self.jwks = JwksEndpoint()
        self.jwt_token = self.jwks.token()
        self.apps = {"bare": bare_app(),
                     "auth": auth_app(database, self.instance, extra_config),
                     "oauth2": oauth2_app(self.instance, self.introspection.url, extra_config),
                     "jwt": jwt_app(self.instance, self.jwks.url, extra_config)}
        self.cached_key = keydb.raw_key(0)
        self.headers = {
            "bare": bearer(self.cached_key),  # carried but ignored: same request bytes
            "master_key": bearer(keydb.BENCH_MASTER_KEY),
            "virtual_key_cached": bearer(self.cached_key),
            "oauth2_cached": bearer(OAUTH2_TOKEN),
            "jwt_cached": bearer(self.jwt_token),
        }
        self._cold = random.Random(seed)
        self._cold_seen: set[int] = {0}
        self.key_count = key_count

    def app_for(self, variant: str) -> Flask:
        if variant == "oauth2_cached":
            return self.apps["oauth2"]
        if variant == "jwt_cached":
            return self.apps["jwt"]
        return self.apps["bare" if variant == "bare" else "auth"]

    def check_introspection_cached(self) -> None:
        """The OAuth2 path must have asked its endpoint exactly once (the cache fill)."""
        if self.introspection.calls != 1:
            raise SystemExit(f"oauth2_cached: the introspection endpoint answered "
                             f"{self.introspection.calls} calls, expected 1 (a cache miss)")

    def check_jwks_cached(self) -> None:
        """The JWT path must have fetched its JWKS exactly once (the cache fill)."""
        if self.jwks.calls != 1:
            raise SystemExit(f"jwt_cached: the JWKS endpoint answered {self.jwks.calls} "
                             f"calls, expected 1 (a key cache miss)")

    def check_cached(self) -> None:
        self.check_introspection_cached()
        self.check_jwks_cached()

    def cold_keys(self, count: int) -> list[str]:
        """``count`` stored keys never presented before."""
        if len(self._cold_seen) + count > self.key_count:
            raise SystemExit("not enough distinct keys: raise --keys or lower --requests")
        out: list[str] = []
        while len(out) < count:
            index = self._cold.randrange(1, self.key_count)
            if index not in self._cold_seen:
                self._cold_seen.add(index)
                out.append(keydb.raw_key(index))
        return out

    def cold_headers(self, count: int) -> list[dict[str, str]]:
        """Headers with ``count`` stored keys never presented before."""
        return [bearer(key) for key in self.cold_keys(count)]

    def request_headers(self, variant: str, count: int) -> list[dict[str, str]]:
        if variant == "virtual_key_cold":
            return self.cold_headers(count)
        return [self.headers[variant]] * count

    def close(self) -> None:
        for name in ("auth", "oauth2", "jwt"):
            self.apps[name].extensions["llmauth"].close()
        self.introspection.close()
        self.jwks.close()
        shutil.rmtree(self.instance, ignore_errors=True)


# -- drivers -------------------------------------------------------------------------------

#: ``--gc-off``: the cyclic garbage collector is disabled during each timed loop (and run
#: between loops), which shows how much of a path's time its collections take.
GC_OFF = False
#: Minor page faults per request of each timed batch, by (driver, variant).
FAULTS: dict[tuple[str, str], list[float]] = {}


def _timed_loop_starts() -> None:
    gc.collect()
    if GC_OFF:
        gc.disable()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_wsgi(app: Flask, headers: Sequence[dict[str, str]],
             marker: Callable[[], object] = int) -> tuple[int, int]:
    """``(elapsed ns, non-200 responses)`` for one request per entry of ``headers``;
    ``marker`` is called right before and right after the timed loop."""
    templates = [environ(h) for h in headers] if len({id(h) for h in headers}) > 1 else (
        [environ(headers[0])] * len(headers))
    statuses: list[str] = []
    append = statuses.append

    def start_response(status: str, response_headers: Any, exc_info: Any = None) -> Any:
        append(status)

    _timed_loop_starts()
    marker()
    started = time.perf_counter_ns()
    for template in templates:
        env = dict(template)
        env["wsgi.input"] = BytesIO(BODY)
        result = app(env, start_response)
        for _ in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    elapsed = time.perf_counter_ns() - started
    marker()
    gc.enable()
    return elapsed, sum(1 for s in statuses if not s.startswith("200"))


def run_test_client(app: Flask, headers: Sequence[dict[str, str]],
                    marker: Callable[[], object] = int) -> tuple[int, int]:
    client = app.test_client()
    bad = 0
    _timed_loop_starts()
    marker()
    started = time.perf_counter_ns()
    for h in headers:
        response = client.post(PATH, data=BODY, headers=h, content_type="application/json")
        if response.status_code != 200:
            bad += 1
        response.close()
    elapsed = time.perf_counter_ns() - started
    marker()
    gc.enable()
    return elapsed, bad


DRIVER_FUNCTIONS: dict[str, Callable[..., tuple[int, int]]] = {
    "wsgi": run_wsgi, "test_client": run_test_client,
}


def measure(work: Workload, driver: str, variant: str, count: int,
            marker: Callable[[], object] = int) -> float:
    """µs per request for one batch (fails loudly if any request was not a 200)."""
    headers = work.request_headers(variant, count)
    faults = _minor_faults()
    elapsed, bad = DRIVER_FUNCTIONS[driver](work.app_for(variant), headers, marker)
    FAULTS.setdefault((driver, variant), []).append((_minor_faults() - faults) / count)
    if bad:
        raise SystemExit(f"{variant}/{driver}: {bad} of {count} requests were not 200")
    return elapsed / count / 1000


#: The sample key of the raw ``jwt.decode`` timing (not a request: one call per iteration).
RAW_DECODE = ("raw", "jwt_decode")


def measure_decode(work: Workload, count: int, marker: Callable[[], object] = int) -> float:
    """µs per ``jwt.decode`` of the bench's JWT (fails loudly if it does not verify)."""
    token, decode = work.jwt_token, work.jwks.decode
    if decode(token)["sub"] != "bench-jwt-user":
        raise SystemExit("jwt_decode: the bench token does not verify")
    gc.collect()
    marker()
    started = time.perf_counter_ns()
    for _ in range(count):
        decode(token)
    elapsed = time.perf_counter_ns() - started
    marker()
    return elapsed / count / 1000


def measure_any(work: Workload, driver: str, variant: str, count: int,
                marker: Callable[[], object] = int) -> float:
    if (driver, variant) == RAW_DECODE:
        return measure_decode(work, count, marker)
    return measure(work, driver, variant, count, marker)


def measure_spend_write(work: Workload, variant: str, count: int,
                        marker: Callable[[], object] = int) -> float | None:
    """µs per spend event of the ledger's batched write (the background thread's work for
    each LLM request when spend tracking is on; not in the per-request figures): ``count``
    requests of ``variant``, then one timed flush. ``None`` when spend tracking is off."""
    ledger = work.app_for(variant).extensions["llmauth"].spend_ledger
    if ledger is None:
        return None
    ledger.flush()
    measure(work, "wsgi", variant, count)
    pending = ledger.pending
    gc.collect()
    marker()
    started = time.perf_counter_ns()
    ledger.flush()
    elapsed = time.perf_counter_ns() - started
    marker()
    if ledger.pending or not pending:
        raise SystemExit(f"spend write: {pending} events queued, {ledger.pending} left")
    return elapsed / pending / 1000


#: Paths whose spend write is timed (a cached key's events update one key row per batch; cold
#: keys' events each update a different one of the 1,000,000 rows).
SPEND_WRITE_VARIANTS = ("virtual_key_cached", "virtual_key_cold")


# -- the report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
            f"Flask {version('flask')}, Werkzeug {version('werkzeug')}, "
            f"peewee {version('peewee')}, SQLite {sqlite3.sqlite_version}")


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def jwt_verdict(jwt_values: Sequence[float], bare: Sequence[float],
                decode: Sequence[float]) -> str:
    """What the JWT path adds over bare, in units of one raw ``jwt.decode`` (median of the
    per-round quotients), and whether that meets the 1.15 bar."""
    quotients = [(j - b) / d for j, b, d in zip(jwt_values, bare, decode, strict=True)]
    added = statistics.median(quotients)
    return f"adds {added:.2f} × jwt.decode ({'met' if added <= 1.15 else 'NOT met'})"


def report(samples: dict[tuple[str, str], list[float]], rounds: int, count: int,
           instructions: dict[str, float] | None,
           spend_write: dict[str, float | None] | None = None) -> str:
    lines = ["| path | driver | median µs/request | min | × bare (median of rounds) | target |",
             "|---|---|---:|---:|---:|---|"]
    for driver in DRIVERS:
        bare = samples[(driver, "bare")]
        for variant in VARIANTS:
            values = samples[(driver, variant)]
            ratios = [v / b for v, b in zip(values, bare, strict=True)]
            target = TARGETS.get(variant, "")
            if variant == "virtual_key_cold":
                cached = samples[(driver, "virtual_key_cached")]
                added = statistics.median(v - c for v, c in zip(values, cached, strict=True))
                target = f"{target}: adds {added:.1f} µs over a cached key"
            if variant == "jwt_cached":
                target = f"{target}: {jwt_verdict(values, bare, samples[RAW_DECODE])}"
            lines.append(f"| {variant} | {driver} | {statistics.median(values):.1f} | "
                         f"{min(values):.1f} | {statistics.median(ratios):.3f} | {target} |")
    decode = samples[RAW_DECODE]
    lines.append(f"| jwt.decode alone (RS256, same token) | raw | {statistics.median(decode):.1f} "
                 f"| {min(decode):.1f} | | |")
    out = "\n".join(lines)
    out += f"\n\n{rounds} interleaved rounds × {count} requests per variant and driver"
    out += " (cyclic garbage collector off in the timed loops).\n" if GC_OFF else ".\n"
    faults = [f"{variant} {statistics.median(FAULTS[('wsgi', variant)]):.2f}"
              for variant in ("virtual_key_cached", "virtual_key_cold")
              if FAULTS.get(("wsgi", variant))]
    if faults:
        out += f"Minor page faults per request (wsgi, median of batches): {', '.join(faults)}.\n"
    if spend_write and any(v is not None for v in spend_write.values()):
        out += ("\nSpend ledger's batched write, per event (background thread, not in the "
                "figures above):\n\n| path | µs per event | instructions per event |\n"
                "|---|---:|---:|\n")
        for variant in SPEND_WRITE_VARIANTS:
            value = spend_write.get(variant)
            counted = (instructions or {}).get(f"spend_write:{variant}")
            if value is not None:
                out += (f"| {variant} | {value:.1f} | "
                        f"{'' if counted is None else f'{counted:,.0f}'} |\n")
    if instructions:
        base = instructions["bare"]
        rows = ["| path | instructions/request (wsgi) | × bare | added |", "|---|---:|---:|---:|"]
        for variant in VARIANTS:
            value = instructions[variant]
            rows.append(f"| {variant} | {value:,.0f} | {value / base:.3f} | "
                        f"{value - base:+,.0f} |")
        decode_count = instructions["jwt_decode"]
        added = (instructions["jwt_cached"] - base) / decode_count
        rows.append(f"| jwt.decode alone (one call) | {decode_count:,.0f} | | |")
        verdict = (f"\nBy instructions, jwt_cached adds {added:.2f} × one jwt.decode over bare "
                   f"(target ≤ 1.15: {'met' if added <= 1.15 else 'NOT met'}).\n")
        out += ("\nInstructions per request (valgrind --tool=callgrind, counted between "
                "markers around each timed loop of 1,000 requests):\n\n")
        out += "\n".join(rows) + "\n" + verdict
        parts = [(label, instructions[f"cold_part:{part}"]) for part, label in COLD_PARTS.items()
                 if f"cold_part:{part}" in instructions]
        if parts:
            added = instructions["virtual_key_cold"] - instructions["virtual_key_cached"]
            out += (f"\nWhere a cold key's {added:,.0f} instructions over a cached one go "
                    "(per call, each on a fresh key, 1,000 calls):\n\n"
                    "| piece | instructions/call |\n|---|---:|\n")
            out += "".join(f"| {label} | {value:,.0f} |\n" for label, value in parts)
    return out


# -- Python bytecodes ------------------------------------------------------------------------------


def bytecodes(work: Workload, count: int = 50) -> dict[str, float]:
    """Python bytecodes executed per request of each variant (wsgi driver), between the
    timed loop's markers (see ``bench/opcodes.py``)."""
    counter = OpcodeCounter()
    result = {}
    for variant in VARIANTS:
        measure(work, "wsgi", variant, 20)  # warm (a cold key's loop uses fresh keys)
        counter.count = 0
        try:
            measure(work, "wsgi", variant, count, marker=counter.marker)
        finally:
            sys.settrace(None)
        result[variant] = counter.count / count
    return result


def bytecode_report(counts: dict[str, float]) -> str:
    base = counts["bare"]
    rows = ["| path | bytecodes/request (wsgi) | × bare | added |", "|---|---:|---:|---:|"]
    rows += [f"| {variant} | {counts[variant]:,.0f} | {counts[variant] / base:.3f} | "
             f"{counts[variant] - base:+,.0f} |" for variant in VARIANTS]
    return ("\nPython bytecodes per request (sys.settrace opcode events in the timed loop; "
            "work done in C is not counted):\n\n" + "\n".join(rows) + "\n")


# -- instruction counts ----------------------------------------------------------------------------

def _cold_part(work: Workload, part: str, count: int) -> Callable[[], object]:
    """``count`` calls of one piece of a cold key's request, each on a fresh key (the inputs
    are prepared here, outside the count)."""
    app = work.apps["auth"]
    state = app.extensions["llmauth"]
    store, digester = state.store, state.digester
    authenticator = state.authenticators["virtual_key"]
    authenticator = getattr(authenticator, "inner", authenticator)  # KeyValidation's
    keys = work.cold_keys(count)
    if part == "digest":
        return lambda: [digester.digest(key) for key in keys]
    digests = [digester.digest(key) for key in keys]
    if part == "statement":
        sql = store._key_sql["digest"]

        def statement() -> None:
            for digest in digests:
                store._cursor().execute(sql, (digest,)).fetchone()
        return statement
    if part == "lookup":
        return lambda: [store.key_by_digest(digest) for digest in digests]
    if part == "load":
        pairs = [(digest, state.cache_keyer(key))
                 for digest, key in zip(digests, keys, strict=True)]
        return lambda: [authenticator.load(digest, cache_key) for digest, cache_key in pairs]
    from flask_llmauth.authn.virtual_key import key_principal

    principals = [key_principal(store.key_by_digest(digest)) for digest in digests]
    if part == "denial":
        return lambda: [state.models.denial(principal, "gpt-4o") for principal in principals]
    rule = next(r for r in app.url_map.iter_rules() if r.rule == PATH)
    info = state.routes.info(rule, app.view_functions[rule.endpoint])
    call = state._verdict if part == "verdict" else state.guards.plan

    def in_request() -> None:
        with app.test_request_context(PATH, method="POST"):
            for principal in principals:
                call(principal, info, True)
    return in_request


#: ``--cold-parts``: pieces of a cold key's request counted one by one under callgrind.
COLD_PARTS = {
    "digest": "HMAC digest of the presented key (`KeyDigester.digest`)",
    "statement": "the lookup statement, executed and fetched",
    "lookup": "`Store.key_by_digest` (the statement and the records)",
    "load": "`VirtualKeyAuthenticator.load` (lookup, principal, cache fill)",
    "verdict": "a new principal's verdict (`LLMAuthState._verdict`)",
    "plan": "of which the guards' plan (`Guards.plan`)",
    "denial": "a new principal's model check (`ModelAccess.denial`)",
}


#: callgrind dumps its counters whenever this libc function is entered; the child process
#: calls it (``os.getppid()``) right before and right after each timed loop.
_MARKER = "getppid"


def instructions(database: Path, count: int, warmup: int,
                 config: dict[str, Any] | None = None,
                 cold_parts: bool = False) -> dict[str, float]:
    """Instructions per request of each variant (wsgi driver), from one callgrind run (and
    per call of each of :data:`COLD_PARTS`, run last, when ``cold_parts``)."""
    with tempfile.TemporaryDirectory(prefix="llmauth-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--dump-before={_MARKER}",
                f"--callgrind-out-file={out}", sys.executable, str(Path(__file__).resolve()),
                "--callgrind-child", "--count", str(count), "--warmup", str(warmup),
                "--database", str(database), "--config", json.dumps(config or {})]
        if cold_parts:
            argv.append("--cold-parts")
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"callgrind run failed:\n{done.stderr[-3000:]}")
        result = {}
        for index, variant in enumerate(VARIANTS):
            # dump 2k+1 ends at the marker before loop k, dump 2k+2 at the one after it
            text = Path(f"{out}.{2 * index + 2}").read_text()
            match = re.search(r"^totals: (\d+)", text, re.MULTILINE)
            if match is None:
                raise SystemExit("unexpected callgrind output")
            result[variant] = int(match.group(1)) / count
        text = Path(f"{out}.{2 * len(VARIANTS) + 2}").read_text()
        match = re.search(r"^totals: (\d+)", text, re.MULTILINE)
        if match is None:
            raise SystemExit("unexpected callgrind output")
        result["jwt_decode"] = int(match.group(1)) / count
        for index, variant in enumerate(SPEND_WRITE_VARIANTS):
            dump = Path(f"{out}.{2 * (len(VARIANTS) + 1 + index) + 2}")
            if dump.exists():  # absent when spend tracking is off
                found = re.search(r"^totals: (\d+)", dump.read_text(), re.MULTILINE)
                if found is not None:
                    result[f"spend_write:{variant}"] = int(found.group(1)) / count
        if cold_parts:  # the last loops: dump 2k (numbered from 1) ends loop k
            last = max(int(p.suffix[1:]) for p in Path(tmp).glob("callgrind.out.*"))
            for index, part in enumerate(COLD_PARTS):
                dump = Path(f"{out}.{last - 2 * len(COLD_PARTS) + 2 * index + 2}")
                found = re.search(r"^totals: (\d+)", dump.read_text(), re.MULTILINE)
                if found is None:
                    raise SystemExit("unexpected callgrind output")
                result[f"cold_part:{part}"] = int(found.group(1)) / count
        return result


def callgrind_child(database: Path, count: int, warmup: int,
                    config: dict[str, Any], cold_parts: bool = False) -> None:
    """Warm every variant up, then run ``count`` requests of each between two markers."""
    key_count = int(keydb._meta(database).get("count", "0"))
    # The invalidation-log poll and the spend flush run once a second of wall-clock time,
    # and a run under valgrind is ~50x slower: keep that background work out of the
    # per-request counts (the spend flush's own cost per row is in docs/spend.md).
    work = Workload(database, key_count,
                    extra_config={"LLMAUTH_CACHE_SYNC_INTERVAL": 3600,
                                  "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600, **config})
    try:
        for variant in VARIANTS:
            measure(work, "wsgi", variant, warmup)
        measure_decode(work, warmup)
        for variant in VARIANTS:
            measure(work, "wsgi", variant, count, marker=os.getppid)
        measure_decode(work, count, marker=os.getppid)
        for variant in SPEND_WRITE_VARIANTS:
            measure_spend_write(work, variant, count, marker=os.getppid)
        for part in COLD_PARTS if cold_parts else ():
            run = _cold_part(work, part, count)
            run()  # the code warm, a first batch of fresh keys (not counted)
            run = _cold_part(work, part, count)
            gc.collect()
            os.getppid()
            run()
            os.getppid()
        work.check_cached()
    finally:
        work.close()


# -- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per variant, driver and round (2000)")
    parser.add_argument("--keys", type=int, default=1_000_000,
                        help="keys in the cold-lookup database (1,000,000)")
    parser.add_argument("--callgrind", action="store_true",
                        help="also count instructions per request with valgrind")
    parser.add_argument("--config", type=json.loads, default={},
                        help="extra settings for the extension's app, as a JSON object "
                             "(e.g. '{\"LLMAUTH_RATELIMIT_ENABLED\": false}')")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gc-off", action="store_true",
                        help="disable the cyclic garbage collector during the timed loops "
                             "(shows what its collections cost each path)")
    parser.add_argument("--db-dir", type=Path, default=HERE,
                        help="where the key database is built and kept (bench/)")
    parser.add_argument("--cold-parts", action="store_true",
                        help="with --callgrind: also count the pieces of a cold key's request "
                             "one by one (digest, statement, lookup, load, verdict, model "
                             "check)")
    parser.add_argument("--bytecodes", action="store_true",
                        help="also count the Python bytecodes each path executes per request "
                             "(deterministic; wall time follows them closely)")
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--database", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.callgrind_child:
        callgrind_child(args.database, args.count, args.warmup, args.config, args.cold_parts)
        return ""

    global GC_OFF
    GC_OFF = args.gc_off
    database = keydb.ensure(args.db_dir / f"keys-{args.keys}.db", args.keys)
    print(f"machine: {machine()}")
    print(f"load average at start: {load()}")
    work = Workload(database, args.keys, seed=args.seed, extra_config=args.config)
    order = [(d, v) for d in DRIVERS for v in VARIANTS] + [RAW_DECODE]
    samples: dict[tuple[str, str], list[float]] = {pair: [] for pair in order}
    shuffler = random.Random(args.seed)
    try:
        for driver, variant in order:  # warm-up round, discarded
            measure_any(work, driver, variant, max(50, args.requests // 4))
        for number in range(args.rounds):
            shuffler.shuffle(order)
            for driver, variant in order:
                samples[(driver, variant)].append(
                    measure_any(work, driver, variant, args.requests))
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
        work.check_cached()
        spend_write = {variant: measure_spend_write(work, variant, args.requests)
                       for variant in SPEND_WRITE_VARIANTS}
        opcodes = bytecodes(work) if args.bytecodes else None
    finally:
        work.close()
    print(f"load average at end: {load()}")
    counts = None
    if args.callgrind:
        if shutil.which("valgrind") is None:
            print("valgrind not found: no instruction counts")
        else:
            print("counting instructions under valgrind (a few minutes) ...", file=sys.stderr)
            counts = instructions(database, count=1000, warmup=300, config=args.config,
                                  cold_parts=args.cold_parts)
    text = report(samples, args.rounds, args.requests, counts, spend_write)
    if opcodes is not None:
        text += bytecode_report(opcodes)
    print()
    print(text)
    return text


if __name__ == "__main__":
    main()
