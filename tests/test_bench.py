"""The benchmark harness runs end to end (tiny sizes; it measures, it asserts no timing)."""

from __future__ import annotations

import gc
import importlib.util
import io
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("run")


@pytest.fixture(autouse=True)
def _test_session_heap_frozen() -> Iterator[None]:
    """The harness collects garbage before every timed loop; in a full test run each of
    those collections scanned every object the session holds (seconds per test). Frozen,
    only what a test creates is scanned."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_key_database_holds_digests_the_extension_finds(bench: ModuleType,
                                                        tmp_path: Path) -> None:
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 300, log=lambda *a: None)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM llmauth_key").fetchone() == (300,)
        text = "\n".join(repr(row) for row in conn.execute("SELECT * FROM llmauth_key"))
    assert keydb.raw_key(7) not in text  # only digests are stored
    mtime = path.stat().st_mtime_ns
    assert keydb.ensure(path, 300, log=lambda *a: None).stat().st_mtime_ns == mtime  # reused

    work = bench.Workload(path, 300)
    try:  # a cold key and the cached key authenticate; every request answered 200
        for variant in bench.VARIANTS:
            for driver in bench.DRIVERS:
                assert bench.measure(work, driver, variant, 5) > 0
        principal_cache = work.apps["auth"].extensions["llmauth"].key_cache
        assert len(principal_cache) == 1 + len(bench.DRIVERS) * 5  # cached key + cold ones
        assert work.introspection.calls == 1  # the OAuth2 token: one fill, then the cache
        assert work.jwks.calls == 1  # the JWT's signing keys: fetched once
        jwt_auth = work.apps["jwt"].extensions["llmauth"].authenticators["jwt"]
        assert len(jwt_auth.verified) == 1 and len(jwt_auth.principals) == 1
        work.check_cached()
        assert bench.measure_decode(work, 5) > 0  # the same token verifies with jwt.decode
    finally:
        work.close()


def test_a_refused_request_fails_the_run(bench: ModuleType, tmp_path: Path) -> None:
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 50, log=lambda *a: None)
    work = bench.Workload(path, 50)
    work.headers["virtual_key_cached"] = bench.bearer("sk-" + "n" * 43)
    try:
        with pytest.raises(SystemExit, match="not 200"):
            bench.measure(work, "wsgi", "virtual_key_cached", 3)
    finally:
        work.close()


def test_an_introspection_cache_miss_fails_the_run(bench: ModuleType, tmp_path: Path) -> None:
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 50, log=lambda *a: None)
    work = bench.Workload(path, 50)
    try:
        bench.measure(work, "wsgi", "oauth2_cached", 3)
        work.apps["oauth2"].extensions["llmauth"].authenticators["oauth2"].principals.clear()
        work.apps["oauth2"].extensions["llmauth"].authenticators["oauth2"].cache.clear()
        bench.measure(work, "wsgi", "oauth2_cached", 3)
        with pytest.raises(SystemExit, match="expected 1"):
            work.check_introspection_cached()
    finally:
        work.close()


def test_a_jwks_cache_miss_fails_the_run(bench: ModuleType, tmp_path: Path) -> None:
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 50, log=lambda *a: None)
    work = bench.Workload(path, 50)
    try:
        bench.measure(work, "wsgi", "jwt_cached", 3)
        work.check_jwks_cached()
        authenticator = work.apps["jwt"].extensions["llmauth"].authenticators["jwt"]
        authenticator.global_issuer.keys._entries[authenticator.global_issuer.keys.urls[0]] \
            .keys = None  # the key cache loses its copy
        authenticator.verified.clear()
        authenticator.principals.clear()
        bench.measure(work, "wsgi", "jwt_cached", 3)
        with pytest.raises(SystemExit, match="expected 1"):
            work.check_cached()
    finally:
        work.close()


def test_a_token_that_does_not_verify_fails_the_run(bench: ModuleType, tmp_path: Path) -> None:
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 50, log=lambda *a: None)
    work = bench.Workload(path, 50)
    header, payload, _ = work.jwt_token.split(".")
    forged = f"{header}.{payload}." + "A" * 342  # the right length, not the signature
    work.jwt_token = forged
    work.headers["jwt_cached"] = bench.bearer(forged)
    try:
        with pytest.raises(Exception, match="Signature verification failed"):
            bench.measure_decode(work, 3)
        with pytest.raises(SystemExit, match="not 200"):  # nor does the extension take it
            bench.measure(work, "wsgi", "jwt_cached", 3)
    finally:
        work.close()


def test_report(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = bench.main(["--keys", "200", "--rounds", "2", "--requests", "5",
                       "--db-dir", str(tmp_path)])
    for variant in bench.VARIANTS:
        assert f"| {variant} | wsgi |" in text and f"| {variant} | test_client |" in text
    assert "adds ≤ 50 µs" in text
    assert "| jwt.decode alone (RS256, same token) | raw |" in text
    assert "≤ bare + 1.15 × jwt.decode: adds" in text
    # spend tracking is on by default: its batched write is timed per event, for both paths
    assert "Spend ledger's batched write, per event" in text
    for variant in bench.SPEND_WRITE_VARIANTS:
        assert f"| {variant} | " in text.split("batched write, per event")[1]


def test_spend_write_is_not_timed_when_spend_tracking_is_off(bench: ModuleType,
                                                             tmp_path: Path) -> None:
    text = bench.main(["--keys", "200", "--rounds", "1", "--requests", "5",
                       "--db-dir", str(tmp_path), "--config",
                       '{"LLMAUTH_SPEND_ENABLED": false}'])
    assert "| virtual_key_cached | wsgi |" in text
    assert "batched write" not in text


def test_every_cold_part_runs_its_calls_on_fresh_keys(bench: ModuleType, tmp_path: Path) -> None:
    """``--cold-parts`` counts each piece of a cold request under callgrind: each piece runs
    here as it would there (no valgrind), on keys the run never presented before."""
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 300, log=lambda *a: None)
    work = bench.Workload(path, 300)
    try:
        state = work.apps["auth"].extensions["llmauth"]
        for part in bench.COLD_PARTS:
            seen = len(work._cold_seen)
            run = bench._cold_part(work, part, 4)
            assert len(work._cold_seen) == seen + 4
            cached = len(state.key_cache)
            results = run()
            if part == "load":  # four fills of the key cache, every one a key found
                assert len(state.key_cache) == cached + 4
            if part == "lookup":
                assert results is not None and all(row is not None for row in results)
            if part == "denial":  # the bench's keys may call the model the count asks for
                assert results == [None] * 4
    finally:
        work.close()


def test_limits_bench_answers_with_the_asked_length(tmp_path: Path) -> None:
    """``bench/limits_bench.py --answer-chars N``: every variant's view answers N characters
    of text (and the report lists every variant it ran; a non-200 would fail the run)."""
    limits = _load("limits_bench")
    text = limits.main(["--rounds", "1", "--requests", "3", "--answer-chars", "2000",
                        "--redis-url", "redis://127.0.0.1:1/0"])  # no Redis: memory only
    assert len(limits.ANSWER) == 2000
    for variant in ("bare", "key, rate limits off", "key+limits/memory",
                    "key+budget+rpm/memory", "key+budget+limits/memory"):
        assert f"| {variant} |" in text
    body = limits.bare_app().test_client().post(
        limits.PATH, data=limits.BODY, content_type="application/json").get_json()
    assert body["choices"][0]["message"]["content"] == limits.ANSWER


def test_limits_bench_budget_and_rpm_variant_meets_only_those() -> None:
    """``key+budget+rpm/memory`` is the chain issue 4 names: its key has a budget and an rpm
    limit, no tpm limit and no parallel slots (the answer shows request headers only)."""
    limits = _load("limits_bench")
    bench = limits.Bench("redis://127.0.0.1:1/0", None)
    try:
        variant = "key+budget+rpm/memory"
        app = bench.apps[variant]
        env = dict(bench.templates[variant])
        env["wsgi.input"] = io.BytesIO(limits.BODY)
        seen: dict[str, Any] = {}

        def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
            seen.update(status=status, headers={k.lower(): v for k, v in headers})

        b"".join(app(env, start_response))
        assert seen["status"].startswith("200")
        headers = seen["headers"]
        assert headers["x-ratelimit-limit-requests"] == str(10**9)
        assert "x-ratelimit-limit-tokens" not in headers
        guard = app.extensions["llmauth"].budgets
        assert guard is not None and guard._plans  # the budget guard admitted it
    finally:
        bench.close()


def test_bytecodes_are_counted_per_request_and_repeat(bench: ModuleType, tmp_path: Path) -> None:
    keydb = sys.modules["keydb"]
    path = keydb.ensure(tmp_path / "keys.db", 500, log=lambda *a: None)
    work = bench.Workload(path, 500, extra_config={"LLMAUTH_SPEND_ENABLED": False})
    try:
        first, second = bench.bytecodes(work, count=5), bench.bytecodes(work, count=5)
    finally:
        work.close()
    assert first["bare"] > 1000  # Flask's own request handling is counted
    for variant in bench.VARIANTS[1:]:
        assert first[variant] > first["bare"], variant  # each auth path adds its own
    for variant in ("bare", "master_key", "virtual_key_cached"):
        assert first[variant] == second[variant], variant  # deterministic
    text = bench.bytecode_report(first)
    assert "| master_key | " in text and "× bare" in text


def test_limits_bench_counts_bytecodes_per_request_and_repeats() -> None:
    """``bench/limits_bench.py --bytecodes``: each variant's bytecodes per request, the same
    on a second count, the chain above the key alone and the key above bare Flask."""
    limits = _load("limits_bench")
    bench = limits.Bench("redis://127.0.0.1:1/0", None, limits.QUIET_BACKGROUND)
    variants = ["bare", "key, rate limits off", "key+budget+rpm/memory"]
    try:
        first = limits.bytecodes(bench, 5, variants)
        second = limits.bytecodes(bench, 5, variants)
    finally:
        bench.close()
    assert first["bare"] > 1000  # Flask's own request handling is counted
    assert first["bare"] < first["key, rate limits off"] < first["key+budget+rpm/memory"]
    assert first["bare"] == second["bare"]  # deterministic
    text = limits.table("title", "bytecodes", first)
    assert "| key+budget+rpm/memory | " in text and "≤ 1.25×" in text
