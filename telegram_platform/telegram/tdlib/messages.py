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
from telegram_platform.telegram.content import (
    Entity,
    FormattedText,
    IncomingMedia,
    Media,
    MediaKind,
    OutgoingMessage,
)
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
    """The query for `message` to `chat_id`: `sendMessage` with its text or its one file (the text
    its caption), or `sendMessageAlbum` for an album."""
    caption = formatted_text(message.text) if message.media and message.text.text else None
    query: Event
    if message.is_album:
        query = send_album_query(chat_id, message.media, caption)
    elif message.media:
        query = send_media_query(chat_id, message.media[0], caption)
    else:
        query = {"@type": "sendMessage", "chat_id": chat_id, "input_message_content": text_content(message)}
    query["options"] = send_options(message)
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
    remote_ids = tuple(remote_file_id(m) or "" for m in messages)
    return SentMessage(telegram_message_id=ids[0], chat_id=int(messages[0]["chat_id"]), telegram_message_ids=ids,
                       remote_file_ids=remote_ids if any(remote_ids) else ())


def sent_message(message: Mapping[str, Any]) -> SentMessage:
    """A TDLib `message` that Telegram accepted, as the platform records it."""
    return sent_messages([message])


def incoming_message(account_id: int, message: Mapping[str, Any]) -> IncomingMessage | None:
    """A TDLib `message` the account received, or None when the platform does not take it in
    (its own outgoing messages, kinds it does not read yet): its text and entities, the message it
    replies to (in the same chat) and who a forward came from."""
    content = message.get("content") or {}
    media = incoming_media(content)
    if message.get("is_outgoing") or (content.get("@type") != "messageText" and media is None):
        return None
    sender = message.get("sender_id") or {}
    sender_id = sender.get("user_id", sender.get("chat_id", ""))
    text = read_formatted_text(content.get("caption") if media is not None else content.get("text"))
    reply = message.get("reply_to") or {}
    reply_to = (int(reply["message_id"]) if reply.get("@type") == "messageReplyToMessage"
                and int(reply.get("chat_id", message["chat_id"])) == int(message["chat_id"])
                and reply.get("message_id") else None)
    return IncomingMessage(
        account_id=account_id, chat_id=int(message["chat_id"]),
        telegram_message_id=int(message["id"]), sender=str(sender_id),
        text=text.text, date=int(message.get("date", 0)), entities=text.entities, reply_to=reply_to,
        forward_from=forward_origin(message.get("forward_info")),
        kind=media.kind.value if media is not None else "text", media=media.to_json() if media is not None else None)


# -- files and media ------------------------------------------------------------------------------

# Each kind's inputMessage* class, and the field that holds its file.
INPUT_MESSAGE_CLASSES: dict[MediaKind, tuple[str, str]] = {
    MediaKind.PHOTO: ("inputMessagePhoto", "photo"),
    MediaKind.VIDEO: ("inputMessageVideo", "video"),
    MediaKind.DOCUMENT: ("inputMessageDocument", "document"),
    MediaKind.AUDIO: ("inputMessageAudio", "audio"),
    MediaKind.VOICE: ("inputMessageVoiceNote", "voice_note"),
    MediaKind.ANIMATION: ("inputMessageAnimation", "animation"),
    MediaKind.STICKER: ("inputMessageSticker", "sticker"),
}
# A received message's content class, the kind it is, and the path to its file object.
MESSAGE_CONTENT_KINDS: dict[str, tuple[MediaKind, str]] = {
    "messagePhoto": (MediaKind.PHOTO, "photo"),
    "messageVideo": (MediaKind.VIDEO, "video"),
    "messageDocument": (MediaKind.DOCUMENT, "document"),
    "messageAudio": (MediaKind.AUDIO, "audio"),
    "messageVoiceNote": (MediaKind.VOICE, "voice_note"),
    "messageAnimation": (MediaKind.ANIMATION, "animation"),
    "messageSticker": (MediaKind.STICKER, "sticker"),
}


