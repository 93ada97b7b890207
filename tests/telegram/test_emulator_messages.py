"""The emulator's rules for what a message says (entities, length, replies, options), in process and
through the emulator backend over HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from support import EmulatorHandle

from telegram_platform.telegram.base import AuthState, PermanentError, SessionConfig, Update
from telegram_platform.telegram.content import Entity, FormattedText, OutgoingMessage
from telegram_platform.telegram.emulator.backend import EmulatorBackend, EmulatorSession
from telegram_platform.telegram.emulator.model import EmulatorConfig, EmulatorError, Outgoing, TelegramEmulator
from telegram_platform.telegram.keys import derive_database_key

KEY = bytes(range(32))


def _emulator() -> tuple[TelegramEmulator, int]:
    telegram = TelegramEmulator(EmulatorConfig(latency_ms=0), clock=lambda: 1_000_000.0)
    return telegram, telegram.user_for_phone("+9996612345").user_id


def _refusal(telegram: TelegramEmulator, user: int, text: str, outgoing: Outgoing) -> str:
    with pytest.raises(EmulatorError) as caught:
        telegram.send_message(user, "@a", text, outgoing=outgoing)
    return caught.value.message


def test_entities_are_checked_in_utf16_units_and_recorded() -> None:
    """An entity ending at the text's UTF-16 end is taken (an emoji counts 2) and recorded; past it,
    ENTITY_BOUNDS_INVALID; an unknown type or a text_link without url are refused."""
    telegram, user = _emulator()
    text = "😀 bold"  # 2 + 1 + 4 = 7 UTF-16 units, 6 code points
    bold = {"type": "bold", "offset": 3, "length": 4}
    record = telegram.send_message(user, "@a", text, outgoing=Outgoing(entities=(bold,), silent=True))
    assert record.entities == [bold] and record.options["silent"] is True
    assert _refusal(telegram, user, text, Outgoing(entities=({**bold, "length": 5},))) == "ENTITY_BOUNDS_INVALID"
    assert _refusal(telegram, user, text, Outgoing(entities=({**bold, "offset": -1},))) == "ENTITY_BOUNDS_INVALID"
    assert _refusal(telegram, user, text, Outgoing(entities=({**bold, "type": "blink"},))) == "ENTITY_TYPE_INVALID"
    assert _refusal(telegram, user, text,
                    Outgoing(entities=({**bold, "type": "text_link"},))) == "ENTITY_URL_INVALID"
    assert [a.outcome for a in telegram.attempts_by(user)] == ["accepted"] + ["invalid"] * 4


def test_length_is_counted_as_telegram_counts() -> None:
    """4,096 UTF-16 units pass, 4,097 are MESSAGE_TOO_LONG, even when fewer code points; blank is empty."""
    telegram, user = _emulator()
    telegram.send_message(user, "@a", "x" * 4096)
    assert _refusal(telegram, user, "😀" * 2048 + "x", Outgoing()) == "MESSAGE_TOO_LONG"
    assert _refusal(telegram, user, "  ", Outgoing()) == "MESSAGE_EMPTY"


def test_a_reply_must_name_a_message_of_that_chat() -> None:
    """A reply to a message sent to, or received from, the same chat is taken; to another chat's or
    an unknown id, REPLY_MESSAGE_ID_INVALID."""
    telegram, user = _emulator()
    first = telegram.send_message(user, "@a", "first")
    reply = telegram.send_message(user, "@a", "re", outgoing=Outgoing(reply_to=first.message_id))
    assert reply.reply_to == first.message_id
    incoming = telegram.deliver_incoming("+9996612345", "@b", "hello")
    telegram.send_message(user, "@b", "hi back", outgoing=Outgoing(reply_to=incoming["message_id"]))
    assert _refusal(telegram, user, "x", Outgoing(reply_to=incoming["message_id"])) == "REPLY_MESSAGE_ID_INVALID"
    assert _refusal(telegram, user, "x", Outgoing(reply_to=999 << 20)) == "REPLY_MESSAGE_ID_INVALID"


class Sink:
    def __init__(self) -> None:
        self.updates: list[Update] = []

    async def __call__(self, update: Update) -> None:
        self.updates.append(update)


@pytest.fixture
async def backend(fresh_emulator: EmulatorHandle, tmp_path: Path) -> AsyncIterator[EmulatorBackend]:
    backend = EmulatorBackend(fresh_emulator.url, tmp_path, on_update=Sink(), request_timeout=5.0)
    yield backend
    await backend.aclose(time.monotonic() + 5)


async def _ready(backend: EmulatorBackend, account_id: int, phone: str) -> EmulatorSession:
    config = SessionConfig(account_id=account_id, phone=phone, database_key=derive_database_key(KEY, account_id))
    session = await backend.open_session(config)
    assert await session.start() is AuthState.WAIT_CODE
    assert await session.submit_code(phone[6] * 5) is AuthState.READY
    return session


async def test_a_formatted_send_reaches_the_emulator_with_its_entities(backend: EmulatorBackend,
                                                                       fresh_emulator: EmulatorHandle) -> None:
    """Through the backend, entities, reply and options arrive as sent (/control/received shows them);
    a bad entity is Telegram's 400, a PermanentError."""
    session = await _ready(backend, 1, "+9996611234")
    first = await session.send("@carol", OutgoingMessage(FormattedText("hi")))
    message = OutgoingMessage(FormattedText("😀 link", (Entity("text_link", 3, 4, url="https://example.com"),)),
                              reply_to=first.telegram_message_id, protect_content=True,
                              disable_web_page_preview=True)
    sent = await session.send("@carol", message)
    assert sent.telegram_message_ids == (sent.telegram_message_id,)
    async with aiohttp.ClientSession() as http, \
            http.get(f"{fresh_emulator.url}/control/received", params={"peer": "@carol"}) as response:
        body = await response.json()
    assert body["count"] == 2
    last = body["messages"][1]
    assert last["entities"] == [{"type": "text_link", "offset": 3, "length": 4, "url": "https://example.com"}]
    assert last["reply_to"] == first.telegram_message_id
    assert last["options"] == {"silent": False, "protect_content": True, "disable_web_page_preview": True}
    with pytest.raises(PermanentError, match="ENTITY_BOUNDS_INVALID"):
        await session.send("@carol", OutgoingMessage(FormattedText("x", (Entity("bold", 0, 2),))))
