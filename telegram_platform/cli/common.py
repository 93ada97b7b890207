"""What every entry point does first: settings (or one line and exit 78, EX_CONFIG), then logging."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from ..logs import configure_logging
from ..ops.profile import production_refusals
from ..settings import EXIT_CONFIG, AppMode, ConfigError, Settings


def config_failure(prog: str, error: ConfigError) -> NoReturn:
    print(f"{prog}: configuration error: {error}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def load_settings(prog: str, app_mode: AppMode) -> Settings:
    try:
        settings = Settings.from_env(app_mode=app_mode)
    except ConfigError as exc:
        config_failure(prog, exc)
    refusals = production_refusals(os.environ, settings.var_dir)  # the same rule as scripts/run, tp check
    if refusals:
        print(f"{prog}: TP_PROFILE=production refuses this environment: {'; '.join(refusals)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    configure_logging(level=settings.logging.level, fmt=settings.logging.format, process=f"{prog}@{settings.instance}")
    return settings
