"""Telegram accounts: create (the login starts at once), authorization steps, list, remove.

API processes never host sessions: each step is a request to the worker's Telegram host, answered
within a second on the emulator.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from ...errors import GatewayTimeout, ValidationFailed
from ...outages import REDIS_DOWN
from ...storage import accounts as account_store
from ...storage import limits as limits_store
from ...telegram.rpc import HostError, call_host
from ..endpoints import Api, Call, path_id
from ..keys import DB, REDIS, REDIS_AUTH, SETTINGS
from ..schemas.accounts import (
    Account,
    AccountLimits,
    AccountList,
    CreateAccount,
    LoginAgainQuery,
    Register,
    SubmitCode,
    SubmitPassword,
    UpdateLimits,
)

log = structlog.get_logger(__name__)

LOGIN_NOT_STARTED = ("the login has not started: no worker took it (Redis unreachable or no tp-worker "
                     "answering); start it with POST /api/accounts/{id}/auth/login")

# What leaves a new account's login unasked: no Redis to carry it, or no worker answering.
NO_HOST_ANSWER: Final[tuple[type[BaseException], ...]] = (*REDIS_DOWN, GatewayTimeout)

api = Api()


async def _step(request: web.Request, op: str, args: dict[str, Any]) -> Any:
    account_id = path_id(request)
    db = request.app[DB]
    await account_store.get_account(db, account_id)
    await call_host(request.app[REDIS], request.app[REDIS_AUTH], op, account_id, args)
    return await account_store.get_account(db, account_id)


@api.route("POST", "/api/accounts", summary="Add an account; its login starts at once", role="operator",
           body=CreateAccount, response=Account, status=201, tags=("accounts",), errors=(409, 422, 504))
async def create_account(request: web.Request, call: Call[CreateAccount, None]) -> Any:
    body = call.body
    phone = body.phone if body.phone.startswith("+") else f"+{body.phone}"
    proxy = msgspec.to_builtins(body.proxy) if body.proxy else None
    db = request.app[DB]
    account = await account_store.create_account(db, phone, proxy,
                                                 encryption_key=request.app[SETTINGS].encryption_key)
    try:
        await call_host(request.app[REDIS], request.app[REDIS_AUTH], "login", account["id"])
    except NO_HOST_ANSWER as exc:
        # The row is committed: the account exists, and a 503 or 504 here would send a client that
        # retries into a 409. It is answered as created, its last_error saying the login waits.
        log.warning("account created, its login not started", account_id=account["id"], error=type(exc).__name__)
        await account_store.note_login_not_started(db, account["id"], LOGIN_NOT_STARTED)
    except HostError as exc:
        if exc.code != "auth_rejected":
            raise
        # Telegram refused the phone itself: bad input, so nothing is kept.
        await account_store.delete_account(db, account["id"])
        raise ValidationFailed([{"field": "phone", "message": exc.message}]) from None
    return await account_store.get_account(db, account["id"])


@api.route("GET", "/api/accounts", summary="All accounts", response=AccountList, tags=("accounts",))
async def list_accounts(request: web.Request, call: Call[None, None]) -> Any:
    return {"items": await account_store.list_accounts(request.app[DB])}


@api.route("GET", "/api/accounts/{id}", summary="One account", response=Account, tags=("accounts",),
           errors=(404,))
async def get_account(request: web.Request, call: Call[None, None]) -> Any:
    return await account_store.get_account(request.app[DB], path_id(request))


@api.route("POST", "/api/accounts/{id}/auth/code", summary="Submit the login code", role="operator",
           body=SubmitCode, response=Account, tags=("accounts",), errors=(404, 409, 422, 504))
async def submit_code(request: web.Request, call: Call[SubmitCode, None]) -> Any:
    return await _step(request, "code", {"code": call.body.code})


@api.route("POST", "/api/accounts/{id}/auth/password", summary="Submit the 2FA password", role="operator",
           body=SubmitPassword, response=Account, tags=("accounts",), errors=(404, 409, 422, 504))
async def submit_password(request: web.Request, call: Call[SubmitPassword, None]) -> Any:
    return await _step(request, "password", {"password": call.body.password})


@api.route("POST", "/api/accounts/{id}/auth/register", summary="Register a new Telegram user",
           role="operator", body=Register, response=Account, tags=("accounts",), errors=(404, 409, 422, 504))
async def register(request: web.Request, call: Call[Register, None]) -> Any:
    return await _step(request, "register", {"first_name": call.body.first_name,
                                             "last_name": call.body.last_name})


@api.route("POST", "/api/accounts/{id}/auth/login", summary="Log the account in again", role="operator",
           query=LoginAgainQuery, response=Account, tags=("accounts",), errors=(404, 409, 422, 504))
async def login_again(request: web.Request, call: Call[None, LoginAgainQuery]) -> Any:
    """For an account whose session ended (`logged_out`: ended at Telegram; `failed`): a new login
    starts and Telegram sends a new code, then the steps go on as after `POST /api/accounts`. The
    account keeps its id, history and limits. A session that has not ended (`ready`, or a login under
    way) is a 409 naming its `auth_state`; an account no worker has open is opened first, and one
    whose stored session is still good resumes (to `ready`, or the login step it had reached). A
    database that does not open with this ENCRYPTION_KEY is a 409 `wrong_database_key` until the key
    is restored or `set_aside_database=true` is given."""
    return await _step(request, "login_again", {"set_aside_database": call.query.set_aside_database})


@api.route("DELETE", "/api/accounts/{id}", summary="Log the account out and remove it", role="operator",
           status=204, tags=("accounts",), errors=(404, 504))
async def delete_account(request: web.Request, call: Call[None, None]) -> Any:
    """Logs the session out at Telegram and removes the account and its local database. Its
    messages stay, with `account_id` null, so its campaigns' progress does not change; those not
    sent yet go to the campaign's other accounts, or are cancelled (storage/accounts.py)."""
    account_id = path_id(request)
    db = request.app[DB]
    await account_store.get_account(db, account_id)
    await call_host(request.app[REDIS], request.app[REDIS_AUTH], "logout", account_id)
    await account_store.delete_account(db, account_id)
    return web.Response(status=204)


