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

from telegram_platform.telegram.base import (
    IncomingEdited,
    IncomingMessage,
    MessageChange,
    MessagesDeleted,
    PermanentError,
    ReadOutbox,
    SentMessage,
)
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


def forward_messages_query(chat_id: int, from_chat_id: int, message_ids: Sequence[int]) -> Event:
    """The `forwardMessages` query: the messages as forwards (not copies), captions kept."""
    return {"@type": "forwardMessages", "chat_id": chat_id, "from_chat_id": from_chat_id,
            "message_ids": list(message_ids), "options": {"@type": "messageSendOptions"},
            "send_copy": False, "remove_caption": False}


def edit_message_query(chat_id: int, message_id: int, text: FormattedText, *, caption: bool) -> Event:
    """`editMessageText` for a text message, `editMessageCaption` for a media message's caption."""
    if caption:
        return {"@type": "editMessageCaption", "chat_id": chat_id, "message_id": message_id,
                "caption": formatted_text(text)}
    return {"@type": "editMessageText", "chat_id": chat_id, "message_id": message_id,
            "input_message_content": {"@type": "inputMessageText", "text": formatted_text(text)}}


def delete_messages_query(chat_id: int, message_ids: Sequence[int], *, revoke: bool) -> Event:
    """`deleteMessages`: `revoke` deletes them for everyone, else for the account only."""
    return {"@type": "deleteMessages", "chat_id": chat_id, "message_ids": list(message_ids), "revoke": revoke}


def view_messages_query(chat_id: int, message_ids: Sequence[int]) -> Event:
    """`viewMessages` read as from the chat's history, forced read (a client may read a chat it has not
    opened): the sender gets the read receipt."""
    return {"@type": "viewMessages", "chat_id": chat_id, "message_ids": list(message_ids),
            "source": {"@type": "messageSourceChatHistory"}, "force_read": True}


def sent_messages(messages: Sequence[Mapping[str, Any]]) -> SentMessage:
    """TDLib `message`s Telegram accepted for one send (one, or an album's), as the platform records it."""
    ids = tuple(int(m["id"]) for m in messages)
    return SentMessage(telegram_message_id=ids[0], chat_id=int(messages[0]["chat_id"]), telegram_message_ids=ids)


def sent_message(message: Mapping[str, Any]) -> SentMessage:
    """A TDLib `message` that Telegram accepted, as the platform records it."""
    return sent_messages([message])


def incoming_message(account_id: int, message: Mapping[str, Any]) -> IncomingMessage | None:
    """A TDLib `message` the account received, or None when the platform does not take it in
    (its own outgoing messages, kinds it does not read yet): its text and entities, the message it
    replies to (in the same chat) and who a forward came from."""
    content = message.get("content") or {}
    if message.get("is_outgoing") or content.get("@type") != "messageText":
        return None
    sender = message.get("sender_id") or {}
    sender_id = sender.get("user_id", sender.get("chat_id", ""))
    text = read_formatted_text(content.get("text"))
    reply = message.get("reply_to") or {}
    reply_to = (int(reply["message_id"]) if reply.get("@type") == "messageReplyToMessage"
                and int(reply.get("chat_id", message["chat_id"])) == int(message["chat_id"])
                and reply.get("message_id") else None)
    return IncomingMessage(
        account_id=account_id, chat_id=int(message["chat_id"]),
        telegram_message_id=int(message["id"]), sender=str(sender_id),
        text=text.text, date=int(message.get("date", 0)), entities=text.entities, reply_to=reply_to,
        forward_from=forward_origin(message.get("forward_info")))


def forward_origin(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Who a forwarded message came from (TDLib's messageForwardInfo.origin), in the platform's words."""
    if not info:
        return None
    origin = info.get("origin") or {}
    kind = origin.get("@type")
    if kind == "messageOriginUser":
        return {"type": "user", "id": int(origin["sender_user_id"])}
    if kind == "messageOriginHiddenUser":
        return {"type": "hidden_user", "name": str(origin.get("sender_name", ""))}
    if kind == "messageOriginChat":
        return {"type": "chat", "id": int(origin["sender_chat_id"])}
    if kind == "messageOriginChannel":
        return {"type": "channel", "id": int(origin["chat_id"]), "message_id": int(origin.get("message_id", 0))}
    return {"type": "unknown"}


def message_change(account_id: int, update: Mapping[str, Any], now: int) -> MessageChange | None:
    """An edit (updateMessageContent with new text), a deletion (updateDeleteMessages, permanent
    only: TDLib also reports messages merely dropped from its cache) or a read receipt
    (updateChatReadOutbox), as the platform records it; None for anything else."""
    kind = update.get("@type")
    if kind == "updateMessageContent":
        content = update.get("new_content") or {}
        if content.get("@type") != "messageText":
            return None
        return IncomingEdited(account_id, int(update["chat_id"]), int(update["message_id"]),
                              read_formatted_text(content.get("text")), now)
    if kind == "updateDeleteMessages":
        if not update.get("is_permanent") or update.get("from_cache"):
            return None
        return MessagesDeleted(account_id, int(update["chat_id"]),
                               tuple(int(i) for i in update.get("message_ids") or ()))
    if kind == "updateChatReadOutbox":
        return ReadOutbox(account_id, int(update["chat_id"]), int(update["last_read_outbox_message_id"]))
    return None
