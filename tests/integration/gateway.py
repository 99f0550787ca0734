"""Serving the example gateway on a real socket: gunicorn or ``flask run`` in a subprocess.

Each server runs the checkout under test (``PYTHONPATH`` = the repository root derived from
this file), in its own working directory with its own instance folder, on a free loopback
port. Only ``GATEWAY_*``/``LLMAUTH_*`` variables the test passes configure it: the parent's
are dropped so a developer's shell cannot change what a test sees.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
#: A generated key: ``sk-`` + 43 url-safe characters (32 random bytes).
KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_-]{43}")
#: gunicorn access-log line: worker pid, request line, status.
ACCESS_FORMAT = '%(p)s "%(r)s" %(s)s'
_DROPPED_PREFIXES = ("LLMAUTH_", "GATEWAY_", "LITELLM_")
_DROPPED_NAMES = {"DATABASE_URL", "REDIS_URL", "FLASK_APP", "FLASK_DEBUG", "FLASK_RUN_PORT"}
#: gunicorn config of the test servers (server hooks only, see that module).
GUNICORN_HOOKS = Path(__file__).with_name("gunicorn_hooks.py")


def _no_control_socket() -> tuple[str, ...]:
    """gunicorn 27 opens a control socket at a fixed path in ``$HOME`` unless told not to;
    servers started side by side must not share it (older versions have none)."""
    from gunicorn.config import KNOWN_SETTINGS

    known = any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
    return ("--no-control-socket",) if known else ()


_NO_CONTROL_SOCKET = _no_control_socket()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(_DROPPED_PREFIXES) and name not in _DROPPED_NAMES}
    env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1",
               GATEWAY_INSTANCE_PATH=str(workdir / "instance"))
    env.update(extra or {})
    return env


class Gateway:
    """One example-gateway server process (and its children), stopped by :meth:`stop`."""

    def __init__(self, argv: list[str], workdir: Path, port: int, env: dict[str, str],
                 name: str) -> None:
        self.argv = argv
        self.workdir = workdir
        self.port = port
        self.env = env
        self.base_url = f"http://127.0.0.1:{port}"
        self.stderr_path = workdir / f"{name}.stderr"
        self.access_log = workdir / f"{name}.access.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def instance_path(self) -> Path:
        return Path(self.env["GATEWAY_INSTANCE_PATH"])

    def start(self, timeout: float = 60.0) -> Gateway:
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            self.argv, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=stderr, stderr=stderr, start_new_session=True,
        )
        stderr.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n"
                                   + self.output())
            try:  # the socket listens before the workers have booted: waiting is normal
                if requests.get(self.base_url + "/", timeout=10).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("gateway did not answer in time:\n" + self.output())

    def stop(self) -> None:
        """SIGTERM to the process group this object started, SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def output(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def access_lines(self) -> list[tuple[int, str, int]]:
        """``(worker pid, request line, status)`` per request logged so far (gunicorn)."""
        if not self.access_log.exists():
            return []
        lines = []
        for line in self.access_log.read_text().splitlines():
            match = re.fullmatch(r'<(\d+)> "(.*)" (\d{3})', line.strip())
            if match:
                lines.append((int(match.group(1)), match.group(2), int(match.group(3))))
        return lines

    def probe(self, method: str, path: str, **kwargs: Any) -> tuple[int, requests.Response]:
        """Send one request on a new connection; return the worker pid that answered it
        (from the access log, matched by a unique ``probe`` query parameter)."""
        marker = uuid.uuid4().hex
        url = f"{self.base_url}{path}{'&' if '?' in path else '?'}probe={marker}"
        headers = {**kwargs.pop("headers", {}), "Connection": "close"}
        response = requests.request(method, url, headers=headers, timeout=10, **kwargs)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid, line, status in self.access_lines():
                if marker in line:
                    assert status == response.status_code
                    return pid, response
            time.sleep(0.02)
        raise AssertionError(f"request {marker} never reached the access log")

    def probe_every_worker(self, method: str, path: str, *, workers: int = 2,
                           within: float = 30.0, **kwargs: Any) -> dict[int, list[int]]:
        """Send requests until ``workers`` distinct workers answered (a worker still booting
        answers nothing, so this waits up to ``within`` seconds); return each worker's status
        codes, in order."""
        seen: dict[int, list[int]] = {}
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            pid, response = self.probe(method, path, **kwargs)
            seen.setdefault(pid, []).append(response.status_code)
            if len(seen) >= workers:
                return seen
            time.sleep(0.02)
        raise AssertionError(f"only workers {sorted(seen)} answered in {within} s")

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def gunicorn(workdir: Path, env: Mapping[str, str] | None = None, *, workers: int = 2,
             threads: int = 4, name: str = "gunicorn",
             access_format: str = ACCESS_FORMAT) -> Gateway:
    """``gunicorn 'example_app:create_app()'`` with ``workers`` gthread workers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    gateway = Gateway([], workdir, port, server_env(workdir, env), name)
    gateway.argv = [
        sys.executable, "-m", "gunicorn", "example_app:create_app()",
        "--config", str(GUNICORN_HOOKS),
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
        "--worker-class", "gthread", *_NO_CONTROL_SOCKET, "--graceful-timeout", "3",
        "--timeout", "60",
        "--access-logfile", str(gateway.access_log), "--access-logformat", access_format,
    ]
    return gateway


def flask_run(workdir: Path, env: Mapping[str, str] | None = None, *,
              name: str = "flask") -> Gateway:
    """``flask --app example_app run`` (the README's command) on a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", "example_app", "run", "--host", "127.0.0.1",
            "--port", str(port), "--no-reload", "--no-debugger"]
    return Gateway(argv, workdir, port, server_env(workdir, env), name)


def generated_master_key(output: str) -> str:
    """The master key a first start printed (fails unless exactly one was printed)."""
    keys = KEY_PATTERN.findall(output)
    assert len(keys) == 1, f"expected one printed master key, found {len(keys)}"
    return keys[0]
