"""tdlib/messages.py: a message in TDLib's words, both ways; every query shape parsed by the real library."""

from __future__ import annotations

from typing import Any

import pytest

from telegram_platform.telegram.base import (
    IncomingEdited,
    IncomingMessage,
    MessagesDeleted,
    PermanentError,
    ReadOutbox,
    SentMessage,
)
from telegram_platform.telegram.content import (
    Entity,
    FormattedText,
    Media,
    MediaKind,
    OutgoingMessage,
    plain,
)
from telegram_platform.telegram.tdlib.messages import (
    ENTITY_TYPES,
    delete_messages_query,
    edit_message_query,
    formatted_text,
    forward_messages_query,
    incoming_message,
    message_change,
    read_formatted_text,
    send_message_query,
    sent_message,
    sent_messages,
    text_content,
    view_messages_query,
)
from telegram_platform.telegram.tdlib.protocol import execute

# TDLib parses a request before anything else: a malformed one is refused at once with this prefix;
# a well-formed asynchronous method answers that it cannot run synchronously.
PARSE_FAILED = "Failed to parse JSON object as TDLib request"
WELL_FORMED = "The method can't be executed synchronously"


@pytest.fixture(scope="module", autouse=True)
def quiet_tdlib() -> None:
    execute({"@type": "setLogVerbosityLevel", "new_verbosity_level": 0})


def td_answer(query: dict[str, Any]) -> str:
    answer = execute(query)
    assert answer is not None and answer["@type"] == "error", answer
    return str(answer["message"])


def assert_parses(query: dict[str, Any]) -> None:
    """The real library takes `query` as a well-formed request."""
    assert td_answer(query) == WELL_FORMED


def assert_field_read(query: dict[str, Any], path: tuple[str | int, ...]) -> None:
    """TDLib reads the field at `path`: given a value of the wrong type there, its parser refuses the
    request (a field TDLib does not know would be ignored silently)."""
    broken: Any = query
    for key in path[:-1]:
        broken = broken[key]
    original = broken[path[-1]]
    broken[path[-1]] = [[]]
    try:
        assert td_answer(query).startswith(PARSE_FAILED)
    finally:
        broken[path[-1]] = original


FORMATTED = OutgoingMessage(
    FormattedText("bold 😀 link", (Entity("bold", 0, 4), Entity("text_link", 8, 4, url="https://example.com"))),
    reply_to=3 << 20, silent=True, protect_content=True, disable_web_page_preview=True)


def test_a_text_send_is_a_send_message_query_with_its_entities_and_options() -> None:
    """send_message_query builds sendMessage with formattedText entities, options and the reply."""
    query = send_message_query(-100123, FORMATTED)
    assert query == {
        "@type": "sendMessage", "chat_id": -100123,
        "options": {"@type": "messageSendOptions", "disable_notification": True, "protect_content": True},
        "reply_to": {"@type": "inputMessageReplyToMessage", "message_id": 3 << 20},
        "input_message_content": {
            "@type": "inputMessageText",
            "text": {"@type": "formattedText", "text": "bold 😀 link", "entities": [
                {"@type": "textEntity", "offset": 0, "length": 4, "type": {"@type": "textEntityTypeBold"}},
                {"@type": "textEntity", "offset": 8, "length": 4,
                 "type": {"@type": "textEntityTypeTextUrl", "url": "https://example.com"}}]},
            "link_preview_options": {"@type": "linkPreviewOptions", "is_disabled": True}}}
    plain_query = send_message_query(5, plain("x"))
    assert "reply_to" not in plain_query and plain_query["input_message_content"] == text_content(plain("x"))
    assert "link_preview_options" not in plain_query["input_message_content"]


