"""tdlib/messages.py: a message in TDLib's words, both ways, without a TDLib client."""

from __future__ import annotations

from pathlib import Path

import pytest

from telegram_platform.telegram.base import IncomingMessage, SentMessage
from telegram_platform.telegram.content import Media, MediaKind
from telegram_platform.telegram.tdlib.messages import (
    INPUT_MESSAGE_CLASSES,
    download_file_query,
    get_remote_file_query,
    incoming_media,
    incoming_message,
    input_file,
    remote_file_id,
    send_album_query,
    send_media_query,
    send_text_query,
    sent_message,
    text_content,
)
from telegram_platform.telegram.tdlib.protocol import execute


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


# -- files and media: the request shapes, checked by the real TDLib (offline) ---------------------

def _media(kind: MediaKind, *, remote_id: str | None = None) -> Media:
    return Media(kind=kind, file_id=7, size=1234, mime_type="image/jpeg", file_name="f.jpg", sha256="0" * 64,
                 width=640, height=480, duration=3, path=Path("/var/files/ab/abc"), remote_id=remote_id)


CAPTION = {"@type": "formattedText", "text": "caption",
           "entities": [{"@type": "textEntity", "offset": 0, "length": 7, "type": {"@type": "textEntityTypeBold"}}]}


def tdlib_parses(query: dict[str, object]) -> bool:
    """Whether tdjson 1.8's parser takes the request: a well-formed one that needs a client is answered
    "can't be executed synchronously" at once; a malformed one "Failed to parse JSON object ..."."""
    answer = execute(query)
    assert answer is not None and answer["@type"] == "error", answer
    message = str(answer["message"])
    assert "Failed to parse" in message or "can't be executed synchronously" in message, message
    return "Failed to parse" not in message


@pytest.mark.parametrize("kind", list(MediaKind))
@pytest.mark.parametrize("remote", [None, "AgACAgIAAxkBAAIBY2Zf"])
def test_each_media_send_is_a_request_tdlib_parses(kind: MediaKind, remote: str | None) -> None:
    """sendMessage with each inputMessage* kind, from a local file and from a remote id, parses in TDLib."""
    query = send_media_query(42, _media(kind, remote_id=remote), CAPTION)
    cls, file_field = INPUT_MESSAGE_CLASSES[kind]
    content = query["input_message_content"]
    assert content["@type"] == cls
    assert content[file_field] == ({"@type": "inputFileRemote", "id": remote} if remote else
                                   {"@type": "inputFileLocal", "path": "/var/files/ab/abc"})
    assert ("caption" in content) == (kind is not MediaKind.STICKER)
    assert tdlib_parses(query)


def test_an_album_is_one_send_message_album_with_the_caption_on_its_first_item() -> None:
    """sendMessageAlbum carries every item in order, the caption on the first only, and TDLib parses it."""
    items = (_media(MediaKind.PHOTO), _media(MediaKind.VIDEO, remote_id="BAACAgIAAxkBAAIB"), _media(MediaKind.PHOTO))
    query = send_album_query(42, items, CAPTION)
    contents = query["input_message_contents"]
    assert query["@type"] == "sendMessageAlbum" and len(contents) == 3
    assert [c["@type"] for c in contents] == ["inputMessagePhoto", "inputMessageVideo", "inputMessagePhoto"]
    assert contents[0]["caption"] == CAPTION and all("caption" not in c for c in contents[1:])
    assert tdlib_parses(query)


def test_downloads_are_requests_tdlib_parses() -> None:
    """getRemoteFile and downloadFile (synchronous, the whole file) parse in TDLib."""
    assert tdlib_parses(get_remote_file_query("AgACAgIAAxkBAAIBY2Zf"))
    assert tdlib_parses(download_file_query(12))


def test_the_check_tells_a_malformed_request() -> None:
    """The parse check is not vacuous: an unknown class, or a list where an object belongs, is refused."""
    query = send_media_query(42, _media(MediaKind.PHOTO), CAPTION)
    assert not tdlib_parses({**query, "input_message_content": {**query["input_message_content"],
                                                                "@type": "inputMessagePicture"}})
    assert not tdlib_parses({**send_album_query(42, (_media(MediaKind.PHOTO),) * 2, None),
                             "input_message_contents": {"@type": "inputMessagePhoto"}})


def test_a_file_without_path_or_remote_id_is_refused() -> None:
    """A Media the sender did not resolve cannot become a request."""
    with pytest.raises(ValueError, match="neither a remote id nor a local path"):
        input_file(Media(MediaKind.PHOTO, 1, 1, "image/png", "a.png", "0" * 64))


def test_a_sent_photos_remote_id_and_a_received_voice_notes_metadata_are_read() -> None:
    """remote_file_id takes a photo's largest size's remote id; incoming_media reads a voice note's
    kind, size, type and duration, and a photo's dimensions."""
    photo = {"@type": "messagePhoto", "photo": {"sizes": [
        {"type": "s", "width": 90, "height": 60, "photo": {"id": 1, "size": 900, "remote": {"id": "small"}}},
        {"type": "y", "width": 1280, "height": 853, "photo": {"id": 2, "size": 91000, "remote": {"id": "big"}}}]},
        "caption": {"@type": "formattedText", "text": "look"}}
    assert remote_file_id({"content": photo}) == "big"
    received = incoming_media(photo)
    assert received is not None
    assert (received.kind, received.size, received.width, received.height, received.remote_id) == (
        MediaKind.PHOTO, 91000, 1280, 853, "big")
    voice = {"@type": "messageVoiceNote", "voice_note": {"duration": 4, "mime_type": "audio/ogg",
                                                         "voice": {"id": 3, "size": 5000, "remote": {"id": "v"}}}}
    note = incoming_media(voice)
    assert note is not None and note.to_json() == {"kind": "voice", "size": 5000, "mime_type": "audio/ogg",
                                                   "file_name": "", "duration": 4}
    assert incoming_media({"@type": "messageText"}) is None
