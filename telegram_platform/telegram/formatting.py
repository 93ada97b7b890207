"""A client's text made into what Telegram takes: markup parsed by TDLib itself, explicit entities
and lengths checked by Telegram's rules, template values escaped so they cannot add markup.

Parsing is TDLib's `parseTextEntities`, a synchronous call that needs no client and no network
(`td_execute`), the same in the API process, the worker and both backends: the platform has no
second parser whose idea of MarkdownV2 could differ from Telegram's. `configure_logging` must run
once per process before the first parse (TDLib's default verbosity logs every call).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from telegram_platform.telegram.content import (
    MAX_CAPTION_LENGTH,
    MAX_TEXT_LENGTH,
    Entity,
    FormattedText,
    ParseMode,
    utf16_length,
)
from telegram_platform.telegram.tdlib.messages import ENTITY_TYPES, read_formatted_text
from telegram_platform.telegram.tdlib.protocol import execute

# Entities Telegram keeps per message.
MAX_ENTITIES: Final = 100
# The field each entity type cannot do without.
REQUIRED_FIELDS: Final = {"text_link": "url", "text_mention": "user_id", "custom_emoji": "custom_emoji_id"}
_PARSE_MODES: Final = {ParseMode.MARKDOWN: {"@type": "textParseModeMarkdown", "version": 2},
                       ParseMode.HTML: {"@type": "textParseModeHTML"}}
# MarkdownV2's special characters, each escaped with a backslash outside entities
# (https://core.telegram.org/bots/api#markdownv2-style).
_MARKDOWN_SPECIAL: Final = re.compile(r"([_*\[\]()~`>#+\-=|{}.!\\])")


class ContentInvalid(ValueError):
    """Telegram would refuse this text: `message` in Telegram's words (MESSAGE_TOO_LONG,
    ENTITY_BOUNDS_INVALID, "Can't parse entities: ...")."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def configure_logging(verbosity: int) -> None:
    """TDLib's log verbosity for this process (TDLIB_LOG_VERBOSITY): quiet unless asked."""
    execute({"@type": "setLogVerbosityLevel", "new_verbosity_level": verbosity})


def parse(text: str, mode: ParseMode) -> FormattedText:
    """`text` with its markup parsed away into entities, by TDLib; ContentInvalid with TDLib's words
    when the markup does not parse."""
    answer = execute({"@type": "parseTextEntities", "text": text, "parse_mode": _PARSE_MODES[mode]})
    if answer is None or answer.get("@type") != "formattedText":
        raise ContentInvalid(str((answer or {}).get("message", "Can't parse entities")))
    return read_formatted_text(answer)


def escape(value: str, mode: ParseMode | None) -> str:
    """`value` made literal text in `mode`: a template variable's value can never add markup."""
    if mode is ParseMode.MARKDOWN:
        return _MARKDOWN_SPECIAL.sub(r"\\\1", value)
    if mode is ParseMode.HTML:
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return value


def check(text: FormattedText, *, caption: bool = False) -> FormattedText:
    """Telegram's rules for a text (or a caption) and its entities; returns `text`, or raises
    ContentInvalid with the error Telegram would answer."""
    length = utf16_length(text.text)
    if not caption and not text.text.strip():
        raise ContentInvalid("MESSAGE_EMPTY")
    if length > (MAX_CAPTION_LENGTH if caption else MAX_TEXT_LENGTH):
        raise ContentInvalid("MEDIA_CAPTION_TOO_LONG" if caption else "MESSAGE_TOO_LONG")
    check_entities(text.entities, length)
    return text


def check_entities(entities: Sequence[Entity], length: int) -> None:
    """Each entity of a known type, inside the text's `length` UTF-16 units, with its type's field."""
    if len(entities) > MAX_ENTITIES:
        raise ContentInvalid("ENTITIES_TOO_LONG")
    for entity in entities:
        if entity.type not in ENTITY_TYPES:
            raise ContentInvalid(f"ENTITY_TYPE_INVALID: unknown entity type {entity.type!r}")
        if entity.offset < 0 or entity.length <= 0 or entity.offset + entity.length > length:
            raise ContentInvalid(f"ENTITY_BOUNDS_INVALID: {entity.type} at {entity.offset}+{entity.length} "
                                 f"outside the text's {length} UTF-16 units")
        needed = REQUIRED_FIELDS.get(entity.type)
        if needed is not None and not getattr(entity, needed):
            raise ContentInvalid(f"ENTITY_FIELD_MISSING: a {entity.type} entity needs {needed}")
