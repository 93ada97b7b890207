"""What the development stack (telegram_platform/devstack) leaves in TP_VAR_DIR, and the name it
gives PostgreSQL's superuser: production's checks (profile.py, check.py) recognise them by these,
without loading the development stack itself."""

from __future__ import annotations

import json
from pathlib import Path

SUPERUSER = "telegram_platform"
DATABASE_NAME = "telegram_platform"
# The generated JWT_SECRET and ENCRYPTION_KEY (devstack/dev_secrets.py).
SECRETS_FILE = "secrets.env"
# The ports chosen for the embedded servers, kept across runs (devstack/plan.py).
STATE_FILE = "embedded.json"


def parse_env_file(text: str) -> dict[str, str]:
    """`KEY=value` lines (an `export ` prefix and quotes allowed; comments skipped) as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def load_state(path: Path) -> dict[str, int]:
    """The embedded servers' recorded ports ({} when there is no readable state file)."""
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, int)} if isinstance(raw, dict) else {}
