"""Campaigns: create (draft or scheduled), add recipients (inline or a CSV import of up to
100,000), start, pause, resume, cancel, and read progress.

The API only records intent in PostgreSQL and enqueues the campaign's shared job; the worker's
campaign engine fans it out to the hosts that own the campaign's accounts and sends at each
account's permitted pace (worker/campaigns.py).
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import structlog
from aiohttp import web

from ... import events
from ...errors import BadRequest, PlatformError, ValidationFailed
from ...outages import REDIS_DOWN
from ...queue.registry import CAMPAIGNS_QUEUE, RUN_CAMPAIGN, campaign_job_id
from ...states import CampaignStatus
from ...storage import campaigns as campaign_store
from ...storage.db import Queryable
from ...telegram.formatting import ContentInvalid
from ..endpoints import Api, Call, path_id
from ..keys import DB, ENQUEUER, REDIS, REDIS_AUTH, SETTINGS
from ..schemas.campaigns import (
    AddRecipients,
    Campaign,
    CampaignPage,
    CampaignQuery,
    CreateCampaign,
    RecipientPage,
    RecipientQuery,
    RecipientsAdded,
)
from .messages import check_media

log = structlog.get_logger(__name__)

api = Api()

# A CSV of 100,000 recipients with a few variables each fits well within this.
MAX_CSV_BYTES = 64 * 1024 * 1024
CSV_TYPES = frozenset({"text/csv", "application/csv", "text/plain", "application/octet-stream"})
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_PEER = 256
MAX_VALUE = 1024


class PayloadTooLarge(PlatformError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(PlatformError):
    status = 415
    code = "unsupported_media_type"


def _idempotency_key(request: web.Request, body_key: str | None) -> str | None:
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None and body_key is not None and header_key != body_key:
        raise ValidationFailed([{"field": "idempotency_key", "message": "differs from the Idempotency-Key header"}])
    key = header_key or body_key
    if key is not None and not 1 <= len(key) <= 255:
        raise ValidationFailed([{"field": "Idempotency-Key", "message": "must be 1 to 255 characters"}])
    return key


def _check_template(template: str, parse_mode: str | None) -> None:
    """Its braces, and with a parse mode its markup (TDLib's parser; values are escaped, so only the
    template's own markup can fail): a 422 naming `template`."""
    try:
        campaign_store.template_variables(template)
        campaign_store.check_template(template, parse_mode)
    except ContentInvalid as exc:
        raise ValidationFailed([{"field": "template", "message": exc.message}]) from None
    except ValueError as exc:
        raise ValidationFailed([{"field": "template", "message": str(exc)}]) from None


async def _enqueue_run(request: web.Request, campaign_id: int) -> None:
    """After the transition is committed: a job Redis does not take now (or loses later) is enqueued
    by the worker's reconciler for any running campaign, so an outage here is no failure."""
    try:
        await request.app[ENQUEUER].enqueue(CAMPAIGNS_QUEUE, RUN_CAMPAIGN, [campaign_id],
                                            job_id=campaign_job_id(campaign_id))
    except REDIS_DOWN as exc:
        log.warning("campaign running while Redis is unreachable: the reconciler will enqueue it",
                    campaign_id=campaign_id, error=type(exc).__name__)


async def _publish(request: web.Request, campaign: dict[str, Any]) -> None:
    """The change is committed and answered; the event is not the record of it, so an outage only
    costs the event (clients read the state from the REST API)."""
    try:
        await events.publish(request.app[REDIS], request.app[REDIS_AUTH], "campaign.progress", {
            "campaign_id": campaign["id"], "status": campaign["status"], "progress": campaign["progress"],
            "held_back": campaign["held_back"]},
            log_length=request.app[SETTINGS].events.log_length)
    except REDIS_DOWN as exc:
        log.warning("campaign.progress event not published: Redis unreachable", campaign_id=campaign["id"],
                    error=type(exc).__name__)


@api.route("POST", "/api/campaigns", summary="Create a campaign: a draft, or scheduled when `schedule_at` is given",
           role="operator", body=CreateCampaign, response=Campaign, status=201, tags=("campaigns",),
           errors=(404, 409, 422))
async def create_campaign(request: web.Request, call: Call[CreateCampaign, None]) -> Any:
    body = call.body
    key = _idempotency_key(request, body.idempotency_key)
    _check_template(body.template, body.parse_mode)
    media = body.media or []
    if media:
        await check_media(request.app[DB], body.template, media, text_field="template")
    campaign, _created = await campaign_store.create_campaign(
        request.app[DB], name=body.name, template=body.template, account_ids=body.account_ids,
        schedule_at=body.schedule_at, recipients=[(r.peer, r.variables) for r in body.recipients],
        idempotency_key=key, created_by=call.user.user_id, parse_mode=body.parse_mode,
        options={"silent": body.silent, "protect_content": body.protect_content,
                 "disable_web_page_preview": body.disable_web_page_preview},
        media=[(m.file_id, m.kind) for m in media])
    await with_campaign_media(request.app[DB], campaign)
    return campaign


@api.route("GET", "/api/campaigns", summary="Campaigns, newest first, with cursor pagination", query=CampaignQuery,
           response=CampaignPage, tags=("campaigns",))
async def list_campaigns(request: web.Request, call: Call[None, CampaignQuery]) -> Any:
    q = call.query
    items = await campaign_store.list_campaigns(request.app[DB], status=q.status,
                                                before_id=int(q.cursor) if q.cursor else None, limit=q.limit + 1)
    next_cursor = str(items[q.limit - 1]["id"]) if len(items) > q.limit else None
    return {"items": items[: q.limit], "next_cursor": next_cursor}


@api.route("GET", "/api/campaigns/{id}", summary="A campaign and its progress (total, sent, failed, pending)",
           response=Campaign, tags=("campaigns",), errors=(404,))
async def get_campaign(request: web.Request, call: Call[None, None]) -> Any:
    campaign = await campaign_store.get_campaign(request.app[DB], path_id(request))
    await with_campaign_media(request.app[DB], campaign)
    return campaign


async def with_campaign_media(db: Queryable, campaign: dict[str, Any]) -> None:
    """The campaign's `media` (the files each of its messages carries; [] for text)."""
    rows = await db.fetch("SELECT file_id, kind FROM campaign_files WHERE campaign_id = $1 ORDER BY position",
                          campaign["id"])
    campaign["media"] = [{"file_id": r["file_id"], "kind": r["kind"]} for r in rows]


@api.route("POST", "/api/campaigns/{id}/recipients", summary="Add recipients (a peer already in it is ignored)",
           role="operator", body=AddRecipients, response=RecipientsAdded, tags=("campaigns",),
           errors=(404, 409, 422))
async def add_recipients(request: web.Request, call: Call[AddRecipients, None]) -> Any:
    return await _add(request, path_id(request), [(r.peer, r.variables) for r in call.body.recipients])


@api.route("POST", "/api/campaigns/{id}/recipients/import",
           summary="Import recipients from a CSV body (Content-Type: text/csv): a header row naming a `peer` "
                   "column, every other column a template variable; up to 100,000 rows",
           role="operator", response=RecipientsAdded, tags=("campaigns",), errors=(400, 404, 409, 413, 415, 422),
           raw_body=("text/csv",))
async def import_recipients(request: web.Request, call: Call[None, None]) -> Any:
    campaign_id = path_id(request)
    await campaign_store.check_takes_recipients(request.app[DB], campaign_id)
    if request.content_type not in CSV_TYPES:
        raise UnsupportedMediaType(f"send the CSV as text/csv (got {request.content_type or 'no Content-Type'})",
                                   details={"field": "Content-Type"})
    body = await read_csv_body(request.content.iter_chunked(1 << 16))
    # Parsed line by line from the bytes (no decoded copy of the whole body, nor StringIO's
    # four-bytes-a-character one), in a thread: 100,000 rows take long enough to stall every other
    # request of this process if parsed on its event loop.
    rows = await asyncio.to_thread(parse_csv, io.TextIOWrapper(io.BytesIO(body), encoding="utf-8-sig", newline=""))
    del body  # not held while the rows are written
    return await _add(request, campaign_id, rows)


async def read_csv_body(chunks: AsyncIterator[bytes], limit: int = MAX_CSV_BYTES) -> bytes:
    """A body of at most `limit` bytes that is valid UTF-8, checked as it arrives: one too large is
    refused at the chunk that crosses the limit, and invalid UTF-8 is refused naming its byte."""
    received: list[bytes] = []
    size = 0
    check = codecs.getincrementaldecoder("utf-8")()
    async for chunk in chunks:
        if size + len(chunk) > limit:
            raise PayloadTooLarge(f"a CSV import is at most {limit} bytes", details={"max_bytes": limit})
        pending = len(check.getstate()[0])  # a character split across chunks, held by the decoder
        try:
            check.decode(chunk)  # the text is not kept: only whether it decodes
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the CSV is not UTF-8 (byte {size - pending + exc.start})",
                             details={"field": "body"}) from None
        received.append(chunk)
        size += len(chunk)
    try:
        check.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BadRequest(f"the CSV is not UTF-8 (byte {size - len(check.getstate()[0])})",
                         details={"field": "body"}) from None
    return b"".join(received)


