"""What a message is in TDLib's words, both ways: a send from the platform becomes a `sendMessage`
query with its `inputMessage*` content, and TDLib's `message` objects become the platform's
`SentMessage` (a confirmed send) and `IncomingMessage` (a message the account received). Each new
kind of message gets its builder and its reader here, beside the text's.

Field names are tdjson 1.8.69's (tests/telegram/test_tdlib_messages.py has the real library parse
every shape): `inputMessageText.link_preview_options`, `messageSendOptions`,
`inputMessageReplyToMessage` without a chat_id (a reply within the same chat).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from telegram_platform.telegram.base import IncomingMessage, PermanentError, SentMessage
from telegram_platform.telegram.content import Entity, FormattedText, OutgoingMessage
from telegram_platform.telegram.tdlib.protocol import Event

# The platform's (Bot API) entity type names and TDLib's textEntityType classes. `pre` with a
# language is textEntityTypePreCode; the rest map one to one.
ENTITY_TYPES: Final[Mapping[str, str]] = {
    "bold": "textEntityTypeBold",
    "italic": "textEntityTypeItalic",
    "underline": "textEntityTypeUnderline",
    "strikethrough": "textEntityTypeStrikethrough",
    "spoiler": "textEntityTypeSpoiler",
    "code": "textEntityTypeCode",
    "pre": "textEntityTypePre",
    "text_link": "textEntityTypeTextUrl",
    "text_mention": "textEntityTypeMentionName",
    "custom_emoji": "textEntityTypeCustomEmoji",
    "blockquote": "textEntityTypeBlockQuote",
    "expandable_blockquote": "textEntityTypeExpandableBlockQuote",
    "mention": "textEntityTypeMention",
    "hashtag": "textEntityTypeHashtag",
    "cashtag": "textEntityTypeCashtag",
    "bot_command": "textEntityTypeBotCommand",
    "url": "textEntityTypeUrl",
    "email": "textEntityTypeEmailAddress",
    "phone_number": "textEntityTypePhoneNumber",
    "bank_card_number": "textEntityTypeBankCardNumber",
}
_ENTITY_NAMES: Final[Mapping[str, str]] = {
    **{td: name for name, td in ENTITY_TYPES.items()}, "textEntityTypePreCode": "pre"}


def entity_type(entity: Entity) -> Event:
    """An entity's `textEntityType*` object, with the field its type requires."""
    if entity.type == "pre" and entity.language:
        return {"@type": "textEntityTypePreCode", "language": entity.language}
    td_type = ENTITY_TYPES.get(entity.type)
    if td_type is None:
        raise PermanentError(400, f"unknown entity type {entity.type!r}")
    kind: Event = {"@type": td_type}
    if entity.type == "text_link":
        kind["url"] = entity.url or ""
    elif entity.type == "text_mention":
        kind["user_id"] = entity.user_id or 0
    elif entity.type == "custom_emoji":
        kind["custom_emoji_id"] = entity.custom_emoji_id or "0"
    return kind


def formatted_text(text: FormattedText) -> Event:
    """A `formattedText`: the text and its entities as `textEntity` objects (UTF-16 offsets, as TDLib's)."""
    return {"@type": "formattedText", "text": text.text,
            "entities": [{"@type": "textEntity", "offset": e.offset, "length": e.length, "type": entity_type(e)}
                         for e in text.entities]}


def read_formatted_text(data: Mapping[str, Any] | None) -> FormattedText:
    """A TDLib `formattedText` in the platform's words; entity types the platform has no name for
    (e.g. textEntityTypeMediaTimestamp) are left out."""
    if not data:
        return FormattedText("")
    entities = []
    for raw in data.get("entities") or ():
        kind = raw.get("type") or {}
        name = _ENTITY_NAMES.get(str(kind.get("@type")))
        if name is None:
            continue
        entities.append(Entity(
            type=name, offset=int(raw["offset"]), length=int(raw["length"]), url=kind.get("url"),
            user_id=int(kind["user_id"]) if "user_id" in kind else None,
            language=kind.get("language") or None,
            custom_emoji_id=str(kind["custom_emoji_id"]) if "custom_emoji_id" in kind else None))
    return FormattedText(str(data.get("text", "")), tuple(entities))


def text_content(message: OutgoingMessage) -> Event:
    """A text message's content (`inputMessageText`): its formatted text and link preview option."""
    content: Event = {"@type": "inputMessageText", "text": formatted_text(message.text)}
    if message.disable_web_page_preview:
        content["link_preview_options"] = {"@type": "linkPreviewOptions", "is_disabled": True}
    return content


def send_options(message: OutgoingMessage) -> Event:
    """The `messageSendOptions` of a send: a silent one notifies nobody; protected content cannot be
    forwarded or saved."""
    return {"@type": "messageSendOptions", "disable_notification": message.silent,
            "protect_content": message.protect_content}


def send_message_query(chat_id: int, message: OutgoingMessage) -> Event:
    """The `sendMessage` query for `message` to `chat_id`. A message with media is refused until the
    platform sends media (PermanentError: nothing reaches TDLib)."""
    if message.media:
        raise PermanentError(400, "media not supported yet")
    query: Event = {"@type": "sendMessage", "chat_id": chat_id, "options": send_options(message),
                    "input_message_content": text_content(message)}
    if message.reply_to is not None:
        query["reply_to"] = {"@type": "inputMessageReplyToMessage", "message_id": message.reply_to}
    return query


def sent_messages(messages: Sequence[Mapping[str, Any]]) -> SentMessage:
    """TDLib `message`s Telegram accepted for one send (one, or an album's), as the platform records it."""
    ids = tuple(int(m["id"]) for m in messages)
    return SentMessage(telegram_message_id=ids[0], chat_id=int(messages[0]["chat_id"]), telegram_message_ids=ids)


def sent_message(message: Mapping[str, Any]) -> SentMessage:
    """A TDLib `message` that Telegram accepted, as the platform records it."""
    return sent_messages([message])


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
