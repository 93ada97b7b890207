"""tdlib/messages.py: a message in TDLib's words, both ways; every query shape parsed by the real library."""

from __future__ import annotations

from pathlib import Path
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
    INPUT_MESSAGE_CLASSES,
    delete_messages_query,
    download_file_query,
    edit_message_query,
    formatted_text,
    forward_messages_query,
    get_remote_file_query,
    incoming_media,
    incoming_message,
    input_file,
    message_change,
    read_formatted_text,
    remote_file_id,
    send_album_query,
    send_media_query,
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


def test_a_message_with_media_becomes_a_media_send_with_its_formatted_caption() -> None:
    """One file is a sendMessage of its inputMessage* with the text as formatted caption, options and
    reply; two are a sendMessageAlbum; both parse in the real TDLib."""
    photo = Media(MediaKind.PHOTO, 1, 10, "image/jpeg", "a.jpg", "0" * 64, path=Path("/tmp/a"))
    caption = FormattedText("look", (Entity("bold", 0, 4),))
    single = send_message_query(1, OutgoingMessage(caption, media=(photo,), reply_to=5, silent=True))
    assert single["@type"] == "sendMessage"
    assert single["input_message_content"]["caption"] == formatted_text(caption)
    assert single["options"]["disable_notification"] is True
    assert single["reply_to"] == {"@type": "inputMessageReplyToMessage", "message_id": 5}
    album = send_message_query(1, OutgoingMessage(caption, media=(photo, photo)))
    assert album["@type"] == "sendMessageAlbum" and len(album["input_message_contents"]) == 2
    no_caption = send_message_query(1, OutgoingMessage(FormattedText(""), media=(photo,)))
    assert "caption" not in no_caption["input_message_content"]
    assert tdlib_parses(single) and tdlib_parses(album) and tdlib_parses(no_caption)


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


def test_outgoing_and_unread_kinds_are_not_taken_in() -> None:
    """The account's own messages, and kinds the platform does not read (a poll), give None."""
    text = {"@type": "messageText", "text": {"@type": "formattedText", "text": "hello"}}
    assert incoming_message(3, {"id": 1, "chat_id": 2, "is_outgoing": True, "content": text}) is None
    assert incoming_message(3, {"id": 1, "chat_id": 2, "content": {"@type": "messagePoll"}}) is None


def test_a_received_photo_is_taken_in_with_its_caption_and_media() -> None:
    """A messagePhoto becomes an IncomingMessage of kind photo: its caption as text (with entities)
    and its metadata, with the remote id the worker downloads it by."""
    photo = {"@type": "messagePhoto", "photo": {"sizes": [
        {"type": "y", "width": 1280, "height": 853, "photo": {"id": 2, "size": 91000, "remote": {"id": "big"}}}]},
        "caption": {"@type": "formattedText", "text": "look", "entities": [
            {"@type": "textEntity", "offset": 0, "length": 4, "type": {"@type": "textEntityTypeBold"}}]}}
    message = incoming_message(3, {"id": 9, "chat_id": 5, "date": 1700000000,
                                   "sender_id": {"@type": "messageSenderUser", "user_id": 77}, "content": photo})
    assert message is not None
    assert (message.kind, message.text, message.entities) == ("photo", "look", (Entity("bold", 0, 4),))
    assert message.media == {"kind": "photo", "size": 91000, "mime_type": "image/jpeg", "file_name": "",
                             "width": 1280, "height": 853, "remote_id": "big"}


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
    """sendMessage with each inputMessage* kind, from a local file and from a remote id, parses in TDLib,
    which reads every field the platform sets."""
    query = send_media_query(42, _media(kind, remote_id=remote), CAPTION)
    cls, file_field = INPUT_MESSAGE_CLASSES[kind]
    content = query["input_message_content"]
    assert content["@type"] == cls
    assert content[file_field] == ({"@type": "inputFileRemote", "id": remote} if remote else
                                   {"@type": "inputFileLocal", "path": "/var/files/ab/abc"})
    assert ("caption" in content) == (kind is not MediaKind.STICKER)
    assert tdlib_parses(query)
    # Every field set is one tdjson 1.8.69 reads (a wrong type there fails its parse), the file's too.
    assert set(content) == {"@type", file_field} | ({"caption"} if kind is not MediaKind.STICKER else set())
    for name in content:
        if name != "@type":
            assert_field_read(query, ("input_message_content", name))
    # (An inputFile's own `path` / `id` take any value at parse time: TDLib checks them when it opens
    # the file, so the parse cannot prove them; their names are TDLib's documented ones.)


def test_an_album_is_one_send_message_album_with_the_caption_on_its_first_item() -> None:
    """sendMessageAlbum carries every item in order, the caption on the first only; TDLib parses it
    and reads its fields."""
    items = (_media(MediaKind.PHOTO), _media(MediaKind.VIDEO, remote_id="BAACAgIAAxkBAAIB"), _media(MediaKind.PHOTO))
    query = send_album_query(42, items, CAPTION)
    contents = query["input_message_contents"]
    assert query["@type"] == "sendMessageAlbum" and len(contents) == 3
    assert [c["@type"] for c in contents] == ["inputMessagePhoto", "inputMessageVideo", "inputMessagePhoto"]
    assert contents[0]["caption"] == CAPTION and all("caption" not in c for c in contents[1:])
    assert tdlib_parses(query)
    for path in [("chat_id",), ("input_message_contents",), ("input_message_contents", 0, "caption"),
                 ("input_message_contents", 1, "video")]:
        assert_field_read(query, path)


def test_downloads_are_requests_tdlib_parses() -> None:
    """getRemoteFile and downloadFile (synchronous, the whole file) parse in TDLib, each field read."""
    remote, download = get_remote_file_query("AgACAgIAAxkBAAIBY2Zf"), download_file_query(12)
    assert tdlib_parses(remote) and tdlib_parses(download)
    assert_field_read(remote, ("remote_file_id",))
    for name in ("file_id", "priority", "offset", "limit", "synchronous"):
        assert_field_read(download, (name,))


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
                                                   "file_name": "", "duration": 4, "remote_id": "v"}
    assert incoming_media({"@type": "messageText"}) is None


def test_a_confirmed_album_keeps_each_files_remote_id() -> None:
    """sent_messages keeps every message id and the remote id of each file, in order; text gives none."""
    def photo(message_id: int, remote: str) -> dict[str, object]:
        return {"@type": "message", "id": message_id, "chat_id": 42, "content": {
            "@type": "messagePhoto", "photo": {"sizes": [{"photo": {"id": 1, "remote": {"id": remote}}}]}}}

    sent = sent_messages([photo(1 << 20, "a"), photo(2 << 20, "b")])
    assert (sent.telegram_message_ids, sent.remote_file_ids) == ((1 << 20, 2 << 20), ("a", "b"))
    assert sent_messages([{"@type": "message", "id": 5, "chat_id": 42}]).remote_file_ids == ()


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
