"""Messages the platform sends: a send request, a message and its status, pages of them
(`api/routes/messages.py`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

from telegram_platform.api.schemas.fields import NO_NUL, Cursor, IdempotencyKey, Peer, PositiveId

# The status types are the values of telegram_platform/states.py, spelled as Literals so the OpenAPI
# document lists them inline (tests/test_states.py holds the two equal).
MessageStatus = Literal["queued", "sending", "sent", "read", "failed", "cancelled"]


# The raw text a client sends: markup (MarkdownV2, HTML) takes room the parsed text does not, so
# the bound here is loose; Telegram's 4,096 UTF-16 units apply to the parsed text (422 MESSAGE_TOO_LONG).
MessageText = Annotated[str, msgspec.Meta(min_length=1, max_length=16384, pattern=NO_NUL, examples=["*hi*"])]
ParseModeName = Annotated[Literal["markdown", "html"], msgspec.Meta(
    description="`markdown`: Telegram's MarkdownV2; `html`: its HTML subset. Parsed by TDLib itself")]
EntityType = Literal[
    "bold", "italic", "underline", "strikethrough", "spoiler", "code", "pre", "text_link", "text_mention",
    "custom_emoji", "blockquote", "expandable_blockquote", "mention", "hashtag", "cashtag", "bot_command",
    "url", "email", "phone_number", "bank_card_number"]
Utf16 = Annotated[int, msgspec.Meta(ge=0, le=65536)]


# With `media`, the text is a caption and may be left out.
CaptionOrText = Annotated[str, msgspec.Meta(max_length=16384, pattern=NO_NUL, examples=["*hi*"], description=(
    "the message (required without `media`); with `media`, its caption (at most 1,024 UTF-16 units once "
    "parsed; may be left out)"))]
MediaKindName = Literal["photo", "video", "document", "audio", "voice", "animation", "sticker"]


class MessageMedia(msgspec.Struct, forbid_unknown_fields=True):
    file_id: Annotated[PositiveId, msgspec.Meta(description="an uploaded file's id (POST /api/files)")]
    kind: MediaKindName


MediaList = Annotated[list[MessageMedia], msgspec.Meta(min_length=1, max_length=10, description=(
    "one file (any kind), or an album of 2 to 10 photos and videos sharing the caption"))]


class Entity(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One formatting entity, as Telegram's Bot API has it: offsets and lengths in UTF-16 code units.
    `url` is required for text_link, `user_id` for text_mention, `custom_emoji_id` for custom_emoji;
    `language` is optional for pre."""

    type: EntityType
    offset: Utf16
    length: Annotated[int, msgspec.Meta(ge=1, le=65536)]
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=NO_NUL)] | None = None
    user_id: PositiveId | None = None
    language: Annotated[str, msgspec.Meta(max_length=64, pattern=NO_NUL)] | None = None
    custom_emoji_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,20}$")] | None = None


Entities = Annotated[list[Entity], msgspec.Meta(max_length=100)]


class MessageOptions(msgspec.Struct, omit_defaults=False):
    silent: bool = False
    protect_content: bool = False
    disable_web_page_preview: bool = False
    # A deletion's: for everyone, or for the account alone.
    for_everyone: bool | None = None


class SendMessage(msgspec.Struct, forbid_unknown_fields=True):
    """A message to send. `text` is plain, or marked up per `parse_mode`, or plain with explicit
    `entities` (not both). A reply names the message replied to by the platform's id: a message this
    account sent to the same peer (`reply_to_message_id`) or one it received
    (`reply_to_incoming_id`; `peer` may then be left out: the reply goes to that message's chat)."""

    account_id: PositiveId
    text: CaptionOrText = ""
    peer: Peer | None = None
    parse_mode: ParseModeName | None = None
    entities: Entities | None = None
    disable_web_page_preview: bool = False
    silent: Annotated[bool, msgspec.Meta(description="deliver without a notification")] = False
    protect_content: Annotated[bool, msgspec.Meta(description="the recipient cannot forward or save it")] = False
    reply_to_message_id: PositiveId | None = None
    reply_to_incoming_id: PositiveId | None = None
    idempotency_key: IdempotencyKey | None = None
    media: MediaList | None = None


class ForwardMessage(msgspec.Struct, forbid_unknown_fields=True):
    """Forward a sent message, from the account that sent it, to another peer."""

    peer: Peer
    idempotency_key: IdempotencyKey | None = None


class EditMessage(msgspec.Struct, forbid_unknown_fields=True):
    """The new text (a caption, for a media message) of a sent message, within Telegram's 48 hours."""

    text: MessageText
    parse_mode: ParseModeName | None = None
    entities: Entities | None = None
    idempotency_key: IdempotencyKey | None = None


class DeleteQuery(msgspec.Struct, forbid_unknown_fields=True):
    for_everyone: Annotated[bool, msgspec.Meta(
        description="delete for the recipient too (Telegram's revoke); false: for the account alone")] = True


MessageAction = Literal["send", "forward", "edit", "delete"]


class Message(msgspec.Struct):
    id: int
    account_id: Annotated[int | None, msgspec.Meta(
        description="The account that sends it; null once that account was removed (its messages stay)")]
    peer: str
    text: Annotated[str, msgspec.Meta(description="the parsed text (markup removed); an edit's new text")]
    entities: list[Entity]
    options: MessageOptions
    status: MessageStatus
    attempts: int
    error: str | None
    error_class: str | None
    telegram_message_id: int | None
    telegram_message_ids: Annotated[list[int] | None, msgspec.Meta(
        description="every Telegram message id the send made, or the action acted on")]
    chat_id: int | None
    action: Annotated[MessageAction, msgspec.Meta(
        description="send; or forward, edit, delete of the message `target_id`")]
    target_id: int | None
    reply_to: Annotated[int | None, msgspec.Meta(description="Telegram's id of the message replied to")]
    reply_to_message_id: int | None
    reply_to_incoming_id: int | None
    idempotency_key: str | None
    not_before: dt.datetime
    sent_at: dt.datetime | None
    edited_at: dt.datetime | None
    deleted_at: dt.datetime | None
    read_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    media: Annotated[list[MessageMedia], msgspec.Meta(description="the files a send carries ([] for text)")] = \
        msgspec.field(default_factory=list)


class MessageQuery(msgspec.Struct, forbid_unknown_fields=True):
    account_id: PositiveId | None = None
    status: MessageStatus | None = None
    action: MessageAction | None = None
    cursor: Cursor | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class MessagePage(msgspec.Struct):
    items: list[Message]
    next_cursor: str | None
