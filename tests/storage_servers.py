"""Real rate-limit storages for the tests, each started from the local binaries on free
loopback ports for the test session and stopped when it ends:

* ``redis_cluster_url``: a Redis Cluster of three master nodes (cluster mode, no
  persistence), their 16,384 slots assigned with ``redis-cli --cluster create``. Its
  counters take one storage call each (:class:`flask_llmauth.ratelimits.Counters`: a
  request's keys may live on different nodes).
* ``redis_sentinel_url``: a Redis and a Sentinel monitoring it (``redis+sentinel://``):
  the Lua scripts of :class:`flask_llmauth.ratelimits.RedisCounters` on the master the
  Sentinel names.
* ``memcached_url``: a memcached (:class:`flask_llmauth.ratelimits.MemcachedCounters`).
* ``redis_tls``: a Redis that speaks only TLS (``rediss://``), with a self-signed
  certificate made for the session, and the storage options that trust it.
"""

from __future__ import annotations

import os
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
        _stop(processes)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait(ready: object, message: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(message)


@pytest.fixture(scope="session")
def redis_sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis+sentinel://`` URI of a Sentinel watching a Redis of its own (``mymaster``)."""
    from tests.conftest import missing_peer

    server = shutil.which("redis-server")
    if server is None or shutil.which("redis-cli") is None:
        missing_peer("redis-server and redis-cli are needed to start a Redis Sentinel")
    directory = tmp_path_factory.mktemp("redis-sentinel")
    master, watcher = _free_ports(2)
    config = directory / "sentinel.conf"  # Sentinel rewrites its config file: one of its own
    config.write_text(f"port {watcher}\nbind 127.0.0.1\ndir {directory}\n"
                      f"sentinel monitor mymaster 127.0.0.1 {master} 1\n")
    processes = [
        subprocess.Popen([str(server), "--port", str(master), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(directory)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([str(server), str(config), "--sentinel"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait(lambda: "PONG" in _cli(master, "ping", timeout=5),
              f"Redis on port {master} did not start")
        _wait(lambda: str(master) in _cli(watcher, "sentinel", "get-master-addr-by-name",
                                          "mymaster", timeout=5),
              f"Redis Sentinel on port {watcher} does not name its master")
        yield f"redis+sentinel://127.0.0.1:{watcher}/mymaster"
    finally:
        _stop(processes)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def memcached_url() -> Iterator[str]:
    """``memcached://`` URI of a running memcached."""
    from tests.conftest import missing_peer

    server = shutil.which("memcached")
    if server is None:
        missing_peer("memcached is needed on PATH (apt-get install memcached)")
    try:
        import pymemcache  # noqa: F401 - limits' memcached client
    except ImportError:
        missing_peer("pymemcache is needed (pip install -e '.[test]')")
    port = _free_port()
    argv = [str(server), "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root without it
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memcached did not start on port {port}") from None
                time.sleep(0.05)
        yield f"memcached://127.0.0.1:{port}"
    finally:
        _stop([process])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files), valid for a day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The settings of a rate-limit storage on a Redis that speaks only TLS:
    ``LLMAUTH_RATELIMIT_STORAGE_URI`` (``rediss://``) and the
    ``LLMAUTH_RATELIMIT_STORAGE_OPTIONS`` that trust its certificate."""
    from tests.conftest import missing_peer

    server = shutil.which("redis-server")
    if server is None:
        missing_peer("redis-server is needed to start a Redis with TLS")
    directory = tmp_path_factory.mktemp("redis-tls")
    cert, key = _self_signed(directory)
    (port,) = _free_ports(1)
    process = subprocess.Popen(
        [str(server), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answers() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait(answers, f"Redis with TLS on port {port} did not start")
        yield {"LLMAUTH_RATELIMIT_STORAGE_URI": f"rediss://127.0.0.1:{port}/0",
               "LLMAUTH_RATELIMIT_STORAGE_OPTIONS": {"ssl_ca_certs": str(cert)}}
    finally:
        _stop([process])

