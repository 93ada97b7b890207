"""What every entry point does first: settings (or one line and exit 2), then logging."""

from __future__ import annotations

import sys
from typing import NoReturn

from ..logs import configure_logging
from ..settings import AppMode, ConfigError, Settings

EXIT_CONFIG = 2


def config_failure(prog: str, error: ConfigError) -> NoReturn:
    print(f"{prog}: configuration error: {error}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def load_settings(prog: str, app_mode: AppMode) -> Settings:
    try:
        settings = Settings.from_env(app_mode=app_mode)
    except ConfigError as exc:
        config_failure(prog, exc)
    configure_logging(level=settings.log_level, fmt=settings.log_format, process=f"{prog}@{settings.instance}")
    return settings
