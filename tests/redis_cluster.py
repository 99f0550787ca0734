"""A real Redis Cluster for the rate-limit tests: three master nodes started from the local
``redis-server`` on free loopback ports (cluster mode, no persistence), their 16,384 slots
assigned with ``redis-cli --cluster create``, stopped when the test session ends.

Redis Cluster is the storage whose rate-limit counters take one storage call per counter
(:class:`flask_llmauth.ratelimits.Counters`: a request's keys may live on different
nodes), so this is what tests that path against a real server.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NODES = 3


def _free_ports(count: int) -> list[int]:
    """``count`` free loopback ports whose cluster bus ports (port + 10,000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10_000 > 65_535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _cli(port: int, *args: str, timeout: float = 30) -> str:
    done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """``redis+cluster://`` URI of a running three-node cluster."""
    from tests.conftest import missing_peer

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        missing_peer("redis-server and redis-cli are needed to start a Redis Cluster")
    directory = Path(tempfile.mkdtemp(prefix="llmauth-redis-cluster-"))
    ports = _free_ports(NODES)
    processes = []
    try:
        for port in ports:
            node = directory / str(port)
            node.mkdir()
            processes.append(subprocess.Popen(
                [str(server), "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--dir", str(node), "--save", "", "--appendonly", "no",
                 "--logfile", str(node / "log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _wait(lambda port=port: "PONG" in _cli(port, "ping", timeout=5),
                  f"Redis node on port {port} did not start")
        created = _cli(ports[0], "--cluster", "create",
                       *[f"127.0.0.1:{port}" for port in ports],
                       "--cluster-replicas", "0", "--cluster-yes", timeout=60)
        if "All 16384 slots covered" not in created:
            raise RuntimeError(f"redis-cli --cluster create failed: {created[-500:]}")
        for port in ports:
            _wait(lambda port=port: "cluster_state:ok" in _cli(port, "cluster", "info"),
                  f"Redis Cluster node on port {port} did not reach cluster_state:ok")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(directory, ignore_errors=True)


def _wait(ready: object, message: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(message)
