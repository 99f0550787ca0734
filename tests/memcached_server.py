"""A real memcached for the rate-limit tests, started from the local ``memcached`` on a free
loopback port for the test session (limits' ``memcached://`` storage, through pymemcache).

memcached takes the counters of one storage call each, and its ``incr`` takes no negative
delta (:class:`flask_llmauth.ratelimits.MemcachedCounters`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest


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
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
