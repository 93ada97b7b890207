"""The API's own health answer (`api/routes/health.py`)."""

from __future__ import annotations

import msgspec


class Health(msgspec.Struct):
    status: str
