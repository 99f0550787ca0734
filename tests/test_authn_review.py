"""Adversarial review of OAuth2 introspection/token-info and the chain around it: the error
paths a real provider cannot produce on demand, with requests-mock. The JWT side is in
``tests/integration/test_authn_methods_review.py``."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.helpers import assert_error
from tests.test_oauth2 import ENDPOINT, TOKEN, TOKEN_INFO, chat, oauth_app


@pytest.mark.parametrize("exp", [10 ** 400, -(10 ** 400)], ids=["huge", "huge_negative"])
def test_introspection_exp_beyond_a_float_is_a_plain_refusal(app_factory: Any,
                                                             requests_mock: Any, caplog: Any,
                                                             exp: int) -> None:
    """An ``exp`` integer too large for a float made the number check raise OverflowError:
    still a 401 (the chain's catch-all), but logged as an authenticator failure."""
    requests_mock.post(ENDPOINT, text=f'{{"active": true, "sub": "u-big", "exp": {exp}}}')
    client = oauth_app(app_factory).test_client()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flask_llmauth"):
        assert_error(chat(client), 401)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "oauth2_bad_exp" in caplog.text
    assert TOKEN not in caplog.text



# -- audience ------------------------------------------------------------------------------------


@pytest.mark.parametrize("aud, status", [
    ("https://llm.example", 200),
    (["https://other.example", "https://llm.example"], 200),
    ("https://other.example", 401),
    (["https://other.example"], 401),
    (None, 401),
    ([], 401),
    (["https://llm.example"[:-1]], 401),
    ({"aud": "https://llm.example"}, 401),
    ([["https://llm.example"]], 401),
])
def test_introspection_audience_when_configured(app_factory: Any, requests_mock: Any,
                                                aud: Any, status: int) -> None:
    answer: dict[str, Any] = {"active": True, "sub": "u-aud"}
    if aud is not None:
        answer["aud"] = aud
    requests_mock.post(ENDPOINT, json=answer)
    client = oauth_app(app_factory, oauth2_audience="https://llm.example").test_client()
    response = chat(client)
    if status == 200:
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["principal"]["user_id"] == "u-aud"
    else:
        assert_error(response, 401)


def test_token_info_audience_when_configured(app_factory: Any, requests_mock: Any) -> None:
    requests_mock.get(TOKEN_INFO, json={"sub": "u-ti", "aud": "other-client"})
    client = oauth_app(app_factory, TOKEN_INFO, oauth2_audience="gateway-client, llm"
                       ).test_client()
    assert_error(chat(client), 401)
    requests_mock.get(TOKEN_INFO, json={"sub": "u-ti", "aud": "llm"})
    assert chat(client, TOKEN + "2").status_code == 200


def test_no_audience_configured_is_warned_about(app_factory: Any, requests_mock: Any,
                                                caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        oauth_app(app_factory)
    assert "LLMAUTH_OAUTH2_AUDIENCE" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        oauth_app(app_factory, oauth2_audience="https://llm.example")
    assert "LLMAUTH_OAUTH2_AUDIENCE" not in caplog.text
