"""Keys for what crosses Redis: one per purpose from ENCRYPTION_KEY; seals open only with their key
and purpose, MACs verify only for their text."""

from __future__ import annotations

from telegram_platform.redis_auth import MAC_LENGTH, RedisAuth, derive_key

KEY = bytes(range(32))


def test_each_purpose_has_its_own_key() -> None:
    """The derived keys differ by purpose and by ENCRYPTION_KEY, and are stable."""
    keys = {derive_key(KEY, info) for info in (b"a", b"b")} | {derive_key(bytes(32), b"a")}
    assert len(keys) == 3 and derive_key(KEY, b"a") == derive_key(KEY, b"a")
    auth = RedisAuth(KEY)
    assert auth.event_mac("x") != auth.revocation_mac("x")  # an event's MAC is no revocation's


def test_a_seal_opens_only_with_its_key_and_purpose() -> None:
    """A sealed payload hides its content, opens with the same key and purpose, and is None when
    altered, truncated, sealed for another purpose or with another key."""
    auth, other = RedisAuth(KEY), RedisAuth(bytes(32))
    sealed = auth.seal({"password": "hunter2-secret"}, purpose=b"request")
    assert b"hunter2-secret" not in sealed
    assert auth.open(sealed, purpose=b"request") == {"password": "hunter2-secret"}
    assert sealed != auth.seal({"password": "hunter2-secret"}, purpose=b"request")  # a fresh nonce each time
    altered = bytearray(sealed)
    altered[20] ^= 1
    for blob, purpose, key in ((bytes(altered), b"request", auth), (sealed[:12], b"request", auth),
                               (sealed, b"reply", auth), (sealed, b"request", other), (b"{}", b"request", auth)):
        assert key.open(blob, purpose=purpose) is None


def test_macs_verify_only_their_text_and_count_refusals() -> None:
    """A MAC is MAC_LENGTH hex characters, verifies for its own text only, and `refused` counts."""
    counted: list[str] = []
    auth = RedisAuth(KEY, count_refused=counted.append)
    mac = auth.event_mac('{"type":"x"}')
    assert len(mac) == MAC_LENGTH and int(mac, 16) >= 0
    assert auth.event_genuine('{"type":"x"}', mac)
    assert not auth.event_genuine('{"type":"y"}', mac) and not RedisAuth(bytes(32)).event_genuine('{"type":"x"}', mac)
    auth.refused("event", "a test refusal")
    assert counted == ["event"]
