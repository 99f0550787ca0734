#!/usr/bin/env python3
"""Per-request cost of the full chain with rate limits, next to a bare Flask route.

    python bench/limits_bench.py                       # memory:// and Redis (if it answers)
    python bench/limits_bench.py --redis-url redis://127.0.0.1:6379/0 --rounds 15

The same view (``POST /v1/chat/completions``: parse the JSON body, answer an OpenAI-shaped
JSON with a ``usage`` block) is driven through the WSGI app directly with a prepared environ:

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
* ``key+budget(no leases)+limits/memory``: the same with ``LLMAUTH_BUDGET_LEASE_REQUESTS=0``
  — one reservation transaction per request (the exact mode).

Rounds are interleaved in a shuffled order; the report gives the median µs per request and
the median of the per-round ratios to ``bare``. Redis keys are written under a unique prefix
and deleted afterwards (never a FLUSH).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flask import Flask, request  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from flask_llmauth import LLMAuth  # noqa: E402

PATH = "/v1/chat/completions"
BODY = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}], '
        b'"max_tokens": 64, "temperature": 0}')
MASTER_KEY = "sk-bench-" + "Rl7Qw2Ex9Tn4Vb6Mc1Kd8Fh3Jg5Hs0Pa"
TARGET = {"key+limits/memory": "≤ 1.25×"}


def add_view(app: Flask) -> None:
    @app.post(PATH)
    def chat_completions() -> Any:
        body = request.get_json()
        return {"object": "chat.completion", "model": body["model"], "choices": [],
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
                         headers={"Authorization": f"Bearer {key}"},
                         content_type="application/json").get_environ()
    del env["wsgi.input"]
    return env


def run(app: Flask, template: dict[str, Any], count: int) -> tuple[float, float]:
    """``(wall, CPU)`` µs per request for ``count`` requests (fails loudly on any non-200).

    CPU is this thread's CPU time: on a busy machine it moves far less than wall time."""
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)

    gc.collect()
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


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--redis-url", default=os.environ.get(
        "LLMAUTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--db-url", default=None,
                        help="database of the budget variants (default: a SQLite file)")
    args = parser.parse_args(argv)

    instance = tempfile.mkdtemp(prefix="llmauth-limits-bench-")
    prefix = f"llmauth-bench-{uuid.uuid4().hex[:8]}"
    limits = {"rpm_limit": 10**9, "tpm_limit": 10**12, "max_parallel_requests": 1000}
    apps: dict[str, Flask] = {"bare": bare_app()}
    memory_app = auth_app(f"{instance}/m", "memory://", prefix)
    apps["key"] = apps["key+limits/memory"] = memory_app
    apps["key, rate limits off"] = off_app = auth_app(f"{instance}/off", "memory://", prefix,
                                                       LLMAUTH_RATELIMIT_ENABLED=False)
    templates = {"bare": environ(new_key(memory_app)),
                 "key, rate limits off": environ(new_key(off_app)),
                 "key": environ(new_key(memory_app)),
                 "key+limits/memory": environ(new_key(memory_app, **limits))}
    budget = {**limits, "max_budget": 10**6}
    budget_app = auth_app(f"{instance}/b", "memory://", prefix, args.db_url)
    apps["key+budget+limits/memory"] = budget_app
    templates["key+budget+limits/memory"] = environ(new_key(budget_app, **budget))
    exact_app = auth_app(f"{instance}/e", "memory://", prefix, args.db_url,
                         LLMAUTH_BUDGET_LEASE_REQUESTS=0)
    apps["key+budget(no leases)+limits/memory"] = exact_app
    templates["key+budget(no leases)+limits/memory"] = environ(new_key(exact_app, **budget))
    use_redis = redis_answers(args.redis_url)
    redis_budget_app = None
    if use_redis:
        redis_app = auth_app(f"{instance}/r", args.redis_url, prefix)
        apps["key+limits/redis"] = redis_app
        templates["key+limits/redis"] = environ(new_key(redis_app, **limits))
        redis_budget_app = auth_app(f"{instance}/rb", args.redis_url, prefix, args.db_url)
        apps["key+budget+limits/redis"] = redis_budget_app
        templates["key+budget+limits/redis"] = environ(new_key(redis_budget_app, **budget))
    variants = list(templates)
    for variant in variants:  # warm up: caches filled, code paths loaded
        run(apps[variant], templates[variant], 200)

    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    ratios: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    order = random.Random(7)
    for _ in range(args.rounds):
        shuffled = variants[:]
        order.shuffle(shuffled)
        this_round = {v: run(apps[v], templates[v], args.requests) for v in shuffled}
        for v in variants:
            samples[v].append(this_round[v])
            ratios[v].append((this_round[v][0] / this_round["bare"][0],
                              this_round[v][1] / this_round["bare"][1]))

    lines = [
        f"flask_llmauth rate-limit bench — {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        f"{args.rounds} interleaved rounds x {args.requests} requests, WSGI direct, "
        f"medians{'' if use_redis else '; Redis not reachable: redis row skipped'}",
        "",
        "| variant | wall µs/request | × bare (wall) | CPU µs/request | × bare (CPU) | target |",
        "|---|---|---|---|---|---|",
    ]

    def med(values: list[tuple[float, float]], i: int) -> float:
        return statistics.median(v[i] for v in values)

    for v in variants:
        lines.append(f"| {v} | {med(samples[v], 0):.1f} | {med(ratios[v], 0):.2f}× | "
                     f"{med(samples[v], 1):.1f} | {med(ratios[v], 1):.2f}× | "
                     f"{TARGET.get(v, '')} |")
    for app in (memory_app, off_app, apps.get("key+limits/redis"), budget_app, exact_app,
                redis_budget_app):
        if app is not None:
            app.extensions["llmauth"].close()
    if use_redis:
        import redis

        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(f"LIMITS:LLMAUTH/{prefix}/*"):
            client.delete(key)
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
