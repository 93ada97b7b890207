"""What a message says, whichever backend carries it: formatted text, media, a reply and send options.

The platform's words for a message's content, shared by the API (which parses and validates what a
client sends), the outbox (which stores it), the sender (which hands it to a session) and both
backends (which put it into TDLib's or the emulator's words). Offsets and lengths count UTF-16 code
units, as Telegram does. A leaf: it imports nothing of the platform.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# Telegram's limits, in UTF-16 code units (https://core.telegram.org/method/messages.sendMessage,
# https://limits.tginfo.me): a message's text, a media caption; an album holds 2 to 10 items.
MAX_TEXT_LENGTH: Final = 4096
MAX_CAPTION_LENGTH: Final = 1024
ALBUM_MIN: Final = 2
ALBUM_MAX: Final = 10


class ParseMode(enum.StrEnum):
    """How a client's text is marked up: Telegram's MarkdownV2, or its HTML subset."""

    MARKDOWN = "markdown"
    HTML = "html"


class MediaKind(enum.StrEnum):
    """The kinds of file a message may carry (TDLib's `inputMessage*` / `message*` contents)."""

    PHOTO = "photo"
    VIDEO = "video"
    DOCUMENT = "document"
    AUDIO = "audio"
    VOICE = "voice"
    ANIMATION = "animation"
    STICKER = "sticker"


# Kinds that may stand in an album (Telegram's media groups mix photos and videos).
ALBUM_KINDS: Final = frozenset({MediaKind.PHOTO, MediaKind.VIDEO})
# Kinds that carry no caption in Telegram.
CAPTIONLESS_KINDS: Final = frozenset({MediaKind.STICKER})


def utf16_length(text: str) -> int:
    """The length of `text` as Telegram counts it: UTF-16 code units (an emoji outside the BMP is 2)."""
    return len(text.encode("utf-16-le")) // 2


@dataclass(frozen=True, slots=True)
class Entity:
    """One formatting entity. `type` is the Bot API's name (bold, italic, underline, strikethrough,
    spoiler, code, pre, text_link, text_mention, custom_emoji, blockquote, mention, hashtag, cashtag,
    bot_command, url, email, phone_number, bank_card_number); `url` for text_link, `user_id` for
    text_mention, `language` for pre, `custom_emoji_id` for custom_emoji."""

    type: str
    offset: int
    length: int
    url: str | None = None
    user_id: int | None = None
    language: str | None = None
    custom_emoji_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "offset": self.offset, "length": self.length}
        for name in ("url", "user_id", "language", "custom_emoji_id"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entity:
        return cls(type=str(data["type"]), offset=int(data["offset"]), length=int(data["length"]),
                   url=data.get("url"), user_id=data.get("user_id"), language=data.get("language"),
                   custom_emoji_id=data.get("custom_emoji_id"))


@dataclass(frozen=True, slots=True)
class FormattedText:
    """Text and its entities, markup already parsed away."""

    text: str
    entities: tuple[Entity, ...] = ()

    def entities_json(self) -> list[dict[str, Any]]:
        return [entity.to_json() for entity in self.entities]

    @classmethod
    def from_json(cls, text: str, entities: Sequence[Mapping[str, Any]] | None) -> FormattedText:
        return cls(text, tuple(Entity.from_json(e) for e in entities or ()))


@dataclass(frozen=True, slots=True)
class Media:
    """A file a message carries, from the platform's file store.

    The sender fills in `path` (a local copy on this host) or `remote_id` (Telegram's id of the file,
    once Telegram has it for this account, so it is not uploaded again) before handing the message
    to a session; a backend uses `remote_id` when set, else `path`."""

    kind: MediaKind
    file_id: int
    size: int
    mime_type: str
    file_name: str
    sha256: str
    width: int | None = None
    height: int | None = None
    duration: int | None = None
    path: Path | None = None
    remote_id: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class IncomingMedia:
    """The file a received message carries, as the backend reports it: what it is (its caption is
    the message's text), and `remote_id`, the backend's handle to download it through the account
    (TDLib's file id, the emulator's file reference), never shown to clients."""

    kind: MediaKind
    size: int
    mime_type: str
    file_name: str = ""
    width: int | None = None
    height: int | None = None
    duration: int | None = None
    remote_id: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        """The metadata as stored and published (incoming_messages.media, `message.incoming`), with
        `remote_id`: Telegram's id of the file for this account, which only its session can use (the
        worker downloads the file by it, GET /api/incoming/{id}/file)."""
        data: dict[str, Any] = {"kind": self.kind.value, "size": self.size, "mime_type": self.mime_type,
                                "file_name": self.file_name}
        for name in ("width", "height", "duration"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        data["remote_id"] = self.remote_id
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IncomingMedia:
        return cls(MediaKind(str(data["kind"])), int(data.get("size") or 0),
                   str(data.get("mime_type") or "application/octet-stream"), str(data.get("file_name") or ""),
                   data.get("width"), data.get("height"), data.get("duration"), str(data.get("remote_id") or ""))


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to send: its text (the caption when it carries media), no media (a text message),
    one file, or an album of ALBUM_MIN to ALBUM_MAX photos and videos with one caption; a reply to a
    message of the same chat (Telegram's id); and the send options."""

    text: FormattedText
    media: tuple[Media, ...] = ()
    reply_to: int | None = None
    silent: bool = False
    protect_content: bool = False
    disable_web_page_preview: bool = False

    @property
    def is_album(self) -> bool:
        return len(self.media) > 1


def plain(text: str) -> OutgoingMessage:
    """A text message without entities, media or options."""
    return OutgoingMessage(FormattedText(text))
