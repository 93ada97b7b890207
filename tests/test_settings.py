"""Settings: validated once, errors name the variable and never echo a secret."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from telegram_platform.settings import EXIT_CONFIG, ConfigError, Settings

BASE = {
    "DATABASE_URL": "postgresql://u:pw-secret@localhost/db",
    "REDIS_URL": "redis://localhost:6379/0",
    "JWT_SECRET": "j" * 40,
    "ENCRYPTION_KEY": "ab" * 32,
}


def test_valid_environment_gives_frozen_settings() -> None:
    """A complete environment parses into a frozen object with the documented defaults."""
    settings = Settings.from_env(BASE)
    assert settings.api.port == 3000
    assert settings.encryption_key == bytes.fromhex("ab" * 32)
    assert settings.telegram_backend == "emulator"
    assert settings.worker.queue_concurrency["messages"] == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api.port = 1  # type: ignore[misc]


def test_each_part_reads_its_variables_into_its_own_frozen_sub_structure() -> None:
    """A variable lands in its part's sub-structure, and every sub-structure is frozen and slotted."""
    settings = Settings.from_env({**BASE, "TP_DB_POOL_MAX": "7", "TP_ACCESS_TOKEN_TTL": "60",
                                  "TP_API_DRAIN_SECONDS": "4", "TP_WS_SEND_QUEUE": "9", "TP_EVENT_LOG_LENGTH": "500",
                                  "TP_WEBHOOK_MAX_ATTEMPTS": "3", "TP_WORKER_MAX_JOBS": "11", "TP_LOG_LEVEL": "debug",
                                  "TP_MAX_UPLOAD_BYTES": "20MB", "TP_FILE_RETENTION_DAYS": "7"})
    assert (settings.database.url, settings.database.pool_max) == (BASE["DATABASE_URL"], 7)
    assert settings.redis.url == BASE["REDIS_URL"]
    assert (settings.auth.jwt_secret, settings.auth.access_token_ttl) == (BASE["JWT_SECRET"], 60)
    assert settings.api.drain_seconds == 4.0
    assert settings.ws.send_queue == 9
    assert settings.events.log_length == 500
    assert settings.webhooks.max_attempts == 3
    assert settings.worker.max_jobs == 11
    assert settings.logging.level == "debug"
    assert (settings.files.max_upload_bytes, settings.files.retention_days) == (20 << 20, 7.0)
    parts = [getattr(settings, f.name) for f in dataclasses.fields(settings)]
    parts = [part for part in parts if dataclasses.is_dataclass(part)]
    assert len(parts) == 12
    for part in parts:
        assert type(part).__dataclass_params__.frozen and "__slots__" in vars(type(part)), type(part)


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"REDIS_URL": ""}, "REDIS_URL"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"ENCRYPTION_KEY": ""}, "ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": "zz" * 32}, "ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": "ab" * 31}, "ENCRYPTION_KEY"),
        ({"PORT": "70000"}, "PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"APP_MODE": "both"}, "APP_MODE"),
        ({"TP_QUEUE_CONCURRENCY_MESSAGES": "0"}, "TP_QUEUE_CONCURRENCY_MESSAGES"),
        ({"TDLIB_API_ID": "12345"}, "TDLIB_API_HASH"),
        ({"TDLIB_API_ID": "12345", "TDLIB_API_HASH": "nothex"}, "TDLIB_API_HASH"),
        ({"TDLIB_USE_TEST_DC": "maybe"}, "TDLIB_USE_TEST_DC"),
        ({"TP_EVENT_LOG_LENGTH": "10"}, "TP_EVENT_LOG_LENGTH"),
        ({"TP_WORKER_MEMORY_LIMIT": "plenty"}, "TP_WORKER_MEMORY_LIMIT"),
        ({"TP_WORKER_MEMORY_LIMIT": "512k"}, "TP_WORKER_MEMORY_LIMIT"),
        ({"TP_RESTART_DELAY": "61"}, "TP_RESTART_DELAY"),
        ({"TP_RESTART_DELAY_MAX": "-1"}, "TP_RESTART_DELAY_MAX"),
        ({"TP_RESTART_RESET_AFTER": "0.5"}, "TP_RESTART_RESET_AFTER"),
        ({"TP_WORKER_MAX_MEMORY_MB": "1536"}, "TP_WORKER_MAX_MEMORY_MB"),
        ({"TP_WS_MAX_TOPICS": "0"}, "TP_WS_MAX_TOPICS"),
        ({"TP_WS_MAX_SOCKETS_PER_USER": "many"}, "TP_WS_MAX_SOCKETS_PER_USER"),
        ({"TP_TRUSTED_PROXIES": "10.0.0.0/33"}, "TP_TRUSTED_PROXIES"),
        ({"TP_MAX_UPLOAD_BYTES": "lots"}, "TP_MAX_UPLOAD_BYTES"),
        ({"TP_FILE_RETENTION_DAYS": "-1"}, "TP_FILE_RETENTION_DAYS"),
        # Several problems: the first required variable is still the one reported.
        ({"DATABASE_URL": "", "JWT_SECRET": "", "ENCRYPTION_KEY": "", "PORT": "0"}, "DATABASE_URL"),
    ],
)
def test_bad_value_names_the_variable(change: dict[str, str], variable: str) -> None:
    """Each missing or malformed variable is reported by name."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, **change})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")


def test_worker_memory_limit_and_restart_backoff_as_the_listener_reads_them() -> None:
    """TP_WORKER_MEMORY_LIMIT and the TP_RESTART_* back-off: one reading, shared by the pool and the listener."""
    defaults = Settings.from_env(BASE).supervision
    assert defaults.worker_memory_limit == 2 << 30
    assert (defaults.backoff_initial, defaults.backoff_max, defaults.backoff_reset_after) == (0.1, 15.0, 30.0)
    assert [defaults.backoff_delay(n) for n in (0, 1, 2, 3)] == pytest.approx([0.0, 0.1, 0.15, 0.225])
    assert defaults.backoff_delay(50) == 15.0
    settings = Settings.from_env({**BASE, "TP_WORKER_MEMORY_LIMIT": "3g", "TP_RESTART_DELAY": "1",
                                  "TP_RESTART_DELAY_MAX": "2", "TP_RESTART_RESET_AFTER": "60"}).supervision
    assert settings.worker_memory_limit == 3 << 30
    assert [settings.backoff_delay(n) for n in (1, 2, 3)] == pytest.approx([1.0, 1.5, 2.0])
    assert settings.backoff_reset_after == 60.0


@pytest.mark.parametrize("program", ["telegram_platform.cli.api", "telegram_platform.cli.worker"])
def test_removed_worker_max_memory_variable_stops_with_one_line(program: str) -> None:
    """TP_WORKER_MAX_MEMORY_MB, no longer read, is not ignored: one line naming it and its
    replacement (TP_WORKER_MEMORY_LIMIT), exit code 78 (EX_CONFIG)."""
    env = {**BASE, "TP_WORKER_MAX_MEMORY_MB": "1536", "PATH": os.environ.get("PATH", "")}
    result = subprocess.run([sys.executable, "-c", f"from {program} import main; main()"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TP_WORKER_MAX_MEMORY_MB" in lines[0] and "TP_WORKER_MEMORY_LIMIT" in lines[0]


def test_errors_never_echo_secret_values() -> None:
    """A malformed secret or URL is described, never quoted."""
    for change in ({"ENCRYPTION_KEY": "secret-key-value"}, {"JWT_SECRET": "tiny-secret"},
                   {"DATABASE_URL": "mysql://u:pw-secret@h/db"}):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({**BASE, **change})
        assert next(iter(change.values())) not in str(caught.value)
        assert "pw-secret" not in str(caught.value)


def test_tdlib_backend_chosen_when_credentials_set() -> None:
    """TDLIB_API_ID and TDLIB_API_HASH together select the real TDLib backend."""
    settings = Settings.from_env({**BASE, "TDLIB_API_ID": "94575", "TDLIB_API_HASH": "a" * 32})
    assert settings.telegram_backend == "tdlib"
    assert "a" * 32 not in repr(settings)


def test_repr_hides_secrets() -> None:
    """Printing the settings object (e.g. in a traceback) shows no secret."""
    text = repr(Settings.from_env(BASE))
    assert "pw-secret" not in text and "j" * 40 not in text and "ab" * 32 not in text


@pytest.mark.parametrize("program", ["telegram_platform.cli.api", "telegram_platform.cli.worker"])
def test_missing_key_in_production_exits_78_with_one_line(program: str) -> None:
    """`tp-api`/`tp-worker` without ENCRYPTION_KEY in production: one line naming it, exit code 78 (EX_CONFIG)."""
    env = {**BASE, "TP_PROFILE": "production", "PATH": os.environ.get("PATH", "")}
    del env["ENCRYPTION_KEY"]
    result = subprocess.run([sys.executable, "-c", f"from {program} import main; main()"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ENCRYPTION_KEY" in lines[0]
    assert "pw-secret" not in result.stderr + result.stdout
