"""Chooses the Telegram backend: TDLib when TDLIB_API_ID/TDLIB_API_HASH are set, else the emulator."""

from __future__ import annotations

from ..settings import Settings
from .base import TelegramBackend, UpdateSink


def create_backend(settings: Settings, *, on_update: UpdateSink) -> TelegramBackend:
    if settings.telegram_backend == "tdlib":
        # Imported here: only the worker's Telegram host may load TDLib, never an API process.
        from .tdlib.backend import TdlibBackend

        return TdlibBackend(settings.tdlib, on_update=on_update)
    from .emulator.backend import EmulatorBackend

    return EmulatorBackend(settings.emulator_url, settings.tdlib.data_dir, on_update=on_update,
                           request_timeout=settings.tdlib.request_timeout)
