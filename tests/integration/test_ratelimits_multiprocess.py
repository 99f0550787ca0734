"""Rate limits across processes: the example gateway under gunicorn (2 workers x 8 threads)
with the real Redis — exact admission under a burst, tpm across workers, independent keys,
the failed-authentication limit, and Redis stopped mid-run (our own redis-server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask

from flask_llmauth import LLMAuth
from tests.conftest import POSTGRES_URL, REDIS_URL, fresh_postgres_database
from tests.helpers import MASTER_KEY, bearer, new_key, random_key
from tests.idp_fixture import peer_missing

pytestmark = [pytest.mark.integration, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
WORKERS, THREADS = 2, 8
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
GUNICORN_CONF = """
import gc
import os
def post_worker_init(worker):
    open(os.path.join({ready!r}, str(worker.pid)), "w").close()
def worker_exit(server, worker):  # as tests/integration/gunicorn_hooks.py: a prompt exit
    gc.freeze()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """``gunicorn 'example_app:create_app()'`` on a free port, with its logs."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready = tmp / "ready"
        self.ready.mkdir()
        self.access_log = tmp / "access.log"
        self.error_log = tmp / "error.log"
        conf = tmp / "gunicorn_conf.py"
        conf.write_text(GUNICORN_CONF.format(ready=str(self.ready)))
        gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
        if gunicorn is None:
            peer_missing("gunicorn is not installed (pip install -e '.[test]')")
        self.proc = subprocess.Popen(
            [gunicorn, "-c", str(conf), "-w", str(WORKERS), "-k", "gthread",
             "--threads", str(THREADS), "-b", f"127.0.0.1:{self.port}", "--backlog", "256",
             "--graceful-timeout", "3",
             "--access-logfile", str(self.access_log), "--access-logformat",
             "%(p)s %(s)s %({x-test-request}i)s",
             "--error-logfile", str(self.error_log), "example_app:create_app()"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr.log", "wb"),  # noqa: SIM115
            start_new_session=True,  # its own process group: stop() can reach every worker
        )
        deadline = time.time() + 30
        while len(list(self.ready.iterdir())) < WORKERS:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError("gunicorn did not start:\n" + self.logs())
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in
                         (self.tmp / "stderr.log", self.error_log) if p.exists())

    def worker_pids(self) -> set[str]:
        return {p.name for p in self.ready.iterdir()}

    def worker_of(self, marker: str, timeout: float = 10) -> str:
        """The pid of the worker that answered the request sent with ``X-Test-Request:
        marker`` (its access-log line may be written just after the client has the answer)."""
        deadline = time.time() + timeout
        while True:
            for line in self.access_log.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[2] == marker:
                    return parts[0].strip("<>")
            if time.time() > deadline:
                raise AssertionError(f"request {marker} never reached the access log")
            time.sleep(0.02)

    def served_by(self) -> dict[str, int]:
        """How many requests each worker pid answered (from the access log)."""
        counts: dict[str, int] = {}
        for line in self.access_log.read_text().splitlines():
            pid = line.split()[0].strip("<>")
            counts[pid] = counts.get(pid, 0) + 1
        return counts

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL to the whole process group, so that no
        worker outlives the test holding database sessions. Not SIGINT: gunicorn's
        quick-shutdown handler shuts the gthread pool down inside the signal handler, which
        deadlocks a worker interrupted while it was submitting a connection to that pool."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # master and workers have all exited
        self.proc.wait()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One database for the module: a fresh Postgres database when configured (dumped for
    leaks, then dropped), else SQLite."""
    if not POSTGRES_URL:
        yield f"sqlite:///{tmp_path_factory.mktemp('db')}/gateway.db"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def prefix() -> str:
    if not REDIS_URL:
        peer_missing("LLMAUTH_TEST_REDIS_URL is not set (.ci/run sets it)")
    return f"llmauth-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def admin(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A test client of an in-process app on the same database (keys are created with it);
    building it migrates the database before any worker starts."""
    app = Flask("ratelimit_admin", instance_path=str(tmp_path_factory.mktemp("instance")))
    app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY, LLMAUTH_DATABASE_URL=database)
    LLMAuth(app)
    yield app.test_client()
    app.extensions["llmauth"].close()


@pytest.fixture(scope="module")
def start(database: str, prefix: str, admin: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Callable[..., Gateway]]:
    """``start(**env)`` → a running gunicorn gateway (stopped at the end of the module)."""
    started: list[Gateway] = []

    def make(**env: Any) -> Gateway:
        values = {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": database,
                  "LLMAUTH_RATELIMIT_STORAGE_URI": REDIS_URL, "LLMAUTH_RATELIMIT_KEY_PREFIX":
                  prefix, "LLMAUTH_CACHE_SYNC_INTERVAL": "0.2"}
        values.update({k: str(v) for k, v in env.items()})
        gw = Gateway(tmp_path_factory.mktemp("gateway"), values)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def shared(start: Callable[..., Gateway]) -> Gateway:
    """The gateway most tests share (each test uses keys of its own)."""
    return start(LLMAUTH_AUTH_FAILURE_LIMIT="10/minute")


def burst(url: str, headers_list: list[dict[str, str]]) -> list[requests.Response]:
    """Send one request per entry, each on its own connection and thread, released together."""
    barrier = threading.Barrier(len(headers_list))
    results: list[Any] = [None] * len(headers_list)

    def send(i: int) -> None:
        barrier.wait()
        try:
            results[i] = requests.post(url + "/v1/chat/completions", json=CHAT,
                                       headers=headers_list[i], timeout=30)
        except requests.RequestException as exc:  # reported by the caller's assertions
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(headers_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def codes(responses: list[Any]) -> list[int]:
    return sorted(getattr(r, "status_code", -1) for r in responses)


def test_burst_of_3l_admits_exactly_l_per_key_across_workers(shared: Gateway,
                                                             admin: Any) -> None:
    gw = shared
    limit = 20
    a = new_key(admin, rpm_limit=limit)["key"]
    b = new_key(admin, rpm_limit=limit)["key"]
    responses = burst(gw.url, [bearer(a)] * (3 * limit) + [bearer(b)] * (3 * limit))
    for key, part in ((a, responses[:3 * limit]), (b, responses[3 * limit:])):
        assert codes(part) == [200] * limit + [429] * (2 * limit), key[:6]
        for r in part:
            if r.status_code == 429:
                assert 0 <= int(r.headers["Retry-After"]) <= 60
                assert r.json()["error"]["message"].startswith("Rate limit exceeded for key: ")
    served = gw.served_by()
    assert len(served) == WORKERS and min(served.values()) > 0, served  # both workers counted


def test_headers_never_increase_within_a_window_across_workers(shared: Gateway,
                                                               admin: Any) -> None:
    gw = shared
    key = new_key(admin, rpm_limit=12)["key"]
    remaining = []
    for _ in range(14):
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers={
            **bearer(key), "Connection": "close"}, timeout=10)  # new connection: any worker
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        assert 0 <= int(r.headers.get("Retry-After", "0"))
    assert remaining == list(range(11, -1, -1)) + [0, 0]


def test_tpm_is_charged_exactly_across_workers(shared: Gateway, admin: Any,
                                               prefix: str) -> None:
    gw = shared
    limit = 300
    body = new_key(admin, tpm_limit=limit)
    key = body["key"]
    spent, statuses = 0, []
    for _ in range(40):
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers={
            **bearer(key), "Connection": "close"}, timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 200:
            spent += r.json()["usage"]["total_tokens"]
    per_request = spent // statuses.count(200)
    admitted = -(-limit // per_request)  # the request that overshoots is still admitted
    assert statuses == [200] * admitted + [429] * (40 - admitted)
    client = redis.Redis.from_url(REDIS_URL)
    ident = body["key_id"]
    counters = list(client.scan_iter(f"LIMITS:LLMAUTH/{prefix}/key/{ident}/tpm/*"))
    assert len(counters) == 1
    assert int(client.get(counters[0])) == spent  # every worker's charge, exactly once
    assert len(gw.served_by()) == WORKERS


def test_stream_is_charged_at_stream_end_across_workers(shared: Gateway, admin: Any) -> None:
    gw = shared
    key = new_key(admin, tpm_limit=30)["key"]
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "x" * 200}]}
    with requests.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(key),
                       stream=True, timeout=10) as r:
        assert r.status_code == 200
        assert b"[DONE]" in b"".join(r.iter_content(None))
    deadline = time.time() + 5
    while True:  # the charge lands right after the last chunk: another worker sees it
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT,
                          headers={**bearer(key), "Connection": "close"}, timeout=10)
        if r.status_code == 429 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 429 and "Limit type: tokens" in r.json()["error"]["message"]


def test_failed_authentications_are_counted_across_workers(shared: Gateway) -> None:
    """10/minute per IP, counted in Redis: the first 10 failures are checked wherever they
    land; then each worker checks at most one more credential (it learns of the block at the
    IP's next failure there) and refuses everything after it with 429. Which worker accepts
    a connection is up to the kernel (a loaded machine may keep one worker busy for many
    requests), so the test follows each request to its worker and sends failures until every
    worker has refused one."""
    gw = shared
    limit = 10
    statuses: list[int] = []
    by_worker: dict[str, list[int]] = {}

    def fail_once(credential: str) -> int:
        marker = uuid.uuid4().hex
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10, headers={
            **bearer(credential), "Connection": "close", "X-Test-Request": marker,
            "X-Forwarded-For": f"10.9.9.{len(statuses) % 250}"})  # untrusted: not the IP
        statuses.append(r.status_code)
        if len(statuses) > limit:
            by_worker.setdefault(gw.worker_of(marker), []).append(r.status_code)
        return r.status_code

    for _ in range(limit):
        fail_once(random_key())
    assert statuses == [401] * limit, statuses  # every failure below the limit is checked
    deadline = time.time() + 30  # well inside the 60 s window opened by the first failure
    while len(by_worker) < WORKERS or any(429 not in s for s in by_worker.values()):
        assert time.time() < deadline and len(statuses) < 200, (statuses, by_worker)
        fail_once(random_key())
    for pid, seen in by_worker.items():
        # one more credential checked at most, and only before the worker's first refusal
        assert seen in ([429] * len(seen), [401] + [429] * (len(seen) - 1)), (pid, seen)
    # both workers refuse although together they checked ≤ limit + WORKERS - 1 credentials:
    # the count is shared, not per process
    assert limit <= statuses.count(401) <= limit + WORKERS - 1, statuses
    for _ in range(2 * WORKERS):
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers={
            **bearer(MASTER_KEY), "Connection": "close"}, timeout=10)
        assert r.status_code == 429  # refused before the credential is looked at


def test_redis_cluster_admits_exactly_and_charges_tpm_exactly_across_workers(
        start: Any, admin: Any, redis_cluster_url: str) -> None:
    """On a real three-node Redis Cluster each counter is its own storage call (a request's
    keys may sit on different nodes): a burst of 3L still admits exactly L, and every
    worker's tpm charge counts exactly once."""
    gw = start(LLMAUTH_RATELIMIT_STORAGE_URI=redis_cluster_url)
    limit = 20
    key = new_key(admin, rpm_limit=limit)["key"]
    assert codes(burst(gw.url, [bearer(key)] * (3 * limit))) == [200] * limit + [429] * (
        2 * limit)
    tpm = 100_000
    key = new_key(admin, tpm_limit=tpm)["key"]
    spent = 0
    for _ in range(30):
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers={
            **bearer(key), "Connection": "close"}, timeout=10)  # new connection: any worker
        assert r.status_code == 200
        spent += r.json()["usage"]["total_tokens"]
    r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bearer(key),
                      timeout=10)
    # the tokens left when this request was admitted: every charge before it, once each
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == tpm - spent
    served = gw.served_by()
    assert len(served) == WORKERS and min(served.values()) > 0, served
    assert "Traceback" not in gw.logs()


