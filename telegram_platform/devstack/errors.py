"""The development stack's one kind of failure: a one-line message saying what to do."""

from __future__ import annotations


class EmbeddedError(RuntimeError):
    """A one-line, user-facing problem (what is missing and what to do)."""


class ProductionRefusal(EmbeddedError):
    """TP_PROFILE=production without explicit servers and secrets."""
