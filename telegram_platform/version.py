"""The versions people can see: `--version` on every console script, tp_build_info, the detailed
health answer and `tp status` all take them from here (the package's one version source is
telegram_platform.__version__, which pyproject.toml's dynamic version reads too)."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata

from . import __version__

VERSION = __version__


def tdlib_version() -> str:
    """The bundled TDLib's version, from the tdjson distribution (named after the TDLib release it
    bundles), without loading the library."""
    try:
        return metadata.version("tdjson")
    except metadata.PackageNotFoundError:
        return "unknown"


def python_version() -> str:
    return platform.python_version()


def version_line(prog: str) -> str:
    """What `--version` prints."""
    return f"{prog} (telegram-platform) {VERSION}, TDLib {tdlib_version()}, Python {python_version()}"


class _VersionAction(argparse.Action):
    """argparse's `version` action, the line made only when asked (not at every program start)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_line(parser.prog))  # to stdout, as argparse's own version action does
        parser.exit()


def add_version_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--version", action=_VersionAction, help="show the versions and exit")
    return parser
