"""Users of the API: admins list, create, change the role of and disable them.

Access tokens carry the role and live `TP_ACCESS_TOKEN_TTL` seconds (15 minutes by default). Every
change to a user revokes their refresh tokens; a demotion or disabling also makes every API process
refuse their access tokens at once and close their WebSockets (api/revocations.py).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from msgspec import UNSET

from ...errors import Conflict, NotFound, ValidationFailed
from ...storage import users as user_store
from ..endpoints import Api, Call, path_id
from ..keys import DB, PASSWORDS
from ..revocations import REVOCATIONS
from ..schemas.users import CreateUser, UpdateUser, User, UserList

api = Api()


def _out(user: user_store.User) -> User:
    return User(id=user.id, username=user.username, role=user.role,  # type: ignore[arg-type]
                disabled=user.disabled, created_at=user.created_at)


@api.route("GET", "/api/users", summary="Every user", role="admin", response=UserList, tags=("users",))
async def list_users(request: web.Request, call: Call[None, None]) -> Any:
    return UserList(items=[_out(u) for u in await user_store.list_users(request.app[DB])])


@api.route("POST", "/api/users", summary="Create a user", role="admin", body=CreateUser, response=User,
           status=201, tags=("users",), errors=(409,))
async def create_user(request: web.Request, call: Call[CreateUser, None]) -> Any:
    body = call.body
    password_hash = await request.app[PASSWORDS].hash(body.password)
    return _out(await user_store.create_user(request.app[DB], body.username, password_hash, body.role))


@api.route("GET", "/api/users/me", summary="The caller", response=User, tags=("users",), errors=(404,))
async def current_user(request: web.Request, call: Call[None, None]) -> Any:
    user = await user_store.get_user(request.app[DB], call.user.user_id)
    if user is None:
        raise NotFound("this token's user no longer exists")
    return _out(user)


@api.route("GET", "/api/users/{id:[0-9]+}", summary="One user", role="admin", response=User, tags=("users",),
           errors=(404,))
async def get_user(request: web.Request, call: Call[None, None]) -> Any:
    user_id = path_id(request)
    user = await user_store.get_user(request.app[DB], user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return _out(user)


@api.route("PATCH", "/api/users/{id:[0-9]+}", role="admin",
           summary="Change a user's role, password, or disable them (a demotion ends their access at once)",
           body=UpdateUser, response=User, tags=("users",), errors=(404, 409))
async def update_user(request: web.Request, call: Call[UpdateUser, None]) -> Any:
    """Any change revokes the user's refresh tokens. A demotion or disabling also ends their access
    at once: every API process refuses their access tokens and closes their WebSockets. The last
    enabled admin can be neither demoted nor disabled (409), and no admin can do that to themselves
    (409): a slip would end the very session that could undo it; another admin can."""
    user_id = path_id(request)
    body = call.body
    role = None if body.role is UNSET else body.role
    disabled = None if body.disabled is UNSET else body.disabled
    password = None if body.password is UNSET else body.password
    if role is None and disabled is None and password is None:
        raise ValidationFailed([{"field": "body", "message": "give at least one of role, disabled, password"}])
    demoted = role is not None and role != call.user.role
    if user_id == call.user.user_id and (demoted or disabled is True):
        raise Conflict("you cannot demote or disable yourself; another admin can",
                       details={"field": "role" if demoted else "disabled"})
    password_hash = await request.app[PASSWORDS].hash(password) if password is not None else None
    user = await user_store.update_user(request.app[DB], user_id, role=role, disabled=disabled,
                                        password_hash=password_hash)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    await request.app[REVOCATIONS].announce(user.id, user.token_version)
    return _out(user)
