"""The development stack's failures: each a one-line message saying what is wrong and what to do."""

from __future__ import annotations


class DevStackError(RuntimeError):
    """A one-line, user-facing problem (what is missing and what to do)."""


class ProductionRefusal(DevStackError):
    """TP_PROFILE=production without explicit servers and secrets."""
