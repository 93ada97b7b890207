"""Settings: validated once, errors name the variable and never echo a secret."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support import self_signed

from telegram_platform.settings import EXIT_CONFIG, ConfigError, Settings, api_host

BASE = {
    "DATABASE_URL": "postgresql://u:pw-secret@localhost/db",
    "REDIS_URL": "redis://localhost:6379/0",
    "JWT_SECRET": "j" * 40,
    "ENCRYPTION_KEY": "ab" * 32,
}


S3 = {
    "TP_FILE_STORE": "s3",
    "TP_S3_ENDPOINT": "http://127.0.0.1:7480",
    "TP_S3_BUCKET": "tp-files",
    "TP_S3_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "TP_S3_SECRET_ACCESS_KEY": "s3-secret-value",
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
                                  "TP_HOST_ID": "edge-2",
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
    assert settings.host.id == "edge-2"
    assert (settings.files.max_upload_bytes, settings.files.retention_days) == (20 << 20, 7.0)
    parts = [getattr(settings, f.name) for f in dataclasses.fields(settings)]
    parts = [part for part in parts if dataclasses.is_dataclass(part)]
    assert len(parts) == 14
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
        ({"TP_HOST_ID": "Edge_1"}, "TP_HOST_ID"),
        ({"TP_HOST_ID": "-edge"}, "TP_HOST_ID"),
        ({"TP_HOST_ID": "a" * 64}, "TP_HOST_ID"),
        ({"TP_HOST_ID": "edge/1"}, "TP_HOST_ID"),
        ({"TP_HOST_GONE_SECONDS": "5"}, "TP_HOST_GONE_SECONDS"),
        ({"TP_DRAIN_ON_STOP": "maybe"}, "TP_DRAIN_ON_STOP"),
        ({"TP_REBALANCE_MOVES_PER_MINUTE": "-1"}, "TP_REBALANCE_MOVES_PER_MINUTE"),
        ({"TP_REBALANCE_MOVES_PER_MINUTE": "6001"}, "TP_REBALANCE_MOVES_PER_MINUTE"),
        ({"TP_REBALANCE_MOVES_PER_MINUTE": "fast"}, "TP_REBALANCE_MOVES_PER_MINUTE"),
        ({"REDIS_SENTINELS": "sentinel-a"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "a:26379,b:99999", "REDIS_SENTINEL_SERVICE": "tp"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "a:26379"}, "REDIS_SENTINEL_SERVICE"),
        ({"REDIS_SENTINELS": "a:26379", "REDIS_SENTINEL_SERVICE": "my master"}, "REDIS_SENTINEL_SERVICE"),
        ({"REDIS_SENTINEL_SERVICE": "tp"}, "REDIS_SENTINEL_SERVICE"),
        ({"REDIS_SENTINEL_PASSWORD": "pw"}, "REDIS_SENTINEL_PASSWORD"),
        ({"REDIS_SENTINELS": "a:26379", "REDIS_SENTINEL_SERVICE": "tp", "REDIS_URL": "unix:///run/redis.sock"},
         "REDIS_URL"),
        ({"TDLIB_SNAPSHOT_SECONDS": "5"}, "TDLIB_SNAPSHOT_SECONDS"),
        ({"TDLIB_SNAPSHOT_SECONDS": "-1"}, "TDLIB_SNAPSHOT_SECONDS"),
        ({"TDLIB_SNAPSHOT_SECONDS": "often"}, "TDLIB_SNAPSHOT_SECONDS"),
        ({"TP_MAX_UPLOAD_BYTES": "lots"}, "TP_MAX_UPLOAD_BYTES"),
        ({"TP_FILE_RETENTION_DAYS": "-1"}, "TP_FILE_RETENTION_DAYS"),
        ({"TP_FILE_STORE": "disk"}, "TP_FILE_STORE"),
        ({"TP_S3_BUCKET": "tp-files"}, "TP_S3_BUCKET"),  # without TP_FILE_STORE=s3
        ({**S3, "TP_S3_BUCKET": ""}, "TP_S3_BUCKET"),
        ({**S3, "TP_S3_BUCKET": "Files_Bucket"}, "TP_S3_BUCKET"),
        ({**S3, "TP_S3_BUCKET": "ab"}, "TP_S3_BUCKET"),
        ({**S3, "TP_S3_ACCESS_KEY_ID": ""}, "TP_S3_ACCESS_KEY_ID"),
        ({**S3, "TP_S3_SECRET_ACCESS_KEY": ""}, "TP_S3_SECRET_ACCESS_KEY"),
        ({**S3, "TP_S3_ENDPOINT": "ftp://store"}, "TP_S3_ENDPOINT"),
        ({**S3, "TP_S3_REGION": "EU West"}, "TP_S3_REGION"),
        ({**S3, "TP_S3_PART_SIZE": "1MB"}, "TP_S3_PART_SIZE"),
        ({**S3, "TP_S3_ADDRESSING_STYLE": "dns"}, "TP_S3_ADDRESSING_STYLE"),
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


def test_the_file_store_is_postgres_unless_s3_is_configured_whole() -> None:
    """TP_FILE_STORE defaults to postgres (no S3 part); s3 reads the TP_S3_* variables with S3's
    defaults (us-east-1, 8MB parts, path-style addressing), and the secret never shows in a repr."""
    default = Settings.from_env(BASE).files
    assert (default.store, default.s3) == ("postgres", None)
    files = Settings.from_env({**BASE, **S3, "TP_S3_PART_SIZE": "16MB"}).files
    assert files.store == "s3" and files.s3 is not None
    assert (files.s3.endpoint, files.s3.bucket, files.s3.region) == ("http://127.0.0.1:7480", "tp-files", "us-east-1")
    assert (files.s3.access_key_id, files.s3.secret_access_key) == ("AKIDEXAMPLE", "s3-secret-value")
    assert (files.s3.part_size, files.s3.addressing_style) == (16 << 20, "path")
    assert "s3-secret-value" not in repr(files)
    aws = Settings.from_env({**BASE, **S3, "TP_S3_ENDPOINT": "", "TP_S3_REGION": "eu-west-3",
                             "TP_S3_ADDRESSING_STYLE": "virtual"}).files.s3
    assert aws is not None and (aws.endpoint, aws.region, aws.addressing_style) == (None, "eu-west-3", "virtual")


def test_state_snapshot_interval_defaults_to_five_minutes_and_zero_turns_it_off() -> None:
    """TDLIB_SNAPSHOT_SECONDS: 300 unless set; 0 means snapshots only at login, logout and close."""
    assert Settings.from_env(BASE).tdlib.snapshot_seconds == 300.0
    assert Settings.from_env({**BASE, "TDLIB_SNAPSHOT_SECONDS": "0"}).tdlib.snapshot_seconds == 0.0
    assert Settings.from_env({**BASE, "TDLIB_SNAPSHOT_SECONDS": "60"}).tdlib.snapshot_seconds == 60.0


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


def _config_error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return info.value


def test_production_needs_a_metrics_token_or_a_metrics_address() -> None:
    """Production refuses an open /metrics on the API port: TP_METRICS_TOKEN or TP_METRICS_LISTEN is
    needed; development keeps it open by default."""
    production = {**BASE, "TP_PROFILE": "production"}
    error = _config_error(production)
    assert error.variable == "TP_METRICS_TOKEN" and "TP_METRICS_LISTEN" in error.problem
    assert Settings.from_env({**production, "TP_METRICS_TOKEN": "t" * 32}).api.metrics_token == "t" * 32
    listen = Settings.from_env({**production, "TP_METRICS_LISTEN": "127.0.0.1:9464"}).api
    assert (listen.metrics_listen, listen.metrics_token) == (("127.0.0.1", 9464), None)
    development = Settings.from_env(BASE).api
    assert (development.metrics_token, development.metrics_listen) == (None, None)
    short = _config_error({**production, "TP_METRICS_TOKEN": "short-token"})
    assert short.variable == "TP_METRICS_TOKEN" and "at least 16" in short.problem
    assert "short-token" not in str(short)


def test_tp_api_without_metrics_access_in_production_exits_78_naming_the_variable() -> None:
    """`tp-api` in production with neither TP_METRICS_TOKEN nor TP_METRICS_LISTEN: exit 78, one line naming it."""
    env = {**BASE, "TP_PROFILE": "production", "PATH": os.environ.get("PATH", "")}
    result = subprocess.run([sys.executable, "-c", "from telegram_platform.cli.api import main; main()"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TP_METRICS_TOKEN" in lines[0], result.stderr


@pytest.mark.parametrize("value", ["9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "[::1]", "h:1/x",
                                   "user@h:1"])
def test_metrics_listen_must_be_host_and_port(value: str) -> None:
    """TP_METRICS_LISTEN that is not host:port stops the process with a line naming it."""
    assert _config_error({**BASE, "TP_METRICS_LISTEN": value}).variable == "TP_METRICS_LISTEN"


def test_metrics_listen_takes_ipv6_and_refuses_the_api_port() -> None:
    """[v6]:port is an address; the API's own PORT is refused (the members could not share it)."""
    assert Settings.from_env({**BASE, "TP_METRICS_LISTEN": "[::1]:9464"}).api.metrics_listen == ("::1", 9464)
    error = _config_error({**BASE, "PORT": "3000", "TP_METRICS_LISTEN": "127.0.0.1:3000"})
    assert error.variable == "TP_METRICS_LISTEN" and "PORT" in error.problem


