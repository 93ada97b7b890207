"""base.py's message changes (edits, deletions, read receipts) as the updates queue carries them."""

from __future__ import annotations

import pytest

from telegram_platform.telegram.base import (
    IncomingEdited,
    MessagesDeleted,
    ReadOutbox,
    change_from_json,
    change_to_json,
)
from telegram_platform.telegram.content import Entity, FormattedText


def test_each_change_survives_its_json() -> None:
    """An edit (with entities), a deletion and a read receipt come back equal from their JSON."""
    changes = [IncomingEdited(1, 2, 3 << 20, FormattedText("😀 new", (Entity("bold", 3, 3),)), 1_700_000_000),
               MessagesDeleted(1, 2, (3 << 20, 4 << 20)), ReadOutbox(1, -100, 5 << 20)]
    for change in changes:
        assert change_from_json(change_to_json(change)) == change


def test_an_unknown_change_is_refused() -> None:
    """A payload of another kind is a ValueError, not a change applied wrongly."""
    with pytest.raises(ValueError, match="not a message change"):
        change_from_json({"kind": "pinned", "account_id": 1, "chat_id": 2})
