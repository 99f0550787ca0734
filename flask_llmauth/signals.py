"""Blinker signals. The sender is the Flask app; keyword data never holds a secret.

Signals notify, they do not decide: a receiver that raises is logged (with its traceback)
and changes nothing about the request — no 500, no refused request, no lost key.
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal
from flask.signals import Namespace

log = logging.getLogger("flask_llmauth")
_signals = Namespace()

#: ``principal=`` — a request was authenticated and authorized.
auth_succeeded = _signals.signal("llmauth-auth-succeeded")
#: ``status=, reason=, route=, ip=`` — a request was refused.
auth_failed = _signals.signal("llmauth-auth-failed")
#: ``key_id=, key_name=, actor=`` — a virtual key was created.
key_created = _signals.signal("llmauth-key-created")
#: ``key_id=, key_name=, actor=, grace_until=`` — a key was rotated (grace_until: aware UTC).
key_rotated = _signals.signal("llmauth-key-rotated")
#: ``key_id=, actor=`` — a key was deleted (revoked).
key_revoked = _signals.signal("llmauth-key-revoked")
#: ``principal=, level=, entity_id=, spend=, max_budget=`` — a request hit a budget.
budget_exceeded = _signals.signal("llmauth-budget-exceeded")
#: ``principal=, level=, entity_id=, spend=, soft_budget=`` — once per window.
soft_budget_crossed = _signals.signal("llmauth-soft-budget-crossed")
#: ``principal=, limit=`` — a request was refused by a rate limit.
rate_limited = _signals.signal("llmauth-rate-limited")
#: ``user_id=, source=`` — a user row was created on first sight (JWT, SSO).
user_provisioned = _signals.signal("llmauth-user-provisioned")


def send(signal: NamedSignal, sender: Any, **data: Any) -> None:
    """``signal.send(sender, **data)``; a receiver's exception is logged, not raised (the
    receivers after it in blinker's order are then not called)."""
    try:
        signal.send(sender, **data)
    except Exception:
        log.exception("llmauth: a receiver of the %s signal failed", signal.name)
