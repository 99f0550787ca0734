#!/usr/bin/env python3
"""Per-request cost of the full chain with rate limits, next to a bare Flask route.

    python bench/limits_bench.py                       # memory:// and Redis (if it answers)
    python bench/limits_bench.py --redis-url redis://127.0.0.1:6379/0 --rounds 15
    python bench/limits_bench.py --callgrind           # instructions per request (valgrind)
    python bench/limits_bench.py --bytecodes           # Python bytecodes per request

The same view (``POST /v1/chat/completions``: parse the JSON body, answer an OpenAI-shaped
JSON with a ``usage`` block; ``--answer-chars N`` puts an answer of N characters in it) is
driven through the WSGI app directly with a prepared environ:

* ``bare``: Flask without the extension;
* ``key, rate limits off``: the extension, a cached virtual key (credential, chain, RBAC,
  model check), ``LLMAUTH_RATELIMIT_ENABLED=False``;
* ``key``: the same key without limits, rate limits on (the guard admits it without touching
  the storage);
* ``key+limits/memory``: a cached key with ``rpm_limit``, ``tpm_limit`` and
  ``max_parallel_requests`` on ``memory://`` — per request: rpm increment, tpm read, parallel
  slot, then after the response the tpm charge (usage read from the body) and the slot
  release;
* ``key+limits/redis``: the same on Redis (each of those is a round trip);
* ``key+budget+limits/memory`` and ``/redis``: the same key with a ``max_budget`` too — the
  worst-case cost is admitted in memory against the process's budget lease (one database
  transaction per ``LLMAUTH_BUDGET_LEASE_REQUESTS`` requests; SQLite here: ``--db-url`` for
  Postgres), and the spend ledger's batch writes the real spend;
* ``key+budget+rpm/memory``: a key with a ``max_budget`` and an ``rpm_limit`` only — the
  chain issue 4 names (a budget and an rpm limit), without the tpm and parallel-slot work;
* ``key+budget(no leases)+limits/memory``: the same with ``LLMAUTH_BUDGET_LEASE_REQUESTS=0``
  — one reservation transaction per request (the exact mode).

Rounds are interleaved in a shuffled order; the report gives the median µs per request and
the median of the per-round ratios to ``bare``, and for the Redis variants the commands sent
to Redis per request (counted in the client: each is one round trip). Redis keys are written
under a unique prefix and deleted afterwards (never a FLUSH).

``--callgrind`` counts instructions per request instead (deterministic, unlike time): one
valgrind run warms every variant up, then runs ``--requests`` requests of each between two
markers. ``--bytecodes`` counts the Python bytecodes each variant executes per request
(``sys.settrace`` opcode events over ``--requests`` requests after a warm-up, background
work as under callgrind): deterministic like instructions, and wall time follows them more
closely (work done in C is not counted).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):  # the checkout's package, and opcodes beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from flask import Flask, request  # noqa: E402
from opcodes import OpcodeCounter  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from flask_llmauth import LLMAuth  # noqa: E402

PATH = "/v1/chat/completions"
BODY = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}], '
        b'"max_tokens": 64, "temperature": 0}')
MASTER_KEY = "sk-bench-" + "Rl7Qw2Ex9Tn4Vb6Mc1Kd8Fh3Jg5Hs0Pa"
#: The bar of issue 4: the full chain (cached key, budget, rate limits) against bare Flask —
#: as the issue names it (a budget and an rpm limit) and with every limit kind.
TARGET = {"key+budget+rpm/memory": "≤ 1.25×", "key+budget+limits/memory": "≤ 1.25×"}


#: The answer's text (``--answer-chars``): none by default, the choices empty.
ANSWER = ""


def add_view(app: Flask) -> None:
    @app.post(PATH)
    def chat_completions() -> Any:
        body = request.get_json()
        choices = [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                    "finish_reason": "stop"}] if ANSWER else []
        return {"object": "chat.completion", "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}


def bare_app() -> Flask:
    app = Flask("bench_bare")
    add_view(app)
    return app


def auth_app(instance: str, storage: str, prefix: str, db_url: str | None = None,
             **config: Any) -> Flask:
    os.makedirs(instance, exist_ok=True)
    app = Flask(f"bench_{prefix}", instance_path=instance)
    app.config.update(
        LLMAUTH_MASTER_KEY=MASTER_KEY,
        LLMAUTH_DATABASE_URL=db_url or f"sqlite:///{instance}/bench.db",
        LLMAUTH_LAST_USED_FLUSH_INTERVAL=3600,
        LLMAUTH_RATELIMIT_STORAGE_URI=storage,
        LLMAUTH_RATELIMIT_KEY_PREFIX=prefix,
        **config,
    )
    LLMAuth(app)
    add_view(app)
    return app


def new_key(app: Flask, **fields: Any) -> str:
    response = app.test_client().post("/key/generate", json=fields,
                                      headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert response.status_code == 200, response.get_json()
    return str(response.get_json()["key"])


def environ(key: str) -> dict[str, Any]:
    env = EnvironBuilder(path=PATH, method="POST", data=BODY,
                         headers=[("Authorization", f"Bearer {key}")],
                         content_type="application/json").get_environ()
    del env["wsgi.input"]
    return env


def run(app: Flask, template: dict[str, Any], count: int,
        marker: Callable[[], object] = int) -> tuple[float, float]:
    """``(wall, CPU)`` µs per request for ``count`` requests (fails loudly on any non-200).

    CPU is this thread's CPU time: on a busy machine it moves far less than wall time.
    ``marker`` is called right before and right after the loop."""
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)

    gc.collect()
    marker()
    started, cpu_started = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(count):
        env = dict(template)
        env["wsgi.input"] = BytesIO(BODY)
        result = app(env, start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    elapsed = time.perf_counter_ns() - started
    cpu = time.thread_time_ns() - cpu_started
    marker()
    bad = [s for s in statuses if not s.startswith("200")]
    if bad:
        raise SystemExit(f"{len(bad)} of {count} requests failed: {bad[0]}")
    return elapsed / count / 1000, cpu / count / 1000


def redis_answers(url: str) -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


class RoundTrips:
    """Counts the commands the Redis client sends (a pipeline or script call is one)."""

    def __init__(self) -> None:
        self.count = 0
        try:
            from redis.connection import AbstractConnection
        except ImportError:  # no redis client: nothing to count
            return
        send = AbstractConnection.send_packed_command

        def counted(connection: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            send(connection, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


class Bench:
    """The apps and request templates of every variant."""

    def __init__(self, redis_url: str, db_url: str | None,
                 config: dict[str, Any] | None = None) -> None:
        self.instance = tempfile.mkdtemp(prefix="llmauth-limits-bench-")
        self.prefix = prefix = f"llmauth-bench-{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        instance = self.instance
        extra = config or {}
        limits = {"rpm_limit": 10**9, "tpm_limit": 10**12, "max_parallel_requests": 1000}
        self.apps: dict[str, Flask] = {"bare": bare_app()}
        memory_app = auth_app(f"{instance}/m", "memory://", prefix, **extra)
        self.apps["key"] = self.apps["key+limits/memory"] = memory_app
        self.apps["key, rate limits off"] = off_app = auth_app(
            f"{instance}/off", "memory://", prefix, LLMAUTH_RATELIMIT_ENABLED=False,
            **extra)
        self.templates = {"bare": environ(new_key(memory_app)),
                          "key, rate limits off": environ(new_key(off_app)),
                          "key": environ(new_key(memory_app)),
                          "key+limits/memory": environ(new_key(memory_app, **limits))}
        budget = {**limits, "max_budget": 10**6}
        rpm_budget = {"rpm_limit": 10**9, "max_budget": 10**6}
        rpm_budget_app = auth_app(f"{instance}/rpmb", "memory://", prefix, db_url, **extra)
        self.apps["key+budget+rpm/memory"] = rpm_budget_app
        self.templates["key+budget+rpm/memory"] = environ(new_key(rpm_budget_app, **rpm_budget))
        budget_app = auth_app(f"{instance}/b", "memory://", prefix, db_url, **extra)
        self.apps["key+budget+limits/memory"] = budget_app
        self.templates["key+budget+limits/memory"] = environ(new_key(budget_app, **budget))
        exact_app = auth_app(f"{instance}/e", "memory://", prefix, db_url,
                             LLMAUTH_BUDGET_LEASE_REQUESTS=0, **extra)
        self.apps["key+budget(no leases)+limits/memory"] = exact_app
        self.templates["key+budget(no leases)+limits/memory"] = environ(
            new_key(exact_app, **budget))
        self.use_redis = redis_answers(redis_url)
        if self.use_redis:
            redis_app = auth_app(f"{instance}/r", redis_url, prefix, **extra)
            self.apps["key+limits/redis"] = redis_app
            self.templates["key+limits/redis"] = environ(new_key(redis_app, **limits))
            redis_budget_app = auth_app(f"{instance}/rb", redis_url, prefix, db_url, **extra)
            self.apps["key+budget+limits/redis"] = redis_budget_app
            self.templates["key+budget+limits/redis"] = environ(
                new_key(redis_budget_app, **budget))
        self.variants = list(self.templates)

    def run(self, variant: str, count: int,
            marker: Callable[[], object] = int) -> tuple[float, float]:
        return run(self.apps[variant], self.templates[variant], count, marker)

    def close(self) -> None:
        for app in {id(app): app for app in self.apps.values()}.values():
            state = app.extensions.get("llmauth")
            if state is not None:
                state.close()
        if self.use_redis:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            for key in client.scan_iter(f"LIMITS:LLMAUTH/{self.prefix}/*"):
                client.delete(key)


#: callgrind dumps its counters whenever this libc function is entered; the child process
#: calls it (``os.getppid()``) right before and right after each measured loop.
_MARKER = "getppid"


def instructions(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """Instructions per request of each variant, from one callgrind run of this script."""
    with tempfile.TemporaryDirectory(prefix="llmauth-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--dump-before={_MARKER}",
                f"--callgrind-out-file={out}", sys.executable, str(Path(__file__).resolve()),
                "--callgrind-child", "--requests", str(args.requests),
                "--redis-url", args.redis_url, "--answer-chars", str(args.answer_chars)]
        if args.db_url:
            argv += ["--db-url", args.db_url]
        # a fixed hash seed: dict and set layouts (so probe counts) are the same every run
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
        if done.returncode != 0:
            raise SystemExit(f"callgrind run failed:\n{done.stderr[-3000:]}")
        variants = done.stdout.split()
        result = {}
        for index, variant in enumerate(variants):
            # dump 2k+1 ends at the marker before loop k, dump 2k+2 at the one after it
            text = Path(f"{out}.{2 * index + 2}").read_text()
            match = re.search(r"^totals: (\d+)", text, re.MULTILINE)
            if match is None:
                raise SystemExit("unexpected callgrind output")
            result[variant.replace("_", " ")] = int(match.group(1)) / args.requests
        return [v.replace("_", " ") for v in variants], result


#: Background work runs by wall-clock time, and a run under valgrind is ~50x slower: keep
#: it out of the per-request counts (as bench/run.py does).
QUIET_BACKGROUND = {"LLMAUTH_CACHE_SYNC_INTERVAL": 3600, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600,
                    "LLMAUTH_BUDGET_RESET_INTERVAL": 0, "LLMAUTH_BUDGET_LEASE_IDLE": 3600}


def bytecodes(bench: Bench, count: int, variants: Sequence[str] | None = None
              ) -> dict[str, float]:
    """Python bytecodes executed per request of each variant, between the measured loop's
    markers after a warm-up of 300 (see ``bench/opcodes.py``)."""
    counter = OpcodeCounter()
    result = {}
    for variant in variants or bench.variants:
        bench.run(variant, 300)
        counter.count = 0
        try:
            bench.run(variant, count, marker=counter.marker)
        finally:
            sys.settrace(None)
        result[variant] = counter.count / count
    return result


def table(title: str, unit: str, counts: dict[str, float]) -> str:
    """The report of a count per request of each variant, next to ``bare``."""
    base = counts["bare"]
    lines = [title, "", f"| variant | {unit}/request | × bare | over bare | target |",
             "|---|---|---|---|---|"]
    for v, count in counts.items():
        lines.append(f"| {v} | {count:,.0f} | {count / base:.3f}× | "
                     f"{count - base:+,.0f} | {TARGET.get(v, '')} |")
    return "\n".join(lines)


def callgrind_child(args: argparse.Namespace) -> None:
    bench = Bench(args.redis_url, args.db_url, QUIET_BACKGROUND)
    try:
        for variant in bench.variants:
            bench.run(variant, 300)
        # what the warm-up left is long-lived: a full collection would scan it all, at
        # whichever variant's turn it falls on
        gc.collect()
        gc.freeze()
        for variant in bench.variants:
            bench.run(variant, args.requests, marker=os.getppid)
    finally:
        bench.close()
    print(" ".join(v.replace(" ", "_") for v in bench.variants))


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--redis-url", default=os.environ.get(
        "LLMAUTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--db-url", default=None,
                        help="database of the budget variants (default: a SQLite file)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per request with valgrind instead of time")
    parser.add_argument("--bytecodes", action="store_true",
                        help="count the Python bytecodes of each variant per request instead "
                             "of time")
    parser.add_argument("--answer-chars", type=int, default=0,
                        help="the answer's length in characters (default 0: no choices); "
                             "a real answer is 1-10 KB of JSON")
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global ANSWER
    ANSWER = ("A sentence of the model's answer, with \"quotes\". " * (
        args.answer_chars // 48 + 1))[:args.answer_chars]

    if args.callgrind_child:
        callgrind_child(args)
        return ""
    if args.callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind not found")
        variants, counts = instructions(args)
        report = table(f"flask_llmauth rate-limit bench — instructions per request (valgrind "
                       f"--tool=callgrind, {args.requests} requests per variant, WSGI direct)",
                       "instructions", {v: counts[v] for v in variants})
        print(report)
        return report
    if args.bytecodes:
        bench = Bench(args.redis_url, args.db_url, QUIET_BACKGROUND)
        try:
            found = bytecodes(bench, args.requests)
        finally:
            bench.close()
        report = table(f"flask_llmauth rate-limit bench — Python bytecodes per request "
                       f"(sys.settrace opcode events, {args.requests} requests per variant, "
                       "WSGI direct; work done in C is not counted)", "bytecodes", found)
        print(report)
        return report

    trips = RoundTrips()
    bench = Bench(args.redis_url, args.db_url)
    variants = bench.variants
    for variant in variants:  # warm up: caches filled, code paths loaded
        bench.run(variant, 200)

    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    ratios: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    commands: dict[str, float] = {}
    order = random.Random(7)
    for _ in range(args.rounds):
        shuffled = variants[:]
        order.shuffle(shuffled)
        this_round = {}
        for v in shuffled:
            sent = trips.count
            this_round[v] = bench.run(v, args.requests)
            commands[v] = (trips.count - sent) / args.requests
        for v in variants:
            samples[v].append(this_round[v])
            ratios[v].append((this_round[v][0] / this_round["bare"][0],
                              this_round[v][1] / this_round["bare"][1]))

    lines = [
        f"flask_llmauth rate-limit bench — {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        f"{args.rounds} interleaved rounds x {args.requests} requests, WSGI direct, "
        f"medians{'' if bench.use_redis else '; Redis not reachable: redis row skipped'}",
        "",
        "| variant | wall µs/request | × bare (wall) | CPU µs/request | × bare (CPU) | "
        "Redis commands/request | target |",
        "|---|---|---|---|---|---|---|",
    ]

    def med(values: list[tuple[float, float]], i: int) -> float:
        return statistics.median(v[i] for v in values)

    for v in variants:
        redis_commands = f"{commands[v]:.2f}" if "redis" in v else ""
        lines.append(f"| {v} | {med(samples[v], 0):.1f} | {med(ratios[v], 0):.2f}× | "
                     f"{med(samples[v], 1):.1f} | {med(ratios[v], 1):.2f}× | {redis_commands} | "
                     f"{TARGET.get(v, '')} |")
    bench.close()
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