# -- sending limits (what the campaign engine paces the account to; storage/limits.py) ---------------

def _limits_view(account_id: int, limits: limits_store.Limits, created: dt.datetime, custom: bool) -> dict[str, Any]:
    return {"account_id": account_id, **limits.as_dict(), "custom": custom,
            "daily_cap_now": limits.daily_cap(created, dt.datetime.now(dt.UTC))}


@api.route("GET", "/api/accounts/{id}/limits", summary="The account's sending limits (the defaults until set)",
           response=AccountLimits, tags=("accounts",), errors=(404,))
async def get_limits(request: web.Request, call: Call[None, None]) -> Any:
    account_id = path_id(request)
    limits, created, custom = await limits_store.get_limits(request.app[DB], account_id)
    return _limits_view(account_id, limits, created, custom)


@api.route("PUT", "/api/accounts/{id}/limits", summary="Change the account's sending limits (fields left out keep "
           "their value); running campaigns follow within seconds", role="operator", body=UpdateLimits,
           response=AccountLimits, tags=("accounts",), errors=(404, 422))
async def set_limits(request: web.Request, call: Call[UpdateLimits, None]) -> Any:
    account_id = path_id(request)
    changes = {k: v for k, v in msgspec.structs.asdict(call.body).items() if v is not None}
    limits, created = await limits_store.set_limits(request.app[DB], account_id, changes)
    return _limits_view(account_id, limits, created, True)


@api.route("DELETE", "/api/accounts/{id}/limits", summary="Restore the default sending limits", role="operator",
           response=AccountLimits, tags=("accounts",), errors=(404,))
async def reset_limits(request: web.Request, call: Call[None, None]) -> Any:
    account_id = path_id(request)
    db = request.app[DB]
    await limits_store.reset_limits(db, account_id)
    limits, created, custom = await limits_store.get_limits(db, account_id)
    return _limits_view(account_id, limits, created, custom)
