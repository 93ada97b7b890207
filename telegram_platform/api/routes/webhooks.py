"""Outbound webhooks: admins register URLs that receive the platform's events, HMAC-signed.

Webhooks are settings (their URLs may carry credentials), so every route is admin-only. The secret
is shown once, in the creation response. Deliveries are made by the worker (worker/webhooks.py);
`X-TP-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>` lets a receiver check them.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from typing import Any

import structlog
from aiohttp import web
from msgspec import UNSET
from yarl import URL

from ... import events
from ...errors import ValidationFailed
from ...outages import REDIS_DOWN
from ...settings import Network
from ...storage import webhooks as store
from ...worker.webhook_addresses import address_refusal
from ...worker.webhooks import record_and_enqueue
from ..endpoints import Api, Call, path_id
from ..keys import DB, ENQUEUER, REDIS, REDIS_AUTH, SETTINGS
from ..schemas.webhooks import (
    CreateWebhook,
    DeliveryPage,
    DeliveryQuery,
    UpdateWebhook,
    Webhook,
    WebhookCreated,
    WebhookDelivery,
    WebhookList,
)

log = structlog.get_logger(__name__)

api = Api()

# A DNS label (underscores too: internal names such as docker services carry them).
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def url_problem(url: str, allowed: tuple[Network, ...]) -> str | None:
    """Why the worker could never deliver to `url`, or None. The schema's pattern lets through hosts
    aiohttp refuses on every attempt (`0`, `10.0.0`, `a..b`, a 64-letter label), which would be
    retried for hours instead of refused when given; an address that is not public (and not in
    `allowed`) is refused here too. A name's addresses are checked at each delivery."""
    try:
        host = URL(url).raw_host  # IDNA-encoded
    except ValueError as exc:  # a bad port, an unclosed IPv6 bracket
        return str(exc)
    if not host:
        return "has no host"
    try:
        return address_refusal(ipaddress.ip_address(host), allowed)
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        return f"the host {host!r} is not a valid name or IP address"
    if labels[-1].isdigit():
        return f"the host {host!r} is not a canonical IPv4 address"
    return None


def _check_url(url: str, allowed: tuple[Network, ...]) -> None:
    problem = url_problem(url, allowed)
    if problem is not None:
        raise ValidationFailed([{"field": "url", "message": problem}])


@api.route("GET", "/api/webhooks", summary="Every webhook", role="admin", response=WebhookList,
           tags=("webhooks",))
async def list_webhooks(request: web.Request, call: Call[None, None]) -> Any:
    return {"items": await store.list_webhooks(request.app[DB])}


@api.route("POST", "/api/webhooks", summary="Register a webhook (the response shows its secret, once)",
           role="admin", body=CreateWebhook, response=WebhookCreated, status=201, tags=("webhooks",))
async def create_webhook(request: web.Request, call: Call[CreateWebhook, None]) -> Any:
    body = call.body
    _check_url(body.url, request.app[SETTINGS].webhooks.allow_networks)
    secret = body.secret or store.new_secret()
    hook = await store.create_webhook(
        request.app[DB], url=body.url, events=sorted(set(body.events)),
        sealed_secret=store.seal_secret(request.app[SETTINGS].encryption_key, secret),
        description=body.description, active=body.active, created_by=call.user.user_id)
    return {**hook, "secret": secret}


@api.route("GET", "/api/webhooks/{id}", summary="One webhook", role="admin", response=Webhook,
           tags=("webhooks",), errors=(404,))
async def get_webhook(request: web.Request, call: Call[None, None]) -> Any:
    return await store.get_webhook(request.app[DB], path_id(request))


@api.route("PATCH", "/api/webhooks/{id}", summary="Change a webhook's URL, events, secret or state",
           role="admin", body=UpdateWebhook, response=Webhook, tags=("webhooks",), errors=(404,))
async def update_webhook(request: web.Request, call: Call[UpdateWebhook, None]) -> Any:
    webhook_id = path_id(request)
    body = call.body
    given = {name: value for name in ("url", "events", "secret", "description", "active")
             if (value := getattr(body, name)) is not UNSET}
    if not given:
        raise ValidationFailed([{"field": "body", "message": "give at least one field to change"}])
    if "url" in given:
        _check_url(given["url"], request.app[SETTINGS].webhooks.allow_networks)
    secret = given.get("secret")
    sealed = store.seal_secret(request.app[SETTINGS].encryption_key, secret) if secret is not None else None
    events = given.get("events")
    return await store.update_webhook(
        request.app[DB], webhook_id, url=given.get("url"), events=sorted(set(events)) if events else None,
        sealed_secret=sealed, description=given.get("description"), active=given.get("active"))


@api.route("DELETE", "/api/webhooks/{id}", summary="Remove a webhook and its delivery history", role="admin",
           status=204, tags=("webhooks",), errors=(404,))
async def delete_webhook(request: web.Request, call: Call[None, None]) -> Any:
    await store.delete_webhook(request.app[DB], path_id(request))
    return web.Response(status=204)


@api.route("GET", "/api/webhooks/{id}/deliveries", summary="A webhook's deliveries, newest first",
           role="admin", query=DeliveryQuery, response=DeliveryPage, tags=("webhooks",), errors=(404,))
async def list_deliveries(request: web.Request, call: Call[None, DeliveryQuery]) -> Any:
    webhook_id = path_id(request)
    db = request.app[DB]
    await store.get_webhook(db, webhook_id)
    q = call.query
    items = await store.list_deliveries(db, webhook_id, status=q.status,
                                        before_id=int(q.cursor) if q.cursor else None, limit=q.limit + 1)
    next_cursor = str(items[q.limit - 1]["id"]) if len(items) > q.limit else None
    return {"items": items[: q.limit], "next_cursor": next_cursor}


@api.route("POST", "/api/webhooks/{id}/test", summary="Send a `webhook.test` event to this webhook now",
           role="admin", response=WebhookDelivery, status=202, tags=("webhooks",), errors=(404,))
async def test_webhook(request: web.Request, call: Call[None, None]) -> Any:
    """The worker delivers it like any event (signed, retried); follow it in the deliveries."""
    webhook_id = path_id(request)
    db = request.app[DB]
    await store.get_webhook(db, webhook_id)
    event = {"type": "webhook.test", "data": {"webhook_id": webhook_id, "requested_by": call.user.username},
             "ts": time.time()}
    delivery_id = await record_and_enqueue(db, request.app[ENQUEUER], webhook_id, secrets.token_bytes(32),
                                           "webhook.test", event)
    assert delivery_id is not None  # a random key never conflicts
    return await store.get_delivery(db, delivery_id)


@api.route("POST", "/api/webhooks/{id}/resume",
           summary="Close a paused webhook's circuit breaker: its held deliveries are sent again",
           role="admin", response=Webhook, tags=("webhooks",), errors=(404, 409))
async def resume_webhook(request: web.Request, call: Call[None, None]) -> Any:
    """For a receiver known to be back before the breaker's next probe; 409 if it is not paused."""
    webhook_id = path_id(request)
    settings = request.app[SETTINGS]
    hook = await store.resume(request.app[DB], webhook_id)
    try:
        await events.publish(request.app[REDIS], request.app[REDIS_AUTH], events.WEBHOOK_RESUMED,
                             {"webhook_id": webhook_id, "by": call.user.username},
                             log_length=settings.events.log_length)
    except REDIS_DOWN as exc:
        # Committed: the worker releases the held deliveries whatever Redis did with the event.
        log.warning("webhook.resumed event not published: Redis unreachable", webhook_id=webhook_id,
                    error=type(exc).__name__)
    return hook
