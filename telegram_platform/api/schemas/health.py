"""The API's own health answer (`api/routes/health.py`)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Health(msgspec.Struct):
    status: str


class HealthDetails(msgspec.Struct, omit_defaults=True):
    """`/api/health/detailed`: only `status` without a token (for load balancers and monitors),
    every part with one."""

    status: Literal["ok", "degraded"]
    version: str | None = None
    database: dict[str, Any] | None = None
    redis: dict[str, Any] | None = None
    queues: dict[str, Any] | None = None
    workers: list[Any] | None = None
    tdlib: dict[str, Any] | None = None
    processes: dict[str, Any] | None = None
