"""Secrets: per-purpose key derivation, key generation and keyed key digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_PREFIX = "sk-"
#: The fewest random bytes a generated key holds (``LLMAUTH_KEY_ENTROPY_BYTES``' minimum).
MIN_KEY_ENTROPY_BYTES = 24
#: Characters after ``sk-`` of the shortest generated key (url-safe base64 of
#: ``MIN_KEY_ENTROPY_BYTES``).
MIN_KEY_CHARACTERS = len(secrets.token_urlsafe(MIN_KEY_ENTROPY_BYTES))
#: Characters after ``sk-`` a proxy admin's chosen secret needs at least: 128 bits as
#: url-safe base64, what LiteLLM generates (``sk-`` + ``token_urlsafe(16)``), so a LiteLLM
#: deployment's keys can be imported as they are.
MIN_CHOSEN_KEY_CHARACTERS = len(secrets.token_urlsafe(16))
#: Purposes of derived secrets. A value made for one purpose is useless for another.
PURPOSE_KEY_DIGEST = "virtual-key-digest"
PURPOSE_KEY_CACHE = "virtual-key-cache-id"
PURPOSE_SESSION = "dashboard-session"
PURPOSE_CSRF = "dashboard-csrf"


def derive_secret(server_secret: str, purpose: str) -> bytes:
    """Derive a 32-byte secret for one purpose from the server secret (HKDF-SHA256)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"flask_llmauth",
        info=f"flask_llmauth/{purpose}".encode(),
    )
    return hkdf.derive(server_secret.encode())


def generate_key(entropy_bytes: int = 32) -> str:
    """A new virtual key: ``sk-`` + url-safe base64 of ``entropy_bytes`` CSPRNG bytes."""
    return KEY_PREFIX + secrets.token_urlsafe(entropy_bytes)


def abbreviate(raw_key: str) -> str:
    """The printable form LiteLLM calls ``key_name``: ``sk-...abcd``."""
    return f"{KEY_PREFIX}...{raw_key[-4:]}"


def fingerprint(token: str) -> str:
    """SHA-256 of a whole bearer token: the cache key for JWT, userinfo and introspection."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class KeyDigester:
    """HMAC-SHA256 of virtual keys under a derived secret; the digest is stored, never the key.

    The HMAC (RFC 2104) is computed from SHA-256 states that have already absorbed the inner
    and outer key pads, so a digest costs two hash copies instead of setting up an HMAC
    context per call (which, with OpenSSL 3, looks the algorithm up every time).
    """

    __slots__ = ("_secret", "_inner", "_outer")

    def __init__(self, server_secret: str) -> None:
        self._secret = derive_secret(server_secret, PURPOSE_KEY_DIGEST)
        block = self._secret.ljust(hashlib.sha256().block_size, b"\0")  # 32-byte key: padded
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, raw_key: str) -> str:
        inner = self._inner.copy()
        inner.update(raw_key.encode("utf-8", "surrogatepass"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class CacheKeyer:
    """Keyed BLAKE2s of virtual keys under a secret of its own: the in-process cache key.

    The stored digest stays HMAC-SHA256 (:class:`KeyDigester`); a request whose key is in
    the in-process cache computes only this MAC, which costs about a third of the HMAC
    (BLAKE2s is keyed natively and its keyed state is prepared once, so a MAC is one state
    copy, one update and one 32-byte digest). Never stored, never logged.
    """

    __slots__ = ("_state",)

    def __init__(self, server_secret: str) -> None:
        self._state = hashlib.blake2s(key=derive_secret(server_secret, PURPOSE_KEY_CACHE))

    def __call__(self, raw_key: str) -> bytes:
        mac = self._state.copy()
        mac.update(raw_key.encode("utf-8", "surrogatepass"))
        return mac.digest()


def secret_bytes(value: str) -> bytes:
    """A secret as the bytes :func:`constant_time_equals` compares."""
    return value.encode("utf-8", "surrogatepass")


def constant_time_equals(a: str, b: str | bytes) -> bool:
    """Compare two secrets without leaking where they differ (``b`` may be pre-encoded with
    :func:`secret_bytes`)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"),
                               b if isinstance(b, bytes) else b.encode("utf-8", "surrogatepass"))
