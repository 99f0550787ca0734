"""Helpers shared by the tests (import them from ``tests.helpers``)."""

from __future__ import annotations

import secrets
import threading
from typing import Any

MASTER_KEY = "sk-master-" + "T3stMasterKey0123456789abcdefghijklmnop"
#: Every secret of the run; the session-end leak check searches logs and tables for them.
SECRETS: set[str] = {MASTER_KEY}


def record_secret(value: str) -> str:
    """Register a secret that no log line or table may ever contain."""
    SECRETS.add(value)
    return value


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN = bearer(MASTER_KEY)


def new_key(client: Any, **fields: Any) -> dict[str, Any]:
    """Generate a key as the master key; return the whole response (with ``key``)."""
    response = client.post("/key/generate", json=fields, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    record_secret(body["key"])
    return body


def random_key() -> str:
    return record_secret("sk-" + secrets.token_urlsafe(32))


def assert_error(response: Any, status: int, error_type: str | None = None) -> dict[str, Any]:
    """The response is the JSON error envelope with this status (and type)."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == str(status)
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    return body["error"]


#: LiteLLM's seven roles, in the order the authorization tests walk them.
ROLES = ("proxy_admin", "proxy_admin_viewer", "org_admin", "internal_user",
         "internal_user_viewer", "team", "customer")


def role_keys(client: Any, app: Any, prefix: str = "") -> dict[str, str]:
    """One virtual key per role, created through the management API as the master key.

    Each key belongs to a user ``u-<role>`` holding that role, except ``team`` (a team
    service-account key: a key of team ``t-team`` with no user) and ``customer`` (the API
    never stores that role on a user, so the row is given it directly).
    """
    from flask_llmauth.store.tables import User

    keys: dict[str, str] = {}
    for role in ROLES:
        if role == "team":
            response = client.post(f"{prefix}/team/new", json={"team_id": "t-team"},
                                   headers=ADMIN)
            assert response.status_code == 200, response.get_json()
            body = {"team_id": "t-team"}
        else:
            stored = "internal_user" if role == "customer" else role
            response = client.post(f"{prefix}/user/new", headers=ADMIN, json={
                "user_id": f"u-{role}", "user_role": stored, "auto_create_key": False})
            assert response.status_code == 200, response.get_json()
            body = {"user_id": f"u-{role}"}
        response = client.post(f"{prefix}/key/generate", json=body, headers=ADMIN)
        assert response.status_code == 200, response.get_json()
        keys[role] = record_secret(response.get_json()["key"])
    state = app.extensions["llmauth"]
    with state.store.use():
        User.update(user_role="customer").where(User.user_id == "u-customer").execute()
    state.invalidate("user:u-customer")
    return keys


class TcpProxy:
    """A loopback TCP forwarder that can be cut and restored, to take a real peer (Postgres,
    Redis) away mid-run: ``cut()`` closes the listener and every open connection,
    ``restore()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        import socket
        import threading

        self.target = (target_host, target_port)
        self._socket_module = socket
        self._threading = threading
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: Any = None
        self.restore()

    def restore(self) -> None:
        socket = self._socket_module
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket_module.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: Any, sink: Any) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self) -> None:
        socket = self._socket_module
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone would not stop it
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            connections, self._connections = self._connections, []
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def url(self, url: str) -> str:
        """``url`` (``scheme://user@host:port/db``) pointed at this proxy."""
        scheme, rest = url.split("://", 1)
        authority, _, path = rest.partition("/")
        user = authority.rsplit("@", 1)[0] + "@" if "@" in authority else ""
        return f"{scheme}://{user}127.0.0.1:{self.port}/{path}"


def keys_seen_later(app: Any, monkeypatch: Any, seconds: float) -> None:
    """``app``'s virtual-key authenticator sees the time ``seconds`` later: the clock it
    compares a key's expiry (or a rotated-out secret's grace end) with on every request,
    and the ``utcnow`` a cold lookup compares a grace period with. Instead of sleeping
    past an expiry: the same checks run, against a moved clock."""
    import time
    from datetime import timedelta

    from flask_llmauth.authn import virtual_key
    from flask_llmauth.durations import utcnow

    authenticator = app.extensions["llmauth"].virtual_key_authenticator()
    inner = getattr(authenticator, "inner", authenticator)  # custom_key_validate wrapper
    monkeypatch.setattr(inner, "clock", lambda: time.time() + seconds)
    monkeypatch.setattr(virtual_key, "utcnow", lambda: utcnow() + timedelta(seconds=seconds))


def serve_in_thread(server: Any) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread, polling for ``shutdown()`` every 50 ms
    (the standard library's 0.5 s would add up to half a second to every test's teardown)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return thread
