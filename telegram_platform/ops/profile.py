"""Profiles: development allows the embedded servers and generated secrets (scripts/run makes them);
production refuses them. scripts/run, `tp check` and every program (cli/common.py) ask this one
function, so they agree. It recognises the development stack's leftovers by their names
(dev_artifacts.py) and never loads the development stack itself."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from .dev_artifacts import SECRETS_FILE, STATE_FILE, SUPERUSER, load_state, parse_env_file

REQUIRED_IN_PRODUCTION = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENCRYPTION_KEY")


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _points_at(url: str, port: int | None) -> bool:
    try:
        parts = urlsplit(url)
        return port is not None and _is_loopback(parts.hostname) and parts.port == port
    except ValueError:
        return False


def production_refusals(environ: Mapping[str, str], var_dir: Path) -> list[str]:
    """Why this environment may not run as production (empty: it may, or it is development)."""
    env = {k: v.strip() for k, v in environ.items() if v and v.strip()}
    if env.get("TP_PROFILE", "development").lower() != "production":
        return []
    # REDIS_SENTINELS names the production Redis as well as REDIS_URL does.
    problems = [f"{name} is not set: production refuses the embedded default" for name in REQUIRED_IN_PRODUCTION
                if name not in env and not (name == "REDIS_URL" and "REDIS_SENTINELS" in env)]
    if "TDLIB_API_ID" not in env and "TP_EMULATOR_URL" not in env:
        problems.append("TDLIB_API_ID and TDLIB_API_HASH are not set: production would talk to the Telegram emulator "
                        "at its default address; set them (a rehearsal names its emulator with TP_EMULATOR_URL)")
    try:
        generated = parse_env_file((var_dir / SECRETS_FILE).read_text())
    except OSError:
        generated = {}
    for name in ("JWT_SECRET", "ENCRYPTION_KEY"):
        if name in env and generated.get(name) == env[name]:
            problems.append(f"{name} is the generated development secret ({var_dir / SECRETS_FILE}): "
                            "production needs one of its own")
    state = load_state(var_dir / STATE_FILE)
    database = env.get("DATABASE_URL", "")
    if _points_at(database, state.get("postgres_port")) and urlsplit(database).username == SUPERUSER:
        problems.append("DATABASE_URL points at the embedded development PostgreSQL (var/postgres): "
                        "production needs a managed server")
    if _points_at(env.get("REDIS_URL", ""), state.get("redis_port")):
        problems.append("REDIS_URL points at the embedded development Redis (var/redis): production needs "
                        "a managed server")
    return problems
