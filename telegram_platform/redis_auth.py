"""What crosses Redis is authenticated: keys derived from ENCRYPTION_KEY, one per purpose.

Redis carries work between processes, and whoever can write to it could otherwise speak for them:
publish an event that webhooks sign and deliver, or push an account request (a logout deletes the
account's TDLib database). So every process holds keys derived from ENCRYPTION_KEY (HKDF-SHA256, as
the sealed webhook secrets and proxy credentials are, each purpose with its own `info`), which Redis
never sees:

* events (events.py), token revocations and the one job whose arguments PostgreSQL cannot check
  (`store_incoming`: the message itself; worker/updates.py) carry a MAC (HMAC-SHA256, truncated to
  128 bits): they hold no secret, and their text stays readable (RQ's tools, WebSocket clients);
* account requests and their replies (telegram/rpc.py) are sealed (AES-GCM): a login code or a 2FA
  password is never in Redis in clear, and a request cannot be forged or altered. The sealed payload
  carries its deadline, and its additional data names what it is (a request, or the reply to one
  request id), so a sealed blob cannot be moved to stand for something else.

What is refused is logged (never its content) and counted (`refused`), never acted on.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable
from typing import Any, Final

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = structlog.get_logger(__name__)

EVENTS_INFO: Final = b"telegram-platform/redis-events/v1"
REVOCATIONS_INFO: Final = b"telegram-platform/redis-revocations/v1"
RPC_INFO: Final = b"telegram-platform/redis-rpc/v1"
JOBS_INFO: Final = b"telegram-platform/redis-jobs/v1"
# A MAC's length in hex characters (16 bytes): enough against forgery, short on every event.
MAC_LENGTH: Final = 32
NONCE_LENGTH: Final = 12
# What `refused` counts, a fixed set (the metric's label).
REFUSED_KINDS: Final = ("event", "revocation", "request", "reply", "job")


def derive_key(encryption_key: bytes, info: bytes) -> bytes:
    """A 32-byte key for one purpose: HKDF-SHA256(ENCRYPTION_KEY, no salt, `info`), the scheme of
    the sealed webhook secrets (storage/webhooks.py)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(encryption_key)


class RedisAuth:
    """One per process: MACs and seals for what it writes to Redis, checks for what it reads."""

    def __init__(self, encryption_key: bytes, *, count_refused: Callable[[str], None] | None = None) -> None:
        self._event_key = derive_key(encryption_key, EVENTS_INFO)
        self._revocation_key = derive_key(encryption_key, REVOCATIONS_INFO)
        self._job_key = derive_key(encryption_key, JOBS_INFO)
        self._rpc = AESGCM(derive_key(encryption_key, RPC_INFO))
        self._count_refused = count_refused

    # -- MACs (events, revocations) ---------------------------------------------------------------

    def event_mac(self, text: str) -> str:
        return hmac.digest(self._event_key, text.encode(), "sha256")[:MAC_LENGTH // 2].hex()

    def event_genuine(self, text: str, mac: str) -> bool:
        return hmac.compare_digest(self.event_mac(text), mac)

    def revocation_mac(self, text: str) -> str:
        return hmac.digest(self._revocation_key, text.encode(), "sha256")[:MAC_LENGTH // 2].hex()

    def revocation_genuine(self, text: str, mac: str) -> bool:
        return hmac.compare_digest(self.revocation_mac(text), mac)

    def job_mac(self, args: list[Any]) -> str:
        """The MAC of a job's arguments (as JSON, which RQ's format keeps them in)."""
        text = json.dumps(args, separators=(",", ":"), ensure_ascii=False)
        return hmac.digest(self._job_key, text.encode(), "sha256")[:MAC_LENGTH // 2].hex()

    def job_genuine(self, args: list[Any], mac: str) -> bool:
        return hmac.compare_digest(self.job_mac(args), mac)

    # -- sealing (account requests and replies) ---------------------------------------------------

    def seal(self, payload: dict[str, Any], *, purpose: bytes) -> bytes:
        """`payload` as JSON, encrypted and authenticated; `purpose` (the additional data) must be
        given again to open it."""
        nonce = os.urandom(NONCE_LENGTH)
        return nonce + self._rpc.encrypt(nonce, json.dumps(payload).encode(), purpose)

    def open(self, blob: bytes | str, *, purpose: bytes) -> dict[str, Any] | None:
        """The payload `seal` made for this `purpose`; None when the blob is not one (forged, altered,
        sealed with another key or for another purpose)."""
        try:
            data = blob.encode("latin-1") if isinstance(blob, str) else blob
            if len(data) <= NONCE_LENGTH:
                return None
            payload = json.loads(self._rpc.decrypt(data[:NONCE_LENGTH], data[NONCE_LENGTH:], purpose))
        except (InvalidTag, ValueError):  # UnicodeError is a ValueError
            return None
        return payload if isinstance(payload, dict) else None

    # -- what is refused --------------------------------------------------------------------------

    def refused(self, kind: str, reason: str, **context: Any) -> None:
        """Log (without the content) and count something read from Redis and not acted on."""
        log.warning("refused from Redis: " + reason, kind=kind, **context)
        if self._count_refused is not None:
            self._count_refused(kind)