def test_memory_storage_with_two_workers_warns_in_every_worker(start: Any) -> None:
    gw = start(LLMAUTH_RATELIMIT_STORAGE_URI="memory://")
    logs = gw.logs()
    assert logs.count("worker processes serve this app (gunicorn --workers)") == WORKERS, logs


# -- Redis stopped mid-run -------------------------------------------------------------------


@contextmanager
def own_redis(port: int) -> Iterator[subprocess.Popen[bytes]]:
    server = shutil.which("redis-server")
    if server is None:
        peer_missing("redis-server is not installed")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.time() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_redis_stopped_mid_run_fails_closed_then_recovers(start: Any, admin: Any) -> None:
    port = free_port()
    with own_redis(port) as first:
        gw = start(LLMAUTH_RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{port}/0",
                   LLMAUTH_RATELIMIT_RETRY_INTERVAL="0.5")
        limited = new_key(admin, rpm_limit=1000)["key"]
        free = new_key(admin)["key"]
        assert codes(burst(gw.url, [bearer(limited)] * 16)) == [200] * 16
        first.terminate()
        first.wait(timeout=10)
        down = burst(gw.url, [bearer(limited)] * 24 + [bearer(free)] * 8)
        assert codes(down) == [200] * 8 + [503] * 24  # never a 500, never a hang
        for r in down:
            if r.status_code == 503:
                assert r.json()["error"]["type"] == "service_unavailable"
                assert r.headers["Retry-After"] == "1"
        assert gw.proc.poll() is None
    with own_redis(port):
        # each worker probes the storage again once its own retry interval has passed since
        # its last failure (a worker whose last failure came late in the burst answers 503 a
        # little longer): wait until every worker has admitted a limited request again
        recovered: set[str] = set()
        seen: list[int] = []
        deadline = time.time() + 30
        while recovered != gw.worker_pids():
            assert time.time() < deadline, (seen, recovered, gw.worker_pids())
            marker = uuid.uuid4().hex
            r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10, headers={
                **bearer(limited), "Connection": "close", "X-Test-Request": marker})
            seen.append(r.status_code)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:
                recovered.add(gw.worker_of(marker))
            else:
                time.sleep(0.1)
        assert codes(burst(gw.url, [bearer(limited)] * 16)) == [200] * 16
    logs = gw.logs()
    assert "rate-limit storage is unreachable" in logs
    assert "rate-limit storage answers again" in logs
    assert gw.worker_pids() == set(gw.served_by())  # no worker died and was replaced