def test_the_real_library_parses_the_send_and_reads_each_field() -> None:
    """tdjson 1.8.69 takes the sendMessage shape, and reads every field the platform sets on it."""
    query = send_message_query(-100123, FORMATTED)
    assert_parses(query)
    for path in [("options", "disable_notification"), ("options", "protect_content"),
                 ("reply_to", "message_id"), ("input_message_content", "link_preview_options"),
                 ("input_message_content", "link_preview_options", "is_disabled"),
                 ("input_message_content", "text", "entities", 1, "type", "url")]:
        assert_field_read(query, path)
    wrong_class = send_message_query(1, plain("x"))
    wrong_class["reply_to"] = {"@type": "inputMessageReplyToMessages", "message_id": 1}
    assert "Unknown class" in td_answer(wrong_class)


def test_every_entity_type_is_a_class_tdlib_knows() -> None:
    """Each of the platform's entity types becomes a textEntityType the real library parses."""
    fields = {"text_link": {"url": "https://a.b"}, "text_mention": {"user_id": 1},
              "custom_emoji": {"custom_emoji_id": "5368324170671202286"}}
    entities = [Entity(name, 0, 1, **fields.get(name, {})) for name in ENTITY_TYPES]
    entities.append(Entity("pre", 0, 1, language="python"))
    assert_parses(send_message_query(1, OutgoingMessage(FormattedText("x", tuple(entities)))))
    with pytest.raises(PermanentError, match="unknown entity type"):
        formatted_text(FormattedText("x", (Entity("blink", 0, 1),)))


def test_tdlibs_formatted_text_reads_back_into_the_platforms_entities() -> None:
    """read_formatted_text inverts formatted_text for every type, and drops types the platform lacks."""
    fields = {"text_link": {"url": "https://a.b"}, "text_mention": {"user_id": 1},
              "custom_emoji": {"custom_emoji_id": "5368324170671202286"}}
    entities = [Entity(name, i, 1, **fields.get(name, {})) for i, name in enumerate(ENTITY_TYPES)]
    text = FormattedText("x" * 30, (*entities, Entity("pre", 29, 1, language="python")))
    assert read_formatted_text(formatted_text(text)) == text
    timestamp = {"@type": "formattedText", "text": "0:10", "entities": [
        {"@type": "textEntity", "offset": 0, "length": 4, "type": {"@type": "textEntityTypeMediaTimestamp"}}]}
    assert read_formatted_text(timestamp) == FormattedText("0:10")


def test_a_message_with_media_is_refused_before_tdlib() -> None:
    """Media is not sent yet: the builder refuses it with a PermanentError, nothing is built."""
    photo = Media(MediaKind.PHOTO, 1, 10, "image/jpeg", "a.jpg", "0" * 64)
    with pytest.raises(PermanentError, match="media not supported yet"):
        send_message_query(1, OutgoingMessage(FormattedText("caption"), media=(photo,)))


def test_a_confirmed_message_becomes_a_sent_message() -> None:
    """sent_message takes the message's final id and chat from TDLib's `message`; an album keeps all ids."""
    assert sent_message({"@type": "message", "id": 1048576, "chat_id": 42}) == SentMessage(1048576, 42)
    assert sent_message({"id": 1048576, "chat_id": 42}).telegram_message_ids == (1048576,)
    album = sent_messages([{"id": 1, "chat_id": 42}, {"id": 2, "chat_id": 42}])
    assert (album.telegram_message_id, album.telegram_message_ids) == (1, (1, 2))


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