def test_api_host_defaults_to_loopback_in_production() -> None:
    """Production listens on 127.0.0.1 unless TP_HOST says otherwise; development keeps 0.0.0.0; the
    value supervisord.conf is given (`api_host`) is the same."""
    production = {**BASE, "TP_PROFILE": "production", "TP_METRICS_TOKEN": "t" * 32}
    assert Settings.from_env(production).api.host == "127.0.0.1" == api_host(production)
    assert Settings.from_env(BASE).api.host == "0.0.0.0" == api_host(BASE)
    assert Settings.from_env({**production, "TP_HOST": "10.1.2.3"}).api.host == "10.1.2.3"
    assert api_host({**production, "TP_HOST": "10.1.2.3"}) == "10.1.2.3"


def test_tls_certificate_and_key_go_together_and_must_load(tmp_path: Path) -> None:
    """TP_TLS_CERT and TP_TLS_KEY: both or neither; unreadable, not PEM, an encrypted key or a key of
    another certificate each stop the process with a line naming the variable; a good pair is kept."""
    good, other = self_signed(tmp_path, "good"), self_signed(tmp_path, "other")
    settings = Settings.from_env({**BASE, "TP_TLS_CERT": str(good.cert), "TP_TLS_KEY": str(good.key)})
    assert (settings.api.tls_cert, settings.api.tls_key) == (good.cert, good.key)
    assert Settings.from_env(BASE).api.tls_cert is None
    assert _config_error({**BASE, "TP_TLS_CERT": str(good.cert)}).variable == "TP_TLS_KEY"
    assert _config_error({**BASE, "TP_TLS_KEY": str(good.key)}).variable == "TP_TLS_CERT"
    missing = tmp_path / "missing.pem"
    assert _config_error({**BASE, "TP_TLS_CERT": str(missing), "TP_TLS_KEY": str(good.key)}).variable == "TP_TLS_CERT"
    assert _config_error({**BASE, "TP_TLS_CERT": str(good.cert), "TP_TLS_KEY": str(missing)}).variable == "TP_TLS_KEY"
    assert _config_error({**BASE, "TP_TLS_CERT": str(good.key), "TP_TLS_KEY": str(good.key)}).variable == "TP_TLS_CERT"
    assert _config_error({**BASE, "TP_TLS_CERT": str(good.cert), "TP_TLS_KEY": str(good.cert)}).variable == "TP_TLS_KEY"
    mismatch = _config_error({**BASE, "TP_TLS_CERT": str(good.cert), "TP_TLS_KEY": str(other.key)})
    assert mismatch.variable == "TP_TLS_KEY" and "not its key" in mismatch.problem
    key = serialization.load_pem_private_key(good.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    error = _config_error({**BASE, "TP_TLS_CERT": str(good.cert), "TP_TLS_KEY": str(encrypted)})
    assert error.variable == "TP_TLS_KEY" and "encrypted" in error.problem


def test_webhook_health_and_retention_settings() -> None:
    """Per-webhook concurrency, the breaker and the retentions have their documented defaults; a
    retention is a duration with a unit (0 keeps forever); a bad one stops the process naming it."""
    settings = Settings.from_env(BASE)
    assert (settings.webhooks.concurrency, settings.webhooks.breaker_failures) == (4, 10)
    assert (settings.webhooks.breaker_seconds, settings.webhooks.breaker_cooldown_seconds) == (300.0, 300.0)
    day = 86_400
    assert dataclasses.astuple(settings.retention) == (30 * day, 90 * day, 90 * day, 30 * day)
    custom = Settings.from_env({**BASE, "TP_WEBHOOK_CONCURRENCY": "2", "TP_WEBHOOK_BREAKER_COOLDOWN": "10m",
                                "TP_RETENTION_WEBHOOK_DELIVERIES": "12h", "TP_RETENTION_INCOMING": "0",
                                "TP_RETENTION_MESSAGES": "2d", "TP_RETENTION_REFRESH_TOKENS": "3600"})
    assert (custom.webhooks.concurrency, custom.webhooks.breaker_cooldown_seconds) == (2, 600.0)
    assert dataclasses.astuple(custom.retention) == (12 * 3600, 0, 2 * day, 3600)
    for variable, value in [("TP_RETENTION_INCOMING", "forever"), ("TP_RETENTION_MESSAGES", "1h"),
                            ("TP_WEBHOOK_CONCURRENCY", "0"), ("TP_WEBHOOK_BREAKER_COOLDOWN", "0"),
                            ("TP_RETENTION_REFRESH_TOKENS", "-1d")]:
        with pytest.raises(ConfigError) as error:
            Settings.from_env({**BASE, variable: value})
        assert error.value.variable == variable
    assert Settings.from_env({**BASE, "TP_RETENTION_MESSAGES": "0"}).retention.messages == 0


def test_host_id_defaults_to_the_hostname_and_names_itself_when_bad() -> None:
    """TP_HOST_ID unset is the hostname's first label, lowercased; a hostname that is no DNS label
    is reported under TP_HOST_ID with the way out."""
    assert Settings.from_env(BASE).host.id == os.uname().nodename.split(".", 1)[0].lower()
    assert Settings.from_env(BASE).host.gone_after == 30.0
    assert Settings.from_env({**BASE, "TP_HOST_GONE_SECONDS": "12"}).host.gone_after == 12.0
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "TP_HOST_ID": "web_1"})
    assert str(caught.value).startswith("TP_HOST_ID: must be 1-63 lowercase letters")


