"""Review of the money path, second round: what a finished request holds in its leases
(``Ticket.costs``) when it has several budgets and its spend write fails or is retried, and
what a request reserves for bodies that name more than one completion cap or carry their
prompt in nested content parts — on SQLite and Postgres."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.errors import ServiceUnavailable
from flask_llmauth.store.tables import (
    BudgetCounter,
    BudgetReservation,
    Key,
    SpendLog,
    Team,
    TeamMembership,
)
from flask_llmauth.usage import (
    UNREADABLE_CAP,
    body_sizes,
    estimate_prompt_tokens,
    requested_max_tokens,
)
from tests.helpers import assert_error, bearer, new_key
from tests.test_budgets import CHAT, api, budget_gateway, give_back, row, usd

#: The worst case of a request of ``body()``: no prompt, 10 completion tokens at 1,000 units.
WORST = 10_000


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "budget-model", "max_tokens": 10, **fields}


def post(client: Any, key: str, **fields: Any) -> Any:
    """A request whose spend is left queued (no flush after it)."""
    return client.post(CHAT, json=body(**fields), headers=bearer(key))


# -- a finished request's cost in several leases ---------------------------------------------------


def five_budgets(app: Flask, client: Any, binding: str, limit: int) -> dict[str, Any]:
    """A team key of member ``ann`` bound by a key, team, team member, end user and global
    budget; the one named ``binding`` is ``limit`` units, the others far larger."""
    roomy = 10**9

    def limit_of(level: str) -> float:
        return usd(limit if level == binding else roomy)

    api(client, "/team/new", team_id="t-five", max_budget=limit_of("team"))
    api(client, "/team/member_add", team_id="t-five", member=[{"user_id": "ann"}],
        max_budget_in_team=limit_of("member"))
    return new_key(client, max_budget=limit_of("key"), user_id="ann", team_id="t-five")


def spends(app: Flask, key_id: str) -> dict[str, tuple[int, int]]:
    """``(spend, reserved)`` of each budget row, after every lease is given back."""
    give_back(app)
    out = {"key": row(app, Key, key_id=key_id), "team": row(app, Team, team_id="t-five"),
           "member": row(app, TeamMembership, team_id="t-five", user_id="ann"),
           "end_user": row(app, BudgetCounter, scope="end_user", entity_id="eu"),
           "global": row(app, BudgetCounter, scope="global")}
    return {level: (r.spend, r.reserved) for level, r in out.items()}


@pytest.mark.parametrize("binding", ["key", "team", "member", "end_user", "global"])
def test_queued_costs_in_five_leases_never_pass_the_binding_budget(
        make: Any, binding: str) -> None:
    """Concurrent requests of a caller with five budgets, their spend left queued: each
    finished one holds its cost (not its worst case) in all five leases until it is
    written. Every budget row is charged exactly what was admitted, nothing stays
    reserved, and the binding budget holds — whichever it is."""
    limit = 55_000  # 5 worst cases fit at once; each request costs 6,000
    app = make(LLMAUTH_MAX_BUDGET=usd(limit if binding == "global" else 10**9),
               LLMAUTH_MAX_END_USER_BUDGET=usd(limit if binding == "end_user" else 10**9),
               LLMAUTH_SPEND_FLUSH_INTERVAL=3600)
    client = app.test_client()
    key = five_budgets(app, client, binding, limit)
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        c = app.test_client()
        barrier.wait()
        for _ in range(4):
            status = post(c, key["key"], completion=6, user="eu").status_code
            with lock:
                results.append(status)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) <= {200, 429}
    admitted = results.count(200)
    assert admitted >= 5  # what fits when every reservation is at its worst
    rows = spends(app, key["key_id"])
    assert rows == dict.fromkeys(rows, (admitted * 6_000, 0))
    assert admitted * 6_000 <= limit
    with app.extensions["llmauth"].store.use():
        assert SpendLog.select().count() == admitted


def test_a_cost_above_the_worst_case_in_five_leases_is_charged_once_to_each(
        make: Any) -> None:
    """The upstream answered more than max_tokens: the request is charged what it used on
    every budget row (never its worst case), and its leases give back all they held."""
    app = make(LLMAUTH_MAX_BUDGET=usd(10**9), LLMAUTH_MAX_END_USER_BUDGET=usd(10**9),
               LLMAUTH_SPEND_FLUSH_INTERVAL=3600)
    client = app.test_client()
    key = five_budgets(app, client, "none", 0)
    assert post(client, key["key"], completion=25, user="eu").status_code == 200
    assert post(client, key["key"], completion=2, user="eu").status_code == 200
    rows = spends(app, key["key_id"])
    assert rows == dict.fromkeys(rows, (27_000, 0))


@pytest.mark.parametrize("processes", [1, 2])
def test_a_cost_above_the_worst_case_counts_at_its_cost_until_it_is_written(
        make: Any, processes: int) -> None:
    """A request the upstream answered with more than max_tokens (or a stream past its
    cap) costs more than its worst case. Until its spend is written it must count at that
    cost, not at its worst case: a request right behind it (in this process, or in another
    one after the next lease pass) was admitted against room the first had already spent,
    and both together passed the budget (20,000: 14,000 + 10,000)."""
    budget = 20_000
    apps = [make(LLMAUTH_SPEND_FLUSH_INTERVAL=3600) for _ in range(processes)]
    first, last = apps[0], apps[-1]
    key = new_key(first.test_client(), max_budget=usd(budget))
    assert post(first.test_client(), key["key"], completion=14).status_code == 200
    if processes == 2:  # the lease pass of the first process (its background sweep)
        first.extensions["llmauth"].budgets.leases.sweep()
    error = assert_error(post(last.test_client(), key["key"], completion=10), 429,
                         "budget_exceeded")
    assert "Budget" in error["message"]
    for app in apps:
        give_back(app)
    k = row(first, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (14_000, 0)
    # once written, the same holds from the spend: 6,000 left, less than a worst case
    assert_error(post(last.test_client(), key["key"], completion=1), 429, "budget_exceeded")


def failing_writes(app: Flask, fail: Callable[[int], bool], after_commit: bool) -> list[int]:
    """The spend ledger's batch writes raise ``ServiceUnavailable`` when ``fail(call)``
    says so: before the batch is written (rolled back), or after it committed (the answer
    to the commit was lost). Returns the calls made."""
    ledger = app.extensions["llmauth"].spend_ledger
    real = ledger._write
    calls: list[int] = []

    def write(batch: Any) -> int:
        calls.append(1)
        if not fail(len(calls)):
            return real(batch)
        if after_commit:
            real(batch)
        raise ServiceUnavailable("the database did not answer")

    ledger._write = write
    return calls


@pytest.mark.parametrize("after_commit", [False, True], ids=["rolled-back", "answer-lost"])
def test_a_failed_or_retried_spend_write_keeps_the_cost_held_and_counts_once(
        make: Any, after_commit: bool) -> None:
    """A finished request holds its cost in its leases until its spend-log row is seen
    committed. A batch that fails (rolled back) and is retried, or that committed but whose
    answer was lost (retried: its rows are there, so nothing is inserted or called back the
    second time), neither frees the cost early nor counts it twice."""
    budget = 25_000  # a worst case (10,000) plus 15 requests of 1,000
    app = make(LLMAUTH_MAX_END_USER_BUDGET=usd(budget), LLMAUTH_SPEND_FLUSH_INTERVAL=3600)
    client = app.test_client()
    key = new_key(client, max_budget=usd(budget))
    state = app.extensions["llmauth"]
    calls = failing_writes(app, lambda call: call <= 3, after_commit)
    admitted = 0
    for _ in range(40):
        response = post(client, key["key"], completion=1, user="eu")
        if response.status_code != 200:
            assert_error(response, 429, "budget_exceeded")
            break
        admitted += 1
        if admitted % 5 == 0:  # the background passes, while the writes fail
            for _ in range(2):
                try:
                    state.spend_ledger.flush()
                except ServiceUnavailable:
                    pass
                state.budgets.leases.sweep()
    assert len(calls) >= 3  # the failures happened while requests were admitted
    # exactly what fits: a worst case after the costs held or written (16 × 1,000 + 10,000
    # passes 25,000) — a cost freed before its spend was written would let more through
    assert admitted == (budget - WORST) // 1_000 + 1
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (admitted * 1_000, 0)
    end_user = row(app, BudgetCounter, scope="end_user", entity_id="eu")
    assert (end_user.spend, end_user.reserved) == (admitted * 1_000, 0)
    with state.store.use():
        assert SpendLog.select().count() == admitted
    for lease in state.budgets.leases._leases.values():
        assert (lease.in_use, lease.in_flight, lease.done_sum) == (0, {}, 0)


# -- what a request reserves: completion caps -----------------------------------------------------


@pytest.mark.parametrize(("fields", "cap"), [
    ({"max_completion_tokens": 1, "max_tokens": 100}, 100),
    ({"max_tokens": 1, "max_output_tokens": 100}, 100),
    ({"max_completion_tokens": 100, "max_tokens": 1, "max_output_tokens": 7}, 100),
    ({"max_tokens": 0, "max_output_tokens": 9}, 9),
    ({"max_completion_tokens": None, "max_tokens": 8}, 8),
    ({"max_tokens": 0}, 0),
    ({"max_tokens": 5, "max_output_tokens": "100"}, UNREADABLE_CAP),
    ({"max_tokens": 5, "max_completion_tokens": 2.0}, UNREADABLE_CAP),
    ({"max_tokens": 5, "max_output_tokens": True}, UNREADABLE_CAP),
    ({"max_tokens": 5, "max_output_tokens": -1}, UNREADABLE_CAP),
    # Gemini: the cap is in the generation config (camelCase or snake_case)
    ({"generationConfig": {"maxOutputTokens": 100}}, 100),
    ({"max_tokens": 5, "generation_config": {"max_output_tokens": 100}}, 100),
    ({"max_tokens": 500, "generationConfig": {"maxOutputTokens": 100}}, 500),
    ({"generationConfig": {"maxOutputTokens": 1.5}}, UNREADABLE_CAP),
    ({"generationConfig": "not a config", "max_tokens": 3}, 3),
])
def test_a_body_with_several_completion_caps_reserves_the_largest(
        fields: dict[str, Any], cap: int) -> None:
    """Which cap an upstream obeys when a body names several is the upstream's business
    (a translating gateway may map any of them to the provider's): the reservation must
    cover the largest, and every cap named must be a count. The first one set was taken,
    so ``{"max_completion_tokens": 1, "max_tokens": 100000}`` reserved 1 token; Gemini's
    ``generationConfig.maxOutputTokens`` was not read (the default was reserved)."""
    sent = {"model": "m", "messages": [], **fields}
    assert body_sizes(sent)[1] == cap
    assert (requested_max_tokens(sent) or 0) == cap


def test_a_small_cap_next_to_a_large_one_does_not_pass_the_budget(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(50_000))
    # reserved as 1 completion token (1,000 units), while the upstream may use 100
    error = assert_error(post(client, key["key"], max_completion_tokens=1, max_tokens=100,
                              completion=100), 429, "budget_exceeded")
    assert "Budget too small for this request" in error["message"]
    error = assert_error(post(client, key["key"], max_tokens=1, max_output_tokens="100"),
                         400, "invalid_request_error")
    assert "max_output_tokens" in error["message"]
    error = assert_error(post(client, key["key"], max_tokens=1,
                              generationConfig={"maxOutputTokens": "100"}),
                         400, "invalid_request_error")
    assert error["param"] == "generationConfig.maxOutputTokens"
    assert_error(post(client, key["key"], max_tokens=1, generationConfig={
        "maxOutputTokens": 100}), 429, "budget_exceeded")
    assert post(client, key["key"], max_tokens=1, max_completion_tokens=5,
                completion=5).status_code == 200
    assert row(app, Key, key_id=key["key_id"]).spend == 5_000


# -- what a request reserves: the prompt in nested parts ------------------------------------------

#: 40,000 characters: 10,000 tokens at 4 characters per token.
TEXT = "x" * 40_000


@pytest.mark.parametrize("sent", [
    # Anthropic: a tool result's content, as a string or as text blocks
    {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": TEXT}]}]},
    {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1",
         "content": [{"type": "text", "text": TEXT}]}]}]},
    # OpenAI Responses: input items with their content, a tool call's output, instructions
    {"input": [{"role": "user", "content": TEXT}]},
    {"input": [{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": TEXT}]}]},
    {"input": [{"type": "function_call_output", "call_id": "c", "output": TEXT}]},
    {"instructions": TEXT, "input": "hi"},
    # Gemini: contents and their parts
    {"contents": [{"role": "user", "parts": [{"text": TEXT}]}]},
    # token ids: one token each (printed, "0 0 0" made two characters of each)
    {"input": [0] * 10_000},
    {"input": [[0] * 5_000, [1] * 5_000]},
    {"prompt": [7] * 10_000},
])
def test_a_prompt_in_nested_content_parts_is_estimated(sent: dict[str, Any]) -> None:
    """The worst case counts the prompt's text wherever the APIs the routes serve put it:
    a prompt of 40,000 characters in a tool result, a Responses input item or Gemini parts
    was estimated at a few tokens, so the request reserved (and, answered without usage,
    was charged) almost nothing for it; 10,000 token ids were estimated at 5,000 tokens."""
    assert estimate_prompt_tokens(sent) >= 10_000
    assert body_sizes(sent)[0] == estimate_prompt_tokens(sent)


def test_a_large_prompt_in_a_tool_result_does_not_pass_the_budget(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(15_000))  # a worst case of 10,000 fits; 20,000 not
    messages = [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": TEXT}]}]
    error = assert_error(post(client, key["key"], messages=messages), 429, "budget_exceeded")
    assert "Budget too small for this request" in error["message"]
    assert post(client, key["key"], completion=1).status_code == 200
    give_back(app)


def test_a_clean_shutdown_writes_the_queued_costs_and_gives_every_lease_back(
        make: Any) -> None:
    """Stopped between the settlements and the next flush: the last pass writes the queued
    spend, then gives back the five leases, whose finished requests held their costs."""
    limit = 25_000
    app = make(LLMAUTH_MAX_BUDGET=usd(10**9), LLMAUTH_MAX_END_USER_BUDGET=usd(10**9),
               LLMAUTH_SPEND_FLUSH_INTERVAL=3600)
    client = app.test_client()
    key = five_budgets(app, client, "member", limit)
    statuses = [post(client, key["key"], completion=2, user="eu").status_code
                for _ in range(4)]
    assert statuses == [200] * 4
    state = app.extensions["llmauth"]
    assert state.spend_ledger.pending == 4
    # the member's lease is out of room: the finished requests hold their costs (2,000),
    # not their worst cases (10,000), in all five leases
    assert [lease.in_use for lease in state.budgets.leases._leases.values()] == [8_000] * 5
    state.close()
    other = make()
    rows = spends(other, key["key_id"])
    assert rows == dict.fromkeys(rows, (8_000, 0))
    with other.extensions["llmauth"].store.use():
        assert BudgetReservation.select().count() == 0
        assert SpendLog.select().count() == 4