def parse_csv(lines: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """Rows of (peer, variables) from a CSV's lines (read with newline=""); every problem is reported
    with its row number (the header is row 1)."""
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise ValidationFailed([{"field": "body", "message": "the CSV is empty (a header row is required)"}]) from None
    except csv.Error as exc:
        raise ValidationFailed([{"field": "body", "message": f"row 1: {exc}"}]) from None
    names = [h.strip() for h in header]
    lowered = [n.lower() for n in names]
    if "peer" not in lowered:
        raise ValidationFailed([{"field": "peer", "message": "the header row has no `peer` column"}])
    peer_at = lowered.index("peer")
    errors: list[dict[str, str]] = []
    for i, name in enumerate(names):
        if i != peer_at and not _VARIABLE.match(name):
            errors.append({"field": name or f"column {i + 1}",
                           "message": "a variable name is letters, digits and _, not starting with a digit"})
    if len(set(lowered)) != len(lowered):
        errors.append({"field": "body", "message": "the header row names a column twice"})
    if errors:
        raise ValidationFailed(errors)
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        for line_no, record in enumerate(reader, start=2):
            if not any(cell.strip() for cell in record):
                continue  # blank line
            if len(rows) >= campaign_store.MAX_RECIPIENTS:
                raise ValidationFailed([{"field": "body", "message":
                                         f"more than {campaign_store.MAX_RECIPIENTS} recipients"}])
            if len(record) > len(names):
                errors.append({"field": f"row {line_no}", "message": f"{len(record)} cells for {len(names)} columns"})
                continue
            peer = record[peer_at].strip() if peer_at < len(record) else ""
            if not peer or len(peer) > MAX_PEER:
                errors.append({"field": f"row {line_no}", "message": f"peer must be 1 to {MAX_PEER} characters"})
                continue
            variables = {names[i]: cell for i, cell in enumerate(record) if i != peer_at and cell != ""}
            if any(len(v) > MAX_VALUE for v in variables.values()):
                errors.append({"field": f"row {line_no}", "message": f"a value is over {MAX_VALUE} characters"})
                continue
            rows.append((peer, variables))
            if len(errors) >= 20:
                break
    except csv.Error as exc:
        errors.append({"field": f"row {reader.line_num}", "message": str(exc)})
    if errors:
        raise ValidationFailed(errors[:20])
    if not rows:
        raise ValidationFailed([{"field": "body", "message": "the CSV has no recipient rows"}])
    return rows


async def _add(request: web.Request, campaign_id: int, recipients: list[tuple[str, dict[str, Any]]]) -> Any:
    async with request.app[DB].acquire() as conn, conn.transaction():
        added, duplicates = await campaign_store.add_recipients(conn, campaign_id, recipients)
        total = await conn.fetchval("SELECT total FROM campaigns WHERE id = $1", campaign_id)
    return {"added": added, "duplicates": duplicates, "total": total}


@api.route("GET", "/api/campaigns/{id}/recipients", summary="A campaign's recipients with their message status",
           query=RecipientQuery, response=RecipientPage, tags=("campaigns",), errors=(404,))
async def list_recipients(request: web.Request, call: Call[None, RecipientQuery]) -> Any:
    q = call.query
    items = await campaign_store.list_recipients(request.app[DB], path_id(request), status=q.status,
                                                 after_id=int(q.cursor) if q.cursor else None, limit=q.limit + 1)
    next_cursor = str(items[q.limit - 1]["id"]) if len(items) > q.limit else None
    return {"items": items[: q.limit], "next_cursor": next_cursor}


def _action(action: str, summary: str) -> None:
    @api.route("POST", f"/api/campaigns/{{id}}/{action}", summary=summary, role="operator", response=Campaign,
               tags=("campaigns",), errors=(404, 409))
    async def handle(request: web.Request, call: Call[None, None]) -> Any:
        campaign = await campaign_store.transition(request.app[DB], path_id(request), action)
        if campaign["status"] == CampaignStatus.RUNNING:
            await _enqueue_run(request, campaign["id"])
        await _publish(request, campaign)
        return campaign

    handle.__name__ = f"{action}_campaign"


_action("start", "Start a draft or scheduled campaign now")
_action("pause", "Pause: sends in flight finish, no new one starts")
_action("resume", "Resume a paused campaign, or a failed one once its accounts can send again")
_action("cancel", "Cancel: messages not yet sent never will be")