def test_drain_on_stop_is_on_and_rebalancing_bounded_by_default_and_both_turn_off() -> None:
    """A graceful stop hands accounts off unless TP_DRAIN_ON_STOP is false; rebalancing moves 30
    accounts a minute by default, and TP_REBALANCE_MOVES_PER_MINUTE=0 turns it off."""
    host = Settings.from_env(BASE).host
    assert (host.drain_on_stop, host.rebalance_moves_per_minute) == (True, 30)
    host = Settings.from_env({**BASE, "TP_DRAIN_ON_STOP": "false", "TP_REBALANCE_MOVES_PER_MINUTE": "0"}).host
    assert (host.drain_on_stop, host.rebalance_moves_per_minute) == (False, 0)
    assert Settings.from_env({**BASE, "TP_REBALANCE_MOVES_PER_MINUTE": "6000"}).host.rebalance_moves_per_minute == 6000


def test_sentinel_pair_replaces_redis_url_which_then_carries_only_credentials() -> None:
    """REDIS_SENTINELS + REDIS_SENTINEL_SERVICE name Redis without REDIS_URL; with it, the URL's
    password stays out of reprs; a bracketed IPv6 sentinel is read as its address."""
    env = {k: v for k, v in BASE.items() if k != "REDIS_URL"}
    plain = Settings.from_env({**env, "REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380",
                               "REDIS_SENTINEL_SERVICE": "tp-main"}).redis
    assert plain.uses_sentinel and plain.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (plain.sentinel_service, plain.url) == ("tp-main", "redis://")
    secured = Settings.from_env({**env, "REDIS_SENTINELS": "s1:26379", "REDIS_SENTINEL_SERVICE": "tp",
                                 "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
                                 "REDIS_URL": "rediss://:redis-secret@ignored/3"}).redis
    assert secured.sentinel_password == "sentinel-secret"
    assert "redis-secret" not in repr(secured) and "sentinel-secret" not in repr(secured)
    assert not Settings.from_env(BASE).redis.uses_sentinel


def test_database_url_with_several_hosts_is_accepted() -> None:
    """A libpq multi-host URL (asyncpg reads it) passes validation unchanged."""
    url = "postgresql://u:pw@db1:5432,db2:5433/tp?target_session_attrs=read-write"
    assert Settings.from_env({**BASE, "DATABASE_URL": url}).database.url == url
