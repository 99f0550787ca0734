"""One deadline for a whole exchange with the identity provider.

``requests``' ``timeout`` bounds the connect and each socket read, not the exchange: a
provider (or anything in between) that sends its answer a byte at a time, each just inside
the timeout, would hold a request worker for as long as it likes. Here the connect and the
wait for the answer share one budget (:func:`exchange_timeout`), and :func:`read_body` reads
the body in small pieces, each allowed only the time left, and gives up (closing the
connection) once the deadline passes with the :class:`requests.ReadTimeout` a slow socket
read raises, so a slow answer takes its caller's timeout path.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import requests
from urllib3 import Timeout
from urllib3.exceptions import HTTPError, ReadTimeoutError

#: Most bytes asked for in one read: a read returns as soon as some data is there.
_PIECE = 16384


def exchange_timeout(seconds: float, connect: float | None = None) -> Any:
    """The ``timeout`` of a request whose connect and first answer byte share ``seconds``
    (a urllib3 :class:`~urllib3.Timeout`, which ``requests`` takes though its stubs say not);
    ``connect`` bounds the connect alone more tightly."""
    return Timeout(connect=seconds if connect is None else min(connect, seconds),
                   read=seconds, total=seconds)


def read_body(response: requests.Response, limit: int, deadline: float) -> bytes:
    """The (decoded) body of a streamed response, at most ``limit + 1`` bytes, read before
    ``deadline`` (a :func:`time.monotonic` value).

    Raises :class:`requests.ReadTimeout` past the deadline and :class:`requests.ConnectionError`
    when the connection breaks; the response is closed then.
    """
    raw = response.raw
    body = bytearray()
    try:
        while len(body) <= limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise requests.ReadTimeout("the answer took longer than the timeout")
            connection = getattr(raw, "connection", None)  # None once back in the pool
            sock = getattr(connection, "sock", None)
            if isinstance(sock, socket.socket):
                sock.settimeout(left)  # no single read outlives the deadline
            piece = raw.read1(min(_PIECE, limit + 1 - len(body)), decode_content=True)
            if not piece:
                break
            body += piece
    except requests.RequestException:
        response.close()
        raise
    except (ReadTimeoutError, TimeoutError) as exc:
        response.close()
        raise requests.ReadTimeout(type(exc).__name__) from None
    except (HTTPError, OSError) as exc:
        response.close()
        raise requests.ConnectionError(type(exc).__name__) from None
    return bytes(body)
