"""`tp init`: lay a host out from the installed package alone.

Linux's usual places under a prefix (`/` by default, any directory for a trial without root):

    etc/telegram-platform/env                   the settings, secrets included (0600; never overwritten)
    etc/telegram-platform/supervisord.conf      from the packaged supervisord.conf
    etc/telegram-platform/prometheus/           alert rules, scrape configuration, Grafana dashboard
    etc/telegram-platform/nginx/                the reverse proxy's example (TLS in front of the API)
    etc/systemd/system/telegram-platform.service  from the packaged unit, pointing at this installation
    var/lib/telegram-platform                   TP_VAR_DIR (0700), TDLib data in tdlib/ (0700)
    var/log/telegram-platform                   supervisord's and the programs' logs (0750)
    run/telegram-platform                       supervisord's socket, PROMETHEUS_MULTIPROC_DIR (0700)

The packaged files are the only copies: the unit and the env example are written with these default
paths, and rendering replaces them (and supervisord.conf's clone-relative %(here)s/var paths) with
the layout's. What it creates passes `tp check` as created (the modes are the ones it wants).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..settings import EXIT_CONFIG, ConfigError, _Env, api_processes
from ..version import VERSION

SERVICE = "telegram-platform"
DEFAULT_USER = SERVICE
# The places the packaged unit and env example name; rendering replaces each with the layout's.
TEMPLATE_BIN_DIR = "/opt/telegram-platform/venv/bin"
TEMPLATE_ETC_DIR = "/etc/telegram-platform"
TEMPLATE_DATA_DIR = "/var/lib/telegram-platform"
TEMPLATE_LOG_DIR = "/var/log/telegram-platform"
TEMPLATE_RUN_DIR = "/run/telegram-platform"
# Characters a path may not hold: the unit would need quoting or would expand them (%, $).
_UNSAFE_PATH = re.compile(r"[\s%$\"'\\]")


class InitRefused(Exception):
    """`tp init` will not go on (an existing env file, a missing user, an unusable path)."""

    exit_status = 1


class InitConfigError(InitRefused):
    """A value given to `tp init` is not valid: the configuration error exit status."""

    exit_status = EXIT_CONFIG


def packaged(name: str) -> str:
    """The text of one packaged deployment file (deploy/<name>)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything goes under `prefix`, and the binaries the unit runs."""

    prefix: Path
    bin_dir: Path

    @property
    def etc_dir(self) -> Path:
        return self._under(TEMPLATE_ETC_DIR)

    @property
    def env_file(self) -> Path:
        return self.etc_dir / "env"

    @property
    def supervisord_conf(self) -> Path:
        return self.etc_dir / "supervisord.conf"

    @property
    def prometheus_dir(self) -> Path:
        return self.etc_dir / "prometheus"

    @property
    def nginx_dir(self) -> Path:
        return self.etc_dir / "nginx"

    @property
    def data_dir(self) -> Path:
        return self._under(TEMPLATE_DATA_DIR)

    @property
    def tdlib_dir(self) -> Path:
        return self.data_dir / "tdlib"

    @property
    def log_dir(self) -> Path:
        return self._under(TEMPLATE_LOG_DIR)

    @property
    def run_dir(self) -> Path:
        return self._under(TEMPLATE_RUN_DIR)

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"

    @property
    def unit_file(self) -> Path:
        return self._under(f"/etc/systemd/system/{SERVICE}.service")

    def _under(self, absolute: str) -> Path:
        return self.prefix / absolute.lstrip("/")

    def replacements(self) -> list[tuple[str, str]]:
        """(template path, this layout's path), longest first so that none rewrites another's result."""
        pairs = [(TEMPLATE_BIN_DIR, str(self.bin_dir)), (TEMPLATE_ETC_DIR, str(self.etc_dir)),
                 (TEMPLATE_DATA_DIR, str(self.data_dir)), (TEMPLATE_LOG_DIR, str(self.log_dir)),
                 (TEMPLATE_RUN_DIR, str(self.run_dir))]
        return sorted(pairs, key=lambda pair: -len(pair[0]))


def _replace_paths(text: str, layout: Layout) -> str:
    pattern = re.compile("|".join(re.escape(old) for old, _ in layout.replacements()))
    mapping = dict(layout.replacements())
    return pattern.sub(lambda match: mapping[match.group(0)], text)


def render_unit(template: str, layout: Layout, user: str, group: str) -> str:
    """The unit for this layout, user and installation. Under a prefix the run directory is not
    /run/telegram-platform, so systemd's RuntimeDirectory= (which makes only that one) goes."""
    lines = []
    for line in _replace_paths(template, layout).splitlines():
        if line.startswith("User="):
            line = f"User={user}"
        elif line.startswith("Group="):
            line = f"Group={group}"
        elif (line.startswith(("RuntimeDirectory", "# RuntimeDirectory"))
              and layout.run_dir != Path(TEMPLATE_RUN_DIR)):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_supervisord_conf(template: str, layout: Layout) -> str:
    """supervisord.conf for this layout: the clone's %(here)s/var/... paths become the host's."""
    conf_value = {  # supervisord expands %(name)s in values: a literal % is written %%
        "%(here)s/var/run": str(layout.run_dir).replace("%", "%%"),
        "%(here)s/var/log": str(layout.log_dir).replace("%", "%%"),
        "%(here)s/var/supervisor.d": str(layout.etc_dir / "supervisor.d").replace("%", "%%"),
        "%(here)s": str(layout.data_dir).replace("%", "%%"),
    }
    pattern = re.compile("|".join(re.escape(key) for key in sorted(conf_value, key=len, reverse=True)))
    lines = [f"; Written by `tp init` (telegram-platform {VERSION}) from the packaged deploy/supervisord.conf,",
             "; with this host's directories; `tp init --keep-env` writes it again (after an upgrade).", ";"]
    for line in template.splitlines():
        if not line.lstrip().startswith(";"):
            line = pattern.sub(lambda match: conf_value[match.group(0)], line)
        lines.append(line)
    text = "\n".join(lines) + "\n"
    left = [line for line in text.splitlines() if "%(here)s" in line and not line.lstrip().startswith(";")]
    if left:
        raise AssertionError(f"supervisord.conf still names %(here)s: {left[0]}")  # the template changed
    return text


def render_env(template: str, layout: Layout, values: dict[str, str]) -> str:
    """The env file: the example with the layout's paths and `values` filled in by name."""
    lines = []
    for line in _replace_paths(template, layout).splitlines():
        key, equals, _ = line.partition("=")
        if equals and not line.startswith("#") and key in values:
            line = f"{key}={values[key]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def generated_secrets() -> dict[str, str]:
    """Strong secrets for a new host: 64 URL-safe characters for JWT, 32 random bytes as hex for the
    encryption key and for the metrics token (production refuses an open /metrics)."""
    return {"JWT_SECRET": secrets.token_urlsafe(48), "ENCRYPTION_KEY": secrets.token_hex(32),
            "TP_METRICS_TOKEN": secrets.token_hex(32)}


def validate_values(values: dict[str, str]) -> None:
    """The same rules the programs apply (settings.py), before anything is written."""
    env = _Env(values)
    checks: dict[str, Callable[[], object]] = {
        "DATABASE_URL": lambda: env.url("DATABASE_URL", ("postgres", "postgresql")),
        "REDIS_URL": lambda: env.url("REDIS_URL", ("redis", "rediss", "unix")),
        "JWT_SECRET": lambda: env.secret_text("JWT_SECRET", 32),
        "ENCRYPTION_KEY": lambda: env.hex_key("ENCRYPTION_KEY", 32),
        "PORT": lambda: env.integer("PORT", 3000, 1, 65535),
        "TP_API_PROCESSES": lambda: api_processes(values),
    }
    for name, check in checks.items():
        if name in values:
            try:
                check()
            except ConfigError as exc:
                raise InitConfigError(f"tp init: {exc}") from None


def service_account(user: str | None, prefix: Path) -> tuple[str, str]:
    """(user, group) the unit runs as: --user, else telegram-platform for root's system-wide
    install, else whoever runs `tp init` (a trial under --prefix)."""
    if user is None:
        user = DEFAULT_USER if os.geteuid() == 0 and prefix == Path("/") else pwd.getpwuid(os.geteuid()).pw_name
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InitRefused(f"tp init: no user {user}: create it first (useradd --system --no-create-home "
                          f"--shell /usr/sbin/nologin {user}; systemd/install does)") from None
    return user, grp.getgrgid(entry.pw_gid).gr_name


def _directory(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    if owner is not None:
        os.chown(path, *owner)


def _write(path: Path, text: str, mode: int, owner: tuple[int, int] | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, *owner)
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class InitRequest:
    prefix: Path
    user: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    jwt_secret: str | None = None
    encryption_key: str | None = None
    port: int | None = None
    host: str | None = None
    api_processes: str | None = None
    keep_env: bool = False
    # The binaries the unit runs: this installation's (the interpreter's bin directory) by default.
    bin_dir: Path | None = None


def lay_out_host(request: InitRequest) -> tuple[Layout, list[Path]]:
    """Create the layout (see the module's docstring); returns it and the files written."""
    prefix = request.prefix.absolute()
    layout = Layout(prefix, (request.bin_dir or Path(sys.executable).parent).absolute())
    for path in (layout.etc_dir, layout.data_dir, layout.bin_dir):
        if _UNSAFE_PATH.search(str(path)):
            raise InitConfigError(f"tp init: {path}: a path with spaces, quotes, % or $ cannot go into the unit")
    if layout.env_file.exists() and not request.keep_env:
        raise InitRefused(f"tp init: {layout.env_file} exists: it is never overwritten (it holds the secrets). "
                          "--keep-env writes everything else again (after an upgrade)")
    user, group = service_account(request.user, prefix)
    entry = pwd.getpwnam(user)
    as_root = os.geteuid() == 0
    service_owner = (entry.pw_uid, entry.pw_gid) if as_root else None
    config_owner = (0, entry.pw_gid) if as_root else None

    values: dict[str, str] = {"TP_PROFILE": "production"}
    if not request.keep_env:
        values.update(generated_secrets())
        given = {"DATABASE_URL": request.database_url, "REDIS_URL": request.redis_url,
                 "JWT_SECRET": request.jwt_secret, "ENCRYPTION_KEY": request.encryption_key,
                 "PORT": str(request.port) if request.port is not None else None, "TP_HOST": request.host,
                 "TP_API_PROCESSES": request.api_processes}
        values.update({key: value for key, value in given.items() if value is not None})
        validate_values(values)

    _directory(layout.etc_dir, 0o750, config_owner)
    _directory(layout.etc_dir / "supervisor.d", 0o750, config_owner)  # the conf's [include]: local programs
    for directory, mode in ((layout.data_dir, 0o700), (layout.tdlib_dir, 0o700), (layout.log_dir, 0o750),
                            (layout.run_dir, 0o700), (layout.metrics_dir, 0o700)):
        _directory(directory, mode, service_owner)
    written = []
    if not request.keep_env:
        _write(layout.env_file, render_env(packaged(f"{SERVICE}.env.example"), layout, values), 0o600,
               (0, 0) if as_root else None)
        written.append(layout.env_file)
    _write(layout.supervisord_conf, render_supervisord_conf(packaged("supervisord.conf"), layout), 0o640, config_owner)
    layout.unit_file.parent.mkdir(parents=True, exist_ok=True)
    _write(layout.unit_file, render_unit(packaged(f"{SERVICE}.service"), layout, user, group), 0o644,
           (0, 0) if as_root else None)
    written += [layout.supervisord_conf, layout.unit_file]
    for name, directory in (("prometheus", layout.prometheus_dir), ("nginx", layout.nginx_dir)):
        _directory(directory, 0o755, None)
        for item in sorted(resources.files(__package__).joinpath(name).iterdir(), key=lambda i: i.name):
            if item.is_file():
                _write(directory / item.name, item.read_text(encoding="utf-8"), 0o644, None)
                written.append(directory / item.name)
    return layout, written
