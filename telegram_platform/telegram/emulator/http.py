"""The emulator's HTTP surface: an aiohttp application around one `TelegramEmulator` (`emulator/model.py`).

`/rpc/*` is what the platform's emulator backend calls, `/updates` the WebSocket that streams an
account's updates; `/control/*` is for tests and developers (in process, the same operations are
methods of `TelegramEmulator`):

- `POST /control/config` {setting: value} (EmulatorConfig's fields; 400 naming an unknown or
  mistyped one), `POST /control/reset` {settings}: limits, latency, seed;
- `POST /control/users` {"phone", "password"?, "registered"?, "username"?}: 2FA, registration;
- `POST /control/contacts` {"phone", "peers"}: peers that are never cold (no PEER_FLOOD);
- `POST /control/incoming` {"to_phone", "sender", "text"}: an incoming message, now; with
  "media": {"kind", "data" (base64), "mime_type"?, "file_name"?, "width"?, "height"?, "duration"?}
  a media message whose caption is "text";
- `POST /rpc/upload.file?session=&file_name=&mime_type=` (the body is the file),
  `GET /rpc/download.file?session=&file_ref=`, `POST /rpc/messages.sendMedia`: files, as an account
  uploads, downloads and sends them; `GET /control/files/{file_ref}`: a file's bytes;
- `POST /control/incoming` {"to_phone", "sender", "text", "entities"?, "reply_to"?, "forward_from"?}:
  an incoming message, now (entities as the Bot API's JSON; reply_to a message id of that chat);
- `POST /control/edit` {"to_phone", "sender", "message_id", "text", "entities"?}: the sender edits a
  message they sent the account; `POST /control/delete` {"to_phone", "sender", "message_ids"}: the
  sender deletes messages for everyone; `POST /control/read` {"phone", "reader", "max_id"?}: `reader`
  read the account's messages (up to max_id, default the last): a read receipt;
- `POST /control/drop` {"seconds"?}: cut every update stream (and stay offline that long);
- `GET /control/inbox_reads` (incoming messages the accounts marked read: user_id, chat_id, ids),
  `GET /control/received?peer=&from_user_id=` (each accepted message with its entities, reply_to,
  options, forwarded_from, edited_at and deleted_for_everyone), `GET /control/deliveries` (per recipient, duplicates),
  `GET /control/attempts?user_id=|phone=` (every send attempt, its time and outcome; `early`: attempts
  made before a 429's "retry after" passed), `GET /control/stats` (counters: logins, code_requests,
  messages, rate_limited, peer_flood, ...).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from telegram_platform.telegram.emulator.model import (
    EmulatorConfig,
    EmulatorError,
    Outgoing,
    TelegramEmulator,
    config_with,
)

EMULATOR = web.AppKey("emulator", TelegramEmulator)


def create_emulator_app(emulator: TelegramEmulator | None = None) -> web.Application:
    app = web.Application()
    app[EMULATOR] = emulator or TelegramEmulator()
    app.router.add_post("/rpc/upload.file", _rpc_upload)
    app.router.add_get("/rpc/download.file", _rpc_download)
    app.router.add_post("/rpc/{method}", _rpc)
    app.router.add_get("/updates", _updates)
    app.router.add_get("/control/received", _control_received)
    app.router.add_get("/control/deliveries", _control_deliveries)
    app.router.add_get("/control/inbox_reads", _control_inbox_reads)
    app.router.add_get("/control/attempts", _control_attempts)
    app.router.add_get("/control/stats", _control_stats)
    app.router.add_post("/control/config", _control_config)
    app.router.add_post("/control/users", _control_users)
    app.router.add_post("/control/contacts", _control_contacts)
    app.router.add_post("/control/incoming", _control_incoming)
    app.router.add_post("/control/edit", _control_edit)
    app.router.add_post("/control/delete", _control_delete)
    app.router.add_post("/control/read", _control_read)
    app.router.add_post("/control/drop", _control_drop)
    app.router.add_post("/control/reset", _control_reset)
    app.router.add_get("/control/files/{file_ref}", _control_file)
    app.router.add_get("/health", _health)
    return app


def _ok(**data: Any) -> web.Response:
    return web.json_response({"ok": True, **data})


def _err(error: EmulatorError) -> web.Response:
    return web.json_response({"ok": False, "error": {"code": error.code, "message": error.message, **error.extra}})


def _bad_control(message: str) -> web.Response:
    return web.json_response({"error": {"code": "bad_request", "message": message}}, status=400)


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise EmulatorError(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise EmulatorError(400, "body must be a JSON object")
    return body


async def _rpc(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    method = request.match_info["method"]
    try:
        body = await _json_object(request)
        # Offline, a request waits for the network (as TDLib's do) until the client gives up.
        await emulator.wait_until_online()
        # Every round trip to Telegram takes time; sends and login steps alike.
        await asyncio.sleep(emulator.latency())
        if method == "auth.sendCode":
            return _ok(**emulator.send_code(str(body["phone"])))
        if method == "auth.signIn":
            return _ok(**emulator.sign_in(str(body["phone"]), str(body["code"])))
        if method == "auth.checkPassword":
            return _ok(**emulator.check_password(str(body["phone"]), str(body["password"])))
        if method == "auth.signUp":
            return _ok(**emulator.sign_up(str(body["phone"]), str(body.get("first_name", "")),
                                          str(body.get("last_name", ""))))
        if method == "auth.logOut":
            emulator.log_out(str(body["session"]))
            return _ok()
        if method == "session.check":
            user_id = emulator.session_user(str(body["session"]))
            return _ok(user_id=user_id, pts=emulator.current_pts(user_id))
        if method == "messages.send":
            user_id = emulator.session_user(str(body["session"]))
            record = emulator.send_message(user_id, str(body["peer"]), str(body["text"]),
                                           str(body.get("random_id", "")), _outgoing(body),
                                           source=request.remote or "")
            return _ok(message_id=record.message_id, chat_id=record.chat_id)
        if method == "messages.sendMedia":
            user_id = emulator.session_user(str(body["session"]))
            media = body["media"]
            if not isinstance(media, list) or not all(isinstance(item, dict) for item in media):
                raise TypeError("media must be a list of objects")
            records = emulator.send_media(user_id, str(body["peer"]), media, str(body.get("caption", "")),
                                          str(body.get("random_id", "")), _outgoing(body),
                                          source=request.remote or "")
            return _ok(message_ids=[r.message_id for r in records], chat_id=records[0].chat_id,
                       file_refs=[r.media["file_ref"] if r.media else "" for r in records])
        if method == "messages.forward":
            user_id = emulator.session_user(str(body["session"]))
            records = emulator.forward_messages(user_id, str(body["from_peer"]), _ids(body["message_ids"]),
                                                str(body["peer"]), str(body.get("random_id", "")))
            return _ok(message_ids=[r.message_id for r in records], chat_id=records[0].chat_id)
        if method == "messages.edit":
            user_id = emulator.session_user(str(body["session"]))
            emulator.edit_message(user_id, str(body["peer"]), int(body["message_id"]), str(body["text"]),
                                  _entities(body), caption=bool(body.get("caption")))
            return _ok()
        if method == "messages.delete":
            user_id = emulator.session_user(str(body["session"]))
            count = emulator.delete_messages(user_id, str(body["peer"]), _ids(body["message_ids"]),
                                             revoke=bool(body.get("revoke")))
            return _ok(deleted=count)
        if method == "messages.read":
            user_id = emulator.session_user(str(body["session"]))
            return _ok(read=emulator.read_inbox(user_id, str(body["peer"]), _ids(body["message_ids"])))
    except EmulatorError as error:
        return _err(error)
    except (KeyError, TypeError, ValueError) as error:
        return _err(EmulatorError(400, f"INPUT_INVALID: {error}"))
    return _err(EmulatorError(400, f"METHOD_INVALID: {method}"))


async def _rpc_upload(request: web.Request) -> web.Response:
    """An account's upload: the body is the file's bytes (read as they come, up to Telegram's limit);
    `session`, `file_name` and `mime_type` in the query. Answers the file's `file_ref`."""
    emulator = request.app[EMULATOR]
    try:
        user_id = emulator.session_user(request.query.get("session", ""))
        await emulator.wait_until_online()
        data = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > emulator.config.max_file_size:
                raise EmulatorError(400, "FILE_PARTS_INVALID")
        stored = emulator.upload(user_id, bytes(data), mime_type=request.query.get("mime_type", ""),
                                 file_name=request.query.get("file_name", ""))
    except EmulatorError as error:
        return _err(error)
    return _ok(file_ref=stored.file_ref, size=stored.size, sha256=stored.sha256)


async def _rpc_download(request: web.Request) -> web.StreamResponse:
    """A file the account may see (`session`, `file_ref` in the query), streamed; errors as JSON."""
    emulator = request.app[EMULATOR]
    try:
        user_id = emulator.session_user(request.query.get("session", ""))
        await emulator.wait_until_online()
        stored = emulator.file_for(user_id, request.query.get("file_ref", ""))
    except EmulatorError as error:
        return _err(error)
    emulator.counters["downloads"] += 1
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = stored.size
    await response.prepare(request)
    view = memoryview(stored.data)
    for start in range(0, stored.size, 1 << 16):
        await response.write(bytes(view[start:start + (1 << 16)]))
    await response.write_eof()
    return response


async def _control_file(request: web.Request) -> web.Response:
    stored = request.app[EMULATOR].files.get(request.match_info["file_ref"])
    if stored is None:
        return web.json_response({"error": {"code": "not_found", "message": "no such file"}}, status=404)
    return web.Response(body=stored.data, content_type="application/octet-stream")


def _entities(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    entities = body.get("entities") or []
    if not isinstance(entities, list) or not all(isinstance(e, dict) for e in entities):
        raise TypeError("entities must be a list of objects")
    return tuple(entities)


def _ids(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise TypeError("message_ids must be a list")
    return [int(i) for i in value]


def _outgoing(body: dict[str, Any]) -> Outgoing:
    """A send's entities, reply and options as the backend passed them (TypeError/ValueError when
    malformed: INPUT_INVALID)."""
    reply_to = body.get("reply_to")
    return Outgoing(entities=_entities(body), reply_to=int(reply_to) if reply_to is not None else None,
                    silent=bool(body.get("silent")), protect_content=bool(body.get("protect_content")),
                    disable_web_page_preview=bool(body.get("disable_web_page_preview")))


async def _updates(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    try:
        user_id = emulator.session_user(request.query.get("session", ""))
    except EmulatorError:
        raise web.HTTPUnauthorized() from None
    if emulator.offline_for() > 0:
        raise web.HTTPServiceUnavailable()
    after_raw = request.query.get("after")
    after = int(after_raw) if after_raw and after_raw.lstrip("-").isdigit() else None
    ws = web.WebSocketResponse(heartbeat=10)
    await ws.prepare(request)
    queue = emulator.subscribe(user_id, after)

    async def pump() -> None:
        while True:
            update = await queue.get()
            if update.get("type") == "__drop__":
                await ws.close(code=1012)
                return
            await ws.send_json(update)

    pumping = asyncio.create_task(pump())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        emulator.unsubscribe(user_id, queue)
    return ws


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.lstrip("-").isdigit():
        raise EmulatorError(400, f"{name} must be an integer")
    return int(raw)


async def _control_received(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    peer = request.query.get("peer")
    try:
        from_user_id = _query_int(request, "from_user_id")
    except EmulatorError as error:
        return _bad_control(error.message)
    items = [r for r in emulator.received
             if (peer is None or r.to == peer) and (from_user_id is None or r.from_user_id == from_user_id)]
    return web.json_response({"count": len(items), "messages": [dataclasses.asdict(r) for r in items]})


async def _control_inbox_reads(request: web.Request) -> web.Response:
    reads = request.app[EMULATOR].inbox_reads
    return web.json_response({"count": len(reads), "reads": reads})


async def _control_deliveries(request: web.Request) -> web.Response:
    deliveries = request.app[EMULATOR].deliveries()
    return web.json_response({"recipients": deliveries,
                              "duplicates": sum(n - 1 for n in deliveries.values() if n > 1)})


async def _control_attempts(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    try:
        user_id = _query_int(request, "user_id")
    except EmulatorError as error:
        return _bad_control(error.message)
    if user_id is None and "phone" in request.query:
        user_id = emulator.user_for_phone(request.query["phone"]).user_id
    items = emulator.attempts if user_id is None else emulator.attempts_by(user_id)
    return web.json_response({"count": len(items), "attempts": [dataclasses.asdict(a) for a in items],
                              "early": len(emulator.early_attempts(user_id))})


async def _control_stats(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    deliveries = emulator.deliveries()
    return web.json_response({"counters": dict(emulator.counters), "recipients": len(deliveries),
                              "duplicates": sum(n - 1 for n in deliveries.values() if n > 1),
                              "sessions": len(emulator.sessions), "offline_for": emulator.offline_for()})


async def _control_config(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    try:
        body = await _json_object(request)
        config = config_with(emulator.config, body)
    except EmulatorError as error:
        return _bad_control(error.message)
    except ValueError as error:
        return _bad_control(str(error))
    emulator.config = config
    if "seed" in body:
        emulator.reseed(config.seed)
    return web.json_response(dataclasses.asdict(emulator.config))


async def _control_users(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    try:
        body = await _json_object(request)
        user = emulator.user_for_phone(str(body["phone"]))
    except EmulatorError as error:
        return _bad_control(error.message)
    except KeyError:
        return _bad_control("phone is required")
    if "password" in body:
        user.password = body["password"] or None
    if "registered" in body:
        user.registered = bool(body["registered"])
    if "username" in body:
        user.username = body["username"]
    return web.json_response({"user_id": user.user_id, "phone": user.phone})


async def _control_contacts(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    try:
        body = await _json_object(request)
        count = emulator.add_contacts(str(body["phone"]), [str(p) for p in body.get("peers", [])])
    except EmulatorError as error:
        return _bad_control(error.message)
    except KeyError:
        return _bad_control("phone is required")
    return web.json_response({"contacts": count})


ControlAction = Callable[[TelegramEmulator, dict[str, Any]], dict[str, Any]]


def _control_action(action: ControlAction) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A control route that does `action` with the request's JSON body and answers what it returns;
    a missing or mistyped field, or what the emulator refuses, is a 400 naming it."""
    async def handle(request: web.Request) -> web.Response:
        try:
            return web.json_response(action(request.app[EMULATOR], await _json_object(request)))
        except EmulatorError as error:
            return _bad_control(error.message)
        except KeyError as error:
            return _bad_control(f"{error.args[0]} is required")
        except binascii.Error as error:
            return _bad_control(f"media: {error}")
        except (TypeError, ValueError) as error:
            return _bad_control(str(error))
    return handle


def _incoming(emulator: TelegramEmulator, body: dict[str, Any]) -> dict[str, Any]:
    media = body.get("media")
    if isinstance(media, dict):
        return emulator.deliver_incoming_media(
            str(body["to_phone"]), str(body.get("sender", "user")), str(body.get("text", "")),
            kind=str(media["kind"]), data=base64.b64decode(str(media["data"]), validate=True),
            mime_type=str(media.get("mime_type", "")), file_name=str(media.get("file_name", "")),
            width=_optional_int(media, "width"), height=_optional_int(media, "height"),
            duration=_optional_int(media, "duration"))
    reply_to = body.get("reply_to")
    forward_from = body.get("forward_from")
    if forward_from is not None and not isinstance(forward_from, dict):
        raise TypeError("forward_from must be an object")
    return emulator.deliver_incoming(str(body["to_phone"]), str(body.get("sender", "user")), str(body["text"]),
                                     entities=_entities(body), reply_to=int(reply_to) if reply_to is not None else None,
                                     forward_from=forward_from)


def _edit(emulator: TelegramEmulator, body: dict[str, Any]) -> dict[str, Any]:
    return emulator.edit_incoming(str(body["to_phone"]), str(body.get("sender", "user")), int(body["message_id"]),
                                  str(body["text"]), _entities(body))


def _delete(emulator: TelegramEmulator, body: dict[str, Any]) -> dict[str, Any]:
    return emulator.delete_incoming(str(body["to_phone"]), str(body.get("sender", "user")),
                                    _ids(body["message_ids"]))


def _read(emulator: TelegramEmulator, body: dict[str, Any]) -> dict[str, Any]:
    max_id = body.get("max_id")
    return emulator.read_outbox(str(body["phone"]), str(body["reader"]), int(max_id) if max_id is not None else None)


_control_incoming = _control_action(_incoming)
_control_edit = _control_action(_edit)
_control_delete = _control_action(_delete)
_control_read = _control_action(_read)


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


async def _control_drop(request: web.Request) -> web.Response:
    try:
        body = await _json_object(request)
        seconds = float(body.get("seconds", 0.0))
    except EmulatorError as error:
        return _bad_control(error.message)
    except (TypeError, ValueError):
        return _bad_control("seconds must be a number")
    emulator = request.app[EMULATOR]
    return web.json_response({"dropped": emulator.drop_connections(seconds),
                              "offline_for": emulator.offline_for()})


async def _control_reset(request: web.Request) -> web.Response:
    try:
        body = await _json_object(request)
        config = config_with(EmulatorConfig(), body)
    except EmulatorError as error:
        return _bad_control(error.message)
    except ValueError as error:
        return _bad_control(str(error))
    request.app[EMULATOR].reset(config)
    return web.json_response({"ok": True})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
