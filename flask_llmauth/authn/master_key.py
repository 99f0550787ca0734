"""The master key: a constant-time compare that yields the proxy admin."""

from __future__ import annotations

from hmac import compare_digest

from ..crypto import secret_bytes
from ..principal import Principal, Role
from .base import AuthContext


class MasterKeyAuthenticator:
    name = "master_key"
    #: Its one principal names the proxy admin (see :class:`~.base.Chain`).
    yields_identity = True

    def __init__(self, master_key: str, admin_name: str, alias: str) -> None:
        self._master_key = secret_bytes(master_key)
        #: The one principal it yields.
        self.principal = Principal(
            method=self.name, role=Role.PROXY_ADMIN, user_id=admin_name, key_name=alias,
        )

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        token = ctx.credentials.token
        if token is not None and compare_digest(token.encode("utf-8", "surrogatepass"),
                                                self._master_key):
            return self.principal
        return None
