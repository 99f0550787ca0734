"""``flask llmauth ...``: the same services the API uses, run as the proxy admin."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

import click
from flask.cli import with_appcontext

from .api.keys import KEY_FIELDS
from .api.schema import Field, string
from .api.schema import duration as duration_field
from .api.teams import TEAM_FIELDS
from .api.users import USER_FIELDS
from .errors import LLMAuthError
from .extension import state
from .keys import KeyService
from .principal import Principal, Role
from .store.db import NotMigrated
from .teams import TeamService
from .users import UserService


def _actor() -> Principal:
    return Principal(method="cli", role=Role.PROXY_ADMIN,
                     user_id=state().settings.proxy_admin_name, key_name="cli")


def _service_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run inside the app context; turn service errors into clean CLI errors."""
    @wraps(func)
    @with_appcontext
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NotMigrated:
            raise click.ClickException(NotMigrated.hint) from None
        except LLMAuthError as exc:
            raise click.ClickException(exc.message) from None
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


#: A user id as the API takes it (``--admin`` of ``create-team``).
member_id = string()


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _options(fields: Mapping[str, Field], **given: tuple[str, Any]) -> dict[str, Any]:
    """``field=(option, value)`` checked by the management API's parser of that field, so
    the CLI takes what a request body may hold and nothing else; an error names the option.
    ``None`` values (options not given) are left out."""
    params: dict[str, Any] = {}
    for name, (option, value) in given.items():
        if value is None:
            continue
        try:
            params[name] = fields[name].parse(value)
        except (ValueError, TypeError) as exc:
            raise click.ClickException(f"{option}: {exc}") from None
    return params


def _echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


@click.group(help="Manage flask_llmauth keys, users, teams and the database.")
def llmauth_cli() -> None:
    pass


@llmauth_cli.command("init-db", help="Create or upgrade the database tables.")
@_service_command
def init_db() -> None:
    _echo_applied(state().store.migrate())


def _echo_applied(applied: list[str]) -> None:
    click.echo(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied
                                                         else "; the database is up to date"))


@llmauth_cli.group("db", help="Database migrations.")
def db_group() -> None:
    pass


@db_group.command("upgrade", help="Apply pending migrations.")
@_service_command
def db_upgrade() -> None:
    _echo_applied(state().store.migrate())


@db_group.command("status", help="List migrations and whether each is applied.")
@_service_command
def db_status() -> None:
    for name, applied in state().store.migration_status():
        click.echo(f"{'applied' if applied else 'pending'}  {name}")


@llmauth_cli.command("create-key", help="Create a virtual key and print it (shown once).")
@click.option("--user-id")
@click.option("--team-id")
@click.option("--alias", "key_alias")
@click.option("--models", help="Comma-separated model names (default: all).")
@click.option("--duration", help="Expiry, e.g. 30d.")
@click.option("--max-budget", type=float)
@click.option("--budget-duration", help="Window of the budget, e.g. 30d (spend resets).")
@click.option("--rpm-limit", type=int, help="Requests per minute.")
@click.option("--tpm-limit", type=int, help="Tokens per minute.")
@click.option("--max-parallel-requests", type=int, help="Requests in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole response as JSON.")
@_service_command
def create_key(user_id: str | None, team_id: str | None, key_alias: str | None,
               models: str | None, duration: str | None, max_budget: float | None,
               budget_duration: str | None, rpm_limit: int | None, tpm_limit: int | None,
               max_parallel_requests: int | None, as_json: bool) -> None:
    params = _options(KEY_FIELDS, user_id=("--user-id", user_id), team_id=("--team-id", team_id),
                      key_alias=("--alias", key_alias), models=("--models", _csv(models)),
                      duration=("--duration", duration), max_budget=("--max-budget", max_budget),
                      budget_duration=("--budget-duration", budget_duration),
                      rpm_limit=("--rpm-limit", rpm_limit), tpm_limit=("--tpm-limit", tpm_limit),
                      max_parallel_requests=("--max-parallel-requests", max_parallel_requests))
    result = KeyService(state()).generate(_actor(), params)
    if as_json:
        _echo_json(result)
    else:
        click.echo(result["key"])
        click.echo(f"key_id: {result['key_id']}  (the key is shown only once)", err=True)


#: What ``list-keys`` prints after a key's id and name, each only when the key has it.
_KEY_FIELDS = (("alias", "key_alias"), ("user", "user_id"), ("team", "team_id"),
               ("expires", "expires"))