def input_file(media: Media) -> Event:
    """Telegram's id of the file when this account sent it before (no upload), else the local copy."""
    if media.remote_id:
        return {"@type": "inputFileRemote", "id": media.remote_id}
    if media.path is None:
        raise ValueError(f"file {media.file_id}: neither a remote id nor a local path")
    return {"@type": "inputFileLocal", "path": str(media.path)}


def media_content(media: Media, caption: Event | None) -> Event:
    """The `inputMessage*` content of one file; `caption` a formattedText (none for a sticker).

    Only the file and the caption: tdjson 1.8.69's parser ignores width, height, duration,
    thumbnail, title and waveform on these classes (a wrong type there is not refused, as it is for
    every field it reads: tests/telegram/test_tdlib_messages.py), so TDLib takes them from the file."""
    cls, file_field = INPUT_MESSAGE_CLASSES[media.kind]
    content: dict[str, Any] = {"@type": cls, file_field: input_file(media)}
    if media.kind is not MediaKind.STICKER and caption is not None:
        content["caption"] = caption
    return content


def send_media_query(chat_id: int, media: Media, caption: Event | None) -> Event:
    """The `sendMessage` query for one file with its caption."""
    return {"@type": "sendMessage", "chat_id": chat_id, "input_message_content": media_content(media, caption)}


def send_album_query(chat_id: int, media: tuple[Media, ...], caption: Event | None) -> Event:
    """The `sendMessageAlbum` query for 2 to 10 photos and videos; the caption goes on the first,
    which is where Telegram shows an album's one caption."""
    contents = [media_content(item, caption if index == 0 else None) for index, item in enumerate(media)]
    return {"@type": "sendMessageAlbum", "chat_id": chat_id, "input_message_contents": contents}


def get_remote_file_query(remote_id: str) -> Event:
    """`getRemoteFile`: TDLib's file object (with its local id) for a persistent remote id."""
    return {"@type": "getRemoteFile", "remote_file_id": remote_id, "file_type": None}


def download_file_query(file_id: int) -> Event:
    """`downloadFile`, answered once the whole file is on disk (synchronous)."""
    return {"@type": "downloadFile", "file_id": file_id, "priority": 1, "offset": 0, "limit": 0,
            "synchronous": True}


def _content_file(content: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The `file` object of a media content: a photo's largest size, else the kind's own file."""
    kind = MESSAGE_CONTENT_KINDS.get(str(content.get("@type")))
    if kind is None:
        return None
    holder = content.get(kind[1]) or {}
    if kind[0] is MediaKind.PHOTO:
        sizes = holder.get("sizes") or []
        return sizes[-1].get("photo") if sizes else None
    inner = holder.get(kind[1]) if kind[0] is not MediaKind.VOICE else holder.get("voice")
    return inner if isinstance(inner, Mapping) else None


def remote_file_id(message: Mapping[str, Any]) -> str | None:
    """Telegram's persistent id of the file a sent message carries (reused by later sends)."""
    file = _content_file(message.get("content") or {})
    remote = (file or {}).get("remote") or {}
    return str(remote["id"]) if remote.get("id") else None


def incoming_media(content: Mapping[str, Any]) -> IncomingMedia | None:
    """The metadata of a received media content (None for text and kinds the platform does not take)."""
    kind_path = MESSAGE_CONTENT_KINDS.get(str(content.get("@type")))
    if kind_path is None:
        return None
    kind, holder_field = kind_path
    holder = content.get(holder_field) or {}
    file = _content_file(content) or {}
    remote = (file.get("remote") or {}).get("id") or ""
    size = int(file.get("size") or file.get("expected_size") or 0)
    if kind is MediaKind.PHOTO:
        sizes = holder.get("sizes") or [{}]
        largest = sizes[-1]
        return IncomingMedia(kind, size, "image/jpeg", "", largest.get("width"), largest.get("height"), None,
                             str(remote))
    return IncomingMedia(
        kind, size, str(holder.get("mime_type") or ("image/webp" if kind is MediaKind.STICKER else
                                                     "application/octet-stream")),
        str(holder.get("file_name") or ""), holder.get("width"), holder.get("height"), holder.get("duration"),
        str(remote))


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
