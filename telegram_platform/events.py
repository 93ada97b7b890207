"""Platform events (`message.status`, `account.state`, ...) published on Redis for every API process."""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

EVENTS_CHANNEL = "tp:events"


def encode_event(event_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "data": data, "ts": time.time()}, default=str)


async def publish(redis: aioredis.Redis, event_type: str, data: dict[str, Any]) -> None:
    await redis.publish(EVENTS_CHANNEL, encode_event(event_type, data))