@llmauth_cli.command("list-keys", help="List keys (never their secrets).")
@click.option("--user-id")
@click.option("--team-id")
@click.option("--deleted", is_flag=True, help="List deleted keys instead.")
@_service_command
def list_keys(user_id: str | None, team_id: str | None, deleted: bool) -> None:
    query: dict[str, Any] = {"page": 1, "size": 100, "sort_by": "created_at",
                             "sort_order": "desc", "return_full_object": True,
                             "user_id": user_id, "team_id": team_id}
    if deleted:
        query["status"] = "deleted"
    service = KeyService(state())
    page = 1
    while True:
        result = service.list(_actor(), {**query, "page": page})
        for key in result["keys"]:
            fields = [key["key_id"], key["key_name"]]
            fields += [f"{label}={key[name]}" for label, name in _KEY_FIELDS
                       if key.get(name) is not None]
            click.echo("  ".join(fields) + (" blocked" if key.get("blocked") else ""))
        if page >= result["total_pages"]:
            break
        page += 1


@llmauth_cli.command("rotate-key", help="Rotate a key's secret; print the new one (shown once).")
@click.argument("key_id")
@click.option("--grace-period", help="Keep the old secret working this long, e.g. 24h.")
@_service_command
def rotate_key(key_id: str, grace_period: str | None) -> None:
    params = _options({"grace_period": Field(duration_field)},
                      grace_period=("--grace-period", grace_period))
    result = KeyService(state()).regenerate(_actor(), key_id, params)
    click.echo(result["key"])
    ends = result.get("grace_period_ends_at")
    click.echo(f"key_id: {result['key_id']}" + (f"  old secret works until {ends}" if ends
                                                 else "  old secret revoked"), err=True)


@llmauth_cli.command("revoke-key", help="Delete (revoke) keys by key_id.")
@click.argument("key_ids", nargs=-1, required=True)
@_service_command
def revoke_key(key_ids: tuple[str, ...]) -> None:
    for key_id in KeyService(state()).delete(_actor(), list(key_ids)):
        click.echo(f"revoked {key_id}")


@llmauth_cli.command("create-user", help="Create an internal user (no key is created).")
@click.argument("user_id")
@click.option("--email")
@click.option("--role", default="internal_user", show_default=True)
@click.option("--models")
@click.option("--max-budget", type=float)
@_service_command
def create_user(user_id: str, email: str | None, role: str, models: str | None,
                max_budget: float | None) -> None:
    params = _options(USER_FIELDS, user_id=("USER_ID", user_id), user_role=("--role", role),
                      user_email=("--email", email), models=("--models", _csv(models)),
                      max_budget=("--max-budget", max_budget))
    params["auto_create_key"] = False
    _echo_json(UserService(state()).create(_actor(), params))


@llmauth_cli.command("create-team", help="Create a team.")
@click.argument("team_id")
@click.option("--alias", "team_alias")
@click.option("--models")
@click.option("--max-budget", type=float)
@click.option("--admin", "admins", multiple=True, help="user_id of a team admin (repeatable).")
@click.option("--member", "members", multiple=True,
              help="user_id of a team member (repeatable).")
@_service_command
def create_team(team_id: str, team_alias: str | None, models: str | None,
                max_budget: float | None, admins: tuple[str, ...],
                members: tuple[str, ...]) -> None:
    params = _options(TEAM_FIELDS, team_id=("TEAM_ID", team_id),
                      team_alias=("--alias", team_alias), models=("--models", _csv(models)),
                      max_budget=("--max-budget", max_budget))
    if admins or members:
        params["members_with_roles"] = [
            _options({"user_id": Field(member_id)}, user_id=(option, user))
            | {"role": role}
            for option, role, users in (("--admin", "admin", admins),
                                        ("--member", "user", members))
            for user in users]
    _echo_json(TeamService(state()).create(_actor(), params))


@llmauth_cli.command("show-config", help="Print the effective settings (secrets masked).")
@_service_command
def show_config() -> None:
    app_state = state()
    shown = app_state.settings.masked()
    if app_state.settings.database_url is None:  # the default: the instance folder's file
        shown["LLMAUTH_DATABASE_URL"] = app_state.store.url
    _echo_json(shown)


@llmauth_cli.command(
    "reset-budgets",
    help="Reset every budget window that is over (spend back to 0, next reset set), "
         "release reservations that expired and delete budget counter rows that hold "
         "nothing. Safe to run from cron at any interval.")
@_service_command
def reset_budgets() -> None:
    from .budgets import Ledger

    app_state = state()
    ledger = app_state.budgets.ledger if app_state.budgets is not None else Ledger(
        app_state.store, app_state.settings)
    done = ledger.reset_due()
    released = ledger.sweep()
    deleted = ledger.sweep_counters()
    click.echo(f"reset {sum(done.values())} budget window(s); released {released} expired "
               f"reservation(s); deleted {deleted} idle budget counter(s)")
