"""Adversarial review of OAuth2 introspection/token-info and the chain around it: the error
paths a real provider cannot produce on demand, with requests-mock. The JWT side is in
``tests/integration/test_authn_methods_review.py``."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.helpers import assert_error
from tests.test_oauth2 import ENDPOINT, TOKEN, chat, oauth_app


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