def test_forward_edit_and_delete_are_shapes_tdlib_parses() -> None:
    """forwardMessages, editMessageText, editMessageCaption, deleteMessages and viewMessages as the
    platform builds them: the real library parses each and reads every field set on it."""
    text = FormattedText("new 😀 text", (Entity("italic", 0, 3),))
    forward = forward_messages_query(1, 2, [3 << 20, 4 << 20])
    assert forward == {"@type": "forwardMessages", "chat_id": 1, "from_chat_id": 2, "message_ids": [3 << 20, 4 << 20],
                       "options": {"@type": "messageSendOptions"}, "send_copy": False, "remove_caption": False}
    edit_text = edit_message_query(1, 5 << 20, text, caption=False)
    edit_caption = edit_message_query(1, 5 << 20, text, caption=True)
    assert edit_text["@type"] == "editMessageText" and edit_caption["@type"] == "editMessageCaption"
    assert edit_caption["caption"] == edit_text["input_message_content"]["text"] == formatted_text(text)
    delete = delete_messages_query(1, [5 << 20], revoke=True)
    assert delete == {"@type": "deleteMessages", "chat_id": 1, "message_ids": [5 << 20], "revoke": True}
    for query, fields in [
        (forward, [("chat_id",), ("from_chat_id",), ("message_ids",), ("options",), ("send_copy",),
                   ("remove_caption",)]),
        (edit_text, [("chat_id",), ("message_id",), ("input_message_content",),
                     ("input_message_content", "text", "entities", 0, "offset")]),
        (edit_caption, [("chat_id",), ("message_id",), ("caption",), ("caption", "entities")]),
        (delete, [("chat_id",), ("message_ids",), ("revoke",)]),
        (view_messages_query(1, [5 << 20]), [("chat_id",), ("message_ids",), ("source",), ("force_read",)]),
    ]:
        assert_parses(query)
        for path in fields:
            assert_field_read(query, path)


def test_a_received_message_keeps_its_entities_reply_and_forward_origin() -> None:
    """incoming_message reads entities (UTF-16 offsets), the replied-to message of the same chat and
    the forward's origin, in TDLib 1.8.69's shapes."""
    message = {"@type": "message", "id": 9, "chat_id": 99, "date": 1700000000, "is_outgoing": False,
               "sender_id": {"@type": "messageSenderUser", "user_id": 555},
               "reply_to": {"@type": "messageReplyToMessage", "chat_id": 99, "message_id": 7},
               "forward_info": {"@type": "messageForwardInfo", "date": 1690000000,
                                "origin": {"@type": "messageOriginUser", "sender_user_id": 42}},
               "content": {"@type": "messageText", "text": {"@type": "formattedText", "text": "😀 hi", "entities": [
                   {"@type": "textEntity", "offset": 3, "length": 2, "type": {"@type": "textEntityTypeBold"}}]}}}
    incoming = incoming_message(3, message)
    assert incoming is not None
    assert (incoming.entities, incoming.reply_to, incoming.forward_from, incoming.kind) == (
        (Entity("bold", 3, 2),), 7, {"type": "user", "id": 42}, "text")
    elsewhere = {**message, "reply_to": {"@type": "messageReplyToMessage", "chat_id": 1, "message_id": 7},
                 "forward_info": {"origin": {"@type": "messageOriginChannel", "chat_id": -100, "message_id": 5}}}
    other = incoming_message(3, elsewhere)
    assert other is not None and other.reply_to is None
    assert other.forward_from == {"type": "channel", "id": -100, "message_id": 5}


def test_edits_deletions_and_read_receipts_become_changes() -> None:
    """updateMessageContent (text), updateDeleteMessages (permanent only), updateChatReadOutbox."""
    text = {"@type": "messageText", "text": {"@type": "formattedText", "text": "edited", "entities": []}}
    assert message_change(3, {"@type": "updateMessageContent", "chat_id": 99, "message_id": 7, "new_content": text},
                          1700000000) == IncomingEdited(3, 99, 7, FormattedText("edited"), 1700000000)
    assert message_change(3, {"@type": "updateMessageContent", "chat_id": 99, "message_id": 7,
                              "new_content": {"@type": "messagePhoto"}}, 0) is None
    deleted = {"@type": "updateDeleteMessages", "chat_id": 99, "message_ids": [7, 8], "is_permanent": True,
               "from_cache": False}
    assert message_change(3, deleted, 0) == MessagesDeleted(3, 99, (7, 8))
    assert message_change(3, {**deleted, "is_permanent": False, "from_cache": True}, 0) is None
    assert message_change(3, {"@type": "updateChatReadOutbox", "chat_id": 99, "last_read_outbox_message_id": 8},
                          0) == ReadOutbox(3, 99, 8)
