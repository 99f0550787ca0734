"""The audit log: who changed which key, user or team, with before/after snapshots.

Snapshots are built by the services from public fields only (never a key, digest or
secret); the actor is the principal's non-secret label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .principal import Principal
from .store.tables import AuditLog


def write_audit(
    enabled: bool,
    actor: Principal,
    action: str,
    object_type: str,
    object_id: str,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row (call inside the service's transaction)."""
    if not enabled:
        return
    AuditLog.create(
        actor=actor.identity[:255], actor_method=actor.method[:32], action=action,
        object_type=object_type, object_id=object_id[:255],
        before=_jsonable(before), after=_jsonable(after),
    )


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
