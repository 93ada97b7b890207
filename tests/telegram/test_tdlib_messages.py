"""tdlib/messages.py: a message in TDLib's words, both ways, without a TDLib client."""

from __future__ import annotations

from telegram_platform.telegram.base import IncomingMessage, SentMessage
from telegram_platform.telegram.tdlib.messages import (
    incoming_message,
    send_text_query,
    sent_message,
    text_content,
)


def test_a_text_send_is_a_send_message_query_with_plain_text_content() -> None:
    """send_text_query builds the exact sendMessage query the session sends for a text."""
    assert send_text_query(-100123, "hi") == {
        "@type": "sendMessage", "chat_id": -100123,
        "input_message_content": {"@type": "inputMessageText",
                                  "text": {"@type": "formattedText", "text": "hi"}}}
    assert send_text_query(5, "x")["input_message_content"] == text_content("x")


def test_a_confirmed_message_becomes_a_sent_message() -> None:
    """sent_message takes the message's final id and chat from TDLib's `message`."""
    assert sent_message({"@type": "message", "id": 1048576, "chat_id": 42}) == SentMessage(1048576, 42)


def test_a_received_text_becomes_an_incoming_message() -> None:
    """incoming_message reads sender, chat, id, text and date of a received text message."""
    message = {"@type": "message", "id": 7, "chat_id": 99, "date": 1700000000, "is_outgoing": False,
               "sender_id": {"@type": "messageSenderUser", "user_id": 555},
               "content": {"@type": "messageText", "text": {"@type": "formattedText", "text": "hello"}}}
    assert incoming_message(3, message) == IncomingMessage(
        account_id=3, chat_id=99, telegram_message_id=7, sender="555", text="hello", date=1700000000)
    from_channel = {**message, "sender_id": {"@type": "messageSenderChat", "chat_id": -100}}
    incoming = incoming_message(3, from_channel)
    assert incoming is not None and incoming.sender == "-100"


def test_outgoing_and_non_text_messages_are_not_taken_in() -> None:
    """The account's own messages and kinds other than text give None."""
    text = {"@type": "messageText", "text": {"@type": "formattedText", "text": "hello"}}
    assert incoming_message(3, {"id": 1, "chat_id": 2, "is_outgoing": True, "content": text}) is None
    assert incoming_message(3, {"id": 1, "chat_id": 2, "content": {"@type": "messagePhoto"}}) is None
