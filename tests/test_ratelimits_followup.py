"""Rate limits, review follow-up: failed authentications from IPv6 clients counted per
network, a request that alone exceeds a tpm limit, and a parallel slot taken by an admission
whose answer was lost — on memory:// and on the real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from flask_llmauth import ConfigurationError
from flask_llmauth.ratelimits import counted_address
from tests.helpers import ADMIN, bearer, random_key
from tests.test_ratelimits import CHAT, add_llm_routes, storage  # noqa: F401


@pytest.fixture
def make(app_factory: Any, storage: dict[str, Any]) -> Any:  # noqa: F811
    def build(**config: Any) -> Flask:
        app = app_factory({**storage, **config}, routes=False)
        add_llm_routes(app)
        return app

    return build


def fail_from(client: Any, address: str) -> int:
    return client.post(CHAT, json={"model": "m"}, headers=bearer(random_key()),
                       environ_base={"REMOTE_ADDR": address}).status_code


def admin_from(client: Any, address: str) -> int:
    return client.post(CHAT, json={"model": "m"}, headers=ADMIN,
                       environ_base={"REMOTE_ADDR": address}).status_code


# -- failed authentications from IPv6 clients ------------------------------------------------------


def test_an_ipv6_client_rotating_addresses_in_its_64_is_blocked(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="3/minute").test_client()
    rotated = [f"2001:db8:1:2::{i:x}" for i in range(1, 4)]
    assert [fail_from(client, a) for a in rotated] == [401, 401, 401]
    assert fail_from(client, "2001:db8:1:2:ffff:eeee:dddd:cccc") == 429
    assert admin_from(client, "2001:db8:1:2::99") == 429  # before the key is checked
    # the next /64 is another client
    assert admin_from(client, "2001:db8:1:3::1") == 200


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute").test_client()
    assert fail_from(client, "::ffff:198.51.100.4") == 401
    assert fail_from(client, "198.51.100.4") == 401
    assert admin_from(client, "::ffff:198.51.100.4") == 429
    assert admin_from(client, "198.51.100.4") == 429
    # one IPv4 address does not block its neighbours (no prefix for IPv4)
    assert admin_from(client, "198.51.100.5") == 200
    assert admin_from(client, "::ffff:198.51.100.5") == 200


def test_the_ipv6_prefix_is_a_setting(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute",
                  LLMAUTH_AUTH_FAILURE_IPV6_PREFIX=48).test_client()
    assert fail_from(client, "2001:db8:7:1::1") == 401
    assert fail_from(client, "2001:db8:7:2::1") == 401  # another /64, the same /48
    assert admin_from(client, "2001:db8:7:ffff::1") == 429
    assert admin_from(client, "2001:db8:8::1") == 200
    per_address = make(LLMAUTH_AUTH_FAILURE_LIMIT="1/minute",
                       LLMAUTH_AUTH_FAILURE_IPV6_PREFIX=128).test_client()
    assert fail_from(per_address, "2001:db8:9::1") == 401
    assert admin_from(per_address, "2001:db8:9::1") == 429
    assert admin_from(per_address, "2001:db8:9::2") == 200


def test_forwarded_ipv6_clients_behind_a_trusted_proxy_are_counted_per_64(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute",
                  LLMAUTH_TRUSTED_PROXY_RANGES=["10.0.0.0/8"]).test_client()
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    for hop in ("2001:db8:5:5::1", "2001:db8:5:5::2"):
        assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
            **bearer(random_key()), "X-Forwarded-For": hop}).status_code == 401
    assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
        **ADMIN, "X-Forwarded-For": "2001:db8:5:5::3"}).status_code == 429
    assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
        **ADMIN, "X-Forwarded-For": "2001:db8:5:6::3"}).status_code == 200


@pytest.mark.parametrize(("ip", "prefix", "counted"), [
    ("203.0.113.9", 64, "203.0.113.9"),
    ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::7]", 64, "2001:db8:1:2::/64"),
    ("fe80::1%eth0", 64, "fe80::/64"),
    ("2001:db8:1:2:3:4:5:6", 56, "2001:db8:1::/56"),
    ("2001:db8::1", 128, "2001:db8::1/128"),
    ("::ffff:192.0.2.1", 64, "192.0.2.1"),
    ("::1", 64, "::/64"),
    ("not-an-ip", 64, "not-an-ip"),
    (None, 64, "unknown"),
    ("", 64, "unknown"),
])
def test_counted_address(ip: str | None, prefix: int, counted: str) -> None:
    assert counted_address(ip, prefix) == counted


@pytest.mark.parametrize("bad", [0, 129, "wide", 64.5])
def test_a_bad_ipv6_prefix_fails_init_naming_the_key(app_factory: Any, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="LLMAUTH_AUTH_FAILURE_IPV6_PREFIX"):
        app_factory({"LLMAUTH_AUTH_FAILURE_IPV6_PREFIX": bad})


