"""What a message is in TDLib's words, both ways: a send from the platform becomes a `sendMessage`
query with its `inputMessage*` content, and TDLib's `message` objects become the platform's
`SentMessage` (a confirmed send) and `IncomingMessage` (a message the account received). Each new
kind of message gets its builder and its reader here, beside the text's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telegram_platform.telegram.base import IncomingMessage, SentMessage
from telegram_platform.telegram.tdlib.protocol import Event


def text_content(text: str) -> Event:
    """A plain text message's content (`inputMessageText`), without entities."""
    return {"@type": "inputMessageText", "text": {"@type": "formattedText", "text": text}}


def send_text_query(chat_id: int, text: str) -> Event:
    """The `sendMessage` query for a text message to `chat_id`."""
    return {"@type": "sendMessage", "chat_id": chat_id, "input_message_content": text_content(text)}


def sent_message(message: Mapping[str, Any]) -> SentMessage:
    """A TDLib `message` that Telegram accepted, as the platform records it."""
    return SentMessage(telegram_message_id=int(message["id"]), chat_id=int(message["chat_id"]))


def incoming_message(account_id: int, message: Mapping[str, Any]) -> IncomingMessage | None:
    """A TDLib `message` the account received, or None when the platform does not take it in
    (its own outgoing messages, anything but text)."""
    content = message.get("content") or {}
    if message.get("is_outgoing") or content.get("@type") != "messageText":
        return None
    sender = message.get("sender_id") or {}
    sender_id = sender.get("user_id", sender.get("chat_id", ""))
    return IncomingMessage(
        account_id=account_id, chat_id=int(message["chat_id"]),
        telegram_message_id=int(message["id"]), sender=str(sender_id),
        text=str(content["text"]["text"]), date=int(message.get("date", 0)))
