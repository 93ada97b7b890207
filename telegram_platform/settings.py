"""Settings: read once from the environment at start, validated into one frozen tree.

Every problem is reported as a ConfigError naming the variable; secret values are never echoed.
One module past ~500 lines on purpose: every variable of every part is read and validated in this
one place, so a part's sub-structure sits beside the code that reads it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

from .queue.registry import QUEUE_NAMES
from .tls import TlsFileError, server_context

Profile = Literal["development", "production"]
AppMode = Literal["api", "worker", "cli"]
LogFormat = Literal["auto", "json", "console"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_QUEUE_CONCURRENCY = 5
# Incoming messages are stored and published in the order they arrived (worker/updates.py).
QUEUE_CONCURRENCY_DEFAULTS = {"updates": 1}
MIN_JWT_SECRET_LENGTH = 32
# A bearer token that guards a port: too short to guess online (`tp init` makes 64 hex digits).
MIN_METRICS_TOKEN_LENGTH = 16
# About this many of the latest events are kept for replay (TP_EVENT_LOG_LENGTH; trimmed
# approximately, as XADD's `MAXLEN ~` does cheaply): ~10 MB of Redis with typical events, minutes of
# a platform sending hundreds of messages a second.
DEFAULT_EVENT_LOG_LENGTH = 50_000
# The programs supervisord runs (supervisord.conf): the API group and the worker, whose crashes the
# tp-events listener restarts with back-off (TP_MANAGED_PROGRAMS), and the listener itself.
API_GROUP = "tp-api"
WORKER_PROGRAM = "tp-worker"
LISTENER_PROGRAM = "tp-events"
# The services the platform runs on, when scripts/run embeds them (devstack/plan.py writes their
# programs into var/supervisor.d): restarted on the host, never through the API.
BACKING_SERVICE_PROGRAMS = ("postgres", "redis", "tp-emulator")
# The one worker memory limit is TP_WORKER_MEMORY_LIMIT, for the whole worker (pool and children),
# enforced by the supervisord listener. The pool recycles a child (warm stop, fresh start) at this
# share of it, split between its children, so a growing child is replaced before the whole worker
# is restarted: 3/4 of the 2GB default is the 1536 MiB the child ceiling used to default to.
WORKER_CHILD_MEMORY_SHARE = 0.75
# Variables that are no longer read: set, they stop the process with one line naming the way now.
REMOVED_VARIABLES = {
    "TP_WORKER_MAX_MEMORY_MB": "is no longer read: a worker child is recycled at 3/4 of TP_WORKER_MEMORY_LIMIT "
                               "(the whole worker's limit); set that instead",
}
# The exit status of every console script for a configuration error (sysexits.h's EX_CONFIG): the
# systemd unit does not restart on it (RestartPreventExitStatus=78), since no restart fixes it.
EXIT_CONFIG = 78
# TP_API_PROCESSES: a count, or this word for one API process per CPU (also the default).
API_PROCESSES_MAX = "max"
MAX_API_PROCESSES = 256
# Where the API group listens unless TP_HOST says otherwise: production only on loopback, behind a
# TLS-terminating reverse proxy on the same host (docs/deployment.md); development on every address.
DEFAULT_API_HOST = {"production": "127.0.0.1", "development": "0.0.0.0"}
# TP_HOST_ID: a DNS label, lowercase (it starts worker identities, so lease owners and Redis keys).
MAX_HOST_ID_LENGTH = 63
HOST_ID_PATTERN = re.compile(rf"[a-z0-9][a-z0-9-]{{0,{MAX_HOST_ID_LENGTH - 1}}}")
# A host whose last heartbeat is older than this is `gone` (TP_HOST_GONE_SECONDS).
DEFAULT_HOST_GONE_SECONDS = 30.0
# Accounts moved onto hosts under their fair share, platform-wide, per minute
# (TP_REBALANCE_MOVES_PER_MINUTE; 0: never). Each move reconnects one account to Telegram: a joining
# host fills over minutes rather than in one burst (docs/scaling.md).
DEFAULT_REBALANCE_MOVES_PER_MINUTE = 30
_SENTINEL_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
DAY_SECONDS = 86_400
# TP_FILE_STORE=s3: S3's rules for bucket names, region names and the size of a multipart upload's parts.
S3_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
S3_REGION_PATTERN = re.compile(r"[a-z0-9-]{1,64}")
S3_MIN_PART_SIZE = 5 << 20
S3_MAX_PART_SIZE = 5 << 30
S3_VARIABLES = ("TP_S3_ENDPOINT", "TP_S3_BUCKET", "TP_S3_REGION", "TP_S3_ACCESS_KEY_ID", "TP_S3_SECRET_ACCESS_KEY",
                "TP_S3_PART_SIZE", "TP_S3_ADDRESSING_STYLE")


class ConfigError(Exception):
    """A setting is missing or malformed; `variable` names it, the message never holds its value."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True)
class TdlibSettings:
    api_id: int | None
    api_hash: str | None = field(repr=False)
    data_dir: Path
    use_test_dc: bool
    log_verbosity: int
    log_file: Path | None
    request_timeout: float
    max_clients: int
    # How often an open account's state is snapshotted into PostgreSQL besides at READY and at
    # close (worker/tdstate.py); 0: only then.
    snapshot_seconds: float = 300.0

    @property
    def configured(self) -> bool:
        return self.api_id is not None and self.api_hash is not None


@dataclass(frozen=True, slots=True)
class SupervisionSettings:
    """What operating the platform under supervisord needs: where supervisord is, which programs it
    watches, memory limits, restart back-off. Part of `Settings`; the tp-events listener and `tp`
    read it alone (`from_env`) because they must work without the database or the secrets."""

    supervisor_socket: Path
    var_dir: Path
    api_group: str = API_GROUP
    worker_program: str = WORKER_PROGRAM
    # Programs whose crashes the listener restarts (with back-off): they run with autorestart=false.
    managed: tuple[str, ...] = (API_GROUP, WORKER_PROGRAM)
    api_memory_limit: int = 1 << 30
    worker_memory_limit: int = 2 << 30
    watchdog_interval: float = 2.0
    backoff_initial: float = 0.1
    backoff_factor: float = 1.5
    backoff_max: float = 15.0
    backoff_reset_after: float = 30.0
    ready_timeout: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SupervisionSettings:
        return _supervision(_Env(os.environ if environ is None else environ))

    def backoff_delay(self, consecutive_crashes: int) -> float:
        """PM2's exp_backoff_restart_delay: initial x factor^(n-1), capped."""
        if consecutive_crashes <= 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (consecutive_crashes - 1)))

    def memory_limit(self, group: str) -> tuple[int, bool] | None:
        """(limit in bytes, count the process's children too) for a program, or None."""
        if group == self.api_group:
            return self.api_memory_limit, False
        if group == self.worker_program:
            return self.worker_memory_limit, True
        return None


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """PostgreSQL: where it is and the pool each process opens to it."""

    url: str = field(repr=False)
    pool_min: int
    pool_max: int
    # Apply pending migrations at process start (development default; production runs `tp migrate`).
    auto_migrate: bool


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Redis: the queues, the event stream and the coordination keys all live in this one server,
    named by `url`, or a master Sentinel finds (`sentinels` + `sentinel_service`: storage/redis.py).
    With Sentinel, `url` (optional) carries only what a connection needs besides an address: the
    username and password, the database number, TLS (rediss://); its host and port are not used."""

    url: str | None = field(repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)


@dataclass(frozen=True, slots=True)
class HostSettings:
    """This host among the platform's hosts (docs/scaling.md): its id, which names it in `tp hosts`,
    its workers' identities and its accounts' ownership, and how long a silent host counts as up."""

    id: str
    gone_after: float
    # A graceful stop of this host's worker hands its accounts to the other up hosts first
    # (TP_DRAIN_ON_STOP); off, they are kept (owner_host) and resumed here at the next start.
    drain_on_stop: bool = True
    # Rebalancing moves per minute, platform-wide (TP_REBALANCE_MOVES_PER_MINUTE; 0: none).
    rebalance_moves_per_minute: int = DEFAULT_REBALANCE_MOVES_PER_MINUTE


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Signing and lifetimes of the API's tokens."""

    jwt_secret: str = field(repr=False)
    access_token_ttl: int
    refresh_token_ttl: int


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The HTTP API process: where it listens, how long it drains, what it accepts and from whom."""

    host: str
    port: int
    # A listening socket handed over by supervisord's [fcgi-program] (fd number), if any.
    listen_fd: int | None
    drain_seconds: float
    max_body_bytes: int
    # TP_METRICS_TOKEN: when set, GET /metrics needs `Authorization: Bearer <it>`; else it is open
    # (development only: production needs the token or TP_METRICS_LISTEN).
    metrics_token: str | None = field(repr=False)
    # TP_DEBUG_ENDPOINTS: test-only routes (/api/_debug/*) that make a process hold memory or exit,
    # for the supervision tests; refused in production.
    debug_endpoints: bool = False
    # TP_TRUSTED_PROXIES: reverse proxies whose X-Forwarded-For names the client (api/proxies.py);
    # from any other peer the header is ignored.
    trusted_proxies: tuple[Network, ...] = ()
    # TP_METRICS_LISTEN: (host, port) where every member also serves GET /metrics, and the API port
    # then does not (api/app.py); None: /metrics is on the API port.
    metrics_listen: tuple[str, int] | None = None
    # TP_TLS_CERT and TP_TLS_KEY: the API serves HTTPS (and wss) itself (tls.py); None: plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """WebSocket /api/ws: ping interval (a peer silent for half of it is dropped), the events a client
    may have waiting before it counts as too slow and is disconnected, the topics one socket may
    subscribe to and the sockets one user may have open per API process."""

    heartbeat_seconds: float
    send_queue: int
    max_topics: int
    max_sockets_per_user: int


@dataclass(frozen=True, slots=True)
class EventSettings:
    """The Redis event stream that clients replay from: how many of the latest events it keeps."""

    log_length: int


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Outbound webhooks: first retry delay (doubling after each failure), attempts before `failed`,
    and the non-public networks deliveries may reach all the same (TP_WEBHOOK_ALLOW_NETWORKS, an
    internal receiver; without it only public addresses are, worker/webhook_addresses.py)."""

    retry_seconds: float
    max_attempts: int
    allow_networks: tuple[Network, ...] = ()
    # Deliveries in flight to one webhook at once, across every worker process and host.
    concurrency: int = 4
    # The circuit breaker: a webhook whose deliveries failed `breaker_failures` times in a row, over
    # at least `breaker_seconds`, is paused; `breaker_cooldown_seconds` later one probe is tried.
    breaker_failures: int = 10
    breaker_seconds: float = 300.0
    breaker_cooldown_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How long finished rows are kept before the worker's purge deletes them (seconds; 0: forever):
    webhook deliveries delivered or failed, incoming messages, messages sent, failed or cancelled,
    and refresh tokens whose whole family is spent or expired."""

    webhook_deliveries: float
    incoming: float
    messages: float
    refresh_tokens: float


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker's children: how long they drain, when they recycle, what they log, how many jobs
    of each queue they run at once."""

    drain_seconds: float
    # Worker child recycling (0: never): a child exits warm after this many jobs.
    max_jobs: int
    # One log line per successful job (false: failed and retried jobs only, plus a summary a minute).
    log_each_job: bool
    queue_concurrency: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class S3Settings:
    """An S3-compatible object store for the files' bytes (storage/s3.py); their metadata stays in
    PostgreSQL."""

    bucket: str
    region: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    # None: AWS's own endpoint for the region; else the store's URL (radosgw, MinIO, ...).
    endpoint: str | None = None
    # Bytes per part of a multipart upload, buffered in memory per upload in progress.
    part_size: int = 8 << 20
    # path: http://endpoint/bucket/key (what most self-hosted stores serve); virtual: bucket.endpoint.
    addressing_style: Literal["path", "virtual"] = "path"


@dataclass(frozen=True, slots=True)
class FileSettings:
    """The file store (storage/files.py): the largest upload POST /api/files takes, how long a file
    nobody uses is kept, where a worker keeps local copies of the files it sends, and where the
    bytes live (PostgreSQL large objects, or S3 when `s3` is set)."""

    max_upload_bytes: int
    # Days a file no message or download used is kept; 0 keeps files for ever.
    retention_days: float
    cache_dir: Path
    # How often the worker's purge runs (seconds).
    purge_interval: float = 3600.0
    store: Literal["postgres", "s3"] = "postgres"
    s3: S3Settings | None = None


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """Every process's log level and line format."""

    level: str
    format: LogFormat


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration, one sub-structure per part of the platform; what every process shares
    (profile, identity, directories, the encryption key, the emulator) stays at the top."""

    profile: Profile
    app_mode: AppMode
    encryption_key: bytes = field(repr=False)
    instance: str
    var_dir: Path
    # prometheus_client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR, the library's own name):
    # set for every process under supervisord, wiped once before it starts (metrics/definitions.py).
    metrics_dir: Path | None
    emulator_url: str
    database: DatabaseSettings
    redis: RedisSettings
    auth: AuthSettings
    api: ApiSettings
    ws: WebSocketSettings
    events: EventSettings
    webhooks: WebhookSettings
    worker: WorkerSettings
    logging: LoggingSettings
    tdlib: TdlibSettings
    supervision: SupervisionSettings
    retention: RetentionSettings
    host: HostSettings
    files: FileSettings

    @property
    def telegram_backend(self) -> Literal["tdlib", "emulator"]:
        return "tdlib" if self.tdlib.configured else "emulator"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, app_mode: AppMode = "cli") -> Settings:
        env = _Env(os.environ if environ is None else environ)
        for variable, problem in REMOVED_VARIABLES.items():
            if env.get(variable):
                raise ConfigError(variable, problem)
        profile = cast(Profile, env.choice("TP_PROFILE", ("development", "production"), "development"))
        mode = cast(AppMode, env.choice("APP_MODE", ("api", "worker", "cli"), app_mode))
        var_dir = _var_dir(env)
        # The queue concurrencies, the TDLib pair, then the four required variables are checked first,
        # as they always were: with several problems, the one reported is the same.
        concurrency = {
            name: env.integer(f"TP_QUEUE_CONCURRENCY_{name.upper()}",
                              QUEUE_CONCURRENCY_DEFAULTS.get(name, DEFAULT_QUEUE_CONCURRENCY), 1, 1000)
            for name in QUEUE_NAMES
        }
        tdlib = _tdlib(env, var_dir)
        database_url = env.url("DATABASE_URL", ("postgres", "postgresql"))
        redis = redis_settings(env)
        jwt_secret = env.secret_text("JWT_SECRET", MIN_JWT_SECRET_LENGTH)
        encryption_key = env.hex_key("ENCRYPTION_KEY", 32)
        listen_fd_raw = env.get("TP_LISTEN_FD")
        port = env.integer("PORT", 3000, 1, 65535)
        metrics_token = (env.secret_text("TP_METRICS_TOKEN", MIN_METRICS_TOKEN_LENGTH)
                         if env.get("TP_METRICS_TOKEN") else None)
        metrics_listen = env.address("TP_METRICS_LISTEN")
        _metrics_access(profile, port, metrics_token, metrics_listen)
        tls_cert, tls_key = _tls(env)
        api = ApiSettings(
            host=env.get("TP_HOST", DEFAULT_API_HOST[profile]),
            port=port,
            listen_fd=env.integer("TP_LISTEN_FD", 0, 0, 65535) if listen_fd_raw else None,
            drain_seconds=env.number("TP_API_DRAIN_SECONDS", 10.0, 0.0, 600),
            max_body_bytes=env.integer("TP_MAX_BODY_BYTES", 1 << 20, 1024, 1 << 30),
            metrics_token=metrics_token,
            debug_endpoints=_debug_endpoints(env, profile),
            trusted_proxies=env.networks("TP_TRUSTED_PROXIES"),
            metrics_listen=metrics_listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        auth = AuthSettings(
            jwt_secret=jwt_secret,
            access_token_ttl=env.integer("TP_ACCESS_TOKEN_TTL", 900, 10, 86_400),
            refresh_token_ttl=env.integer("TP_REFRESH_TOKEN_TTL", 30 * 86_400, 60, 365 * 86_400),
        )
        worker = WorkerSettings(
            drain_seconds=env.number("TP_WORKER_DRAIN_SECONDS", 25.0, 0.0, 3600),
            max_jobs=env.integer("TP_WORKER_MAX_JOBS", 0, 0, 2**31 - 1),
            log_each_job=env.boolean("TP_LOG_EACH_JOB", True),
            queue_concurrency=concurrency,
        )
        ws = WebSocketSettings(
            heartbeat_seconds=env.number("TP_WS_HEARTBEAT_SECONDS", 30.0, 1.0, 3600),
            send_queue=env.integer("TP_WS_SEND_QUEUE", 1000, 1, 1_000_000),
            max_topics=env.integer("TP_WS_MAX_TOPICS", 100, 1, 100_000),
            max_sockets_per_user=env.integer("TP_WS_MAX_SOCKETS_PER_USER", 20, 1, 100_000),
        )
        events = EventSettings(
            log_length=env.integer("TP_EVENT_LOG_LENGTH", DEFAULT_EVENT_LOG_LENGTH, 100, 100_000_000),
        )
        webhooks = WebhookSettings(
            retry_seconds=env.number("TP_WEBHOOK_RETRY_SECONDS", 10.0, 0.01, 3600),
            max_attempts=env.integer("TP_WEBHOOK_MAX_ATTEMPTS", 8, 1, 100),
            allow_networks=env.networks("TP_WEBHOOK_ALLOW_NETWORKS"),
            concurrency=env.integer("TP_WEBHOOK_CONCURRENCY", 4, 1, 1000),
            breaker_failures=env.integer("TP_WEBHOOK_BREAKER_FAILURES", 10, 1, 1_000_000),
            breaker_seconds=env.duration("TP_WEBHOOK_BREAKER_SECONDS", 300.0),
            breaker_cooldown_seconds=env.duration("TP_WEBHOOK_BREAKER_COOLDOWN", 300.0, low=1.0),
        )
        retention = RetentionSettings(
            webhook_deliveries=env.duration("TP_RETENTION_WEBHOOK_DELIVERIES", 30 * DAY_SECONDS),
            incoming=env.duration("TP_RETENTION_INCOMING", 90 * DAY_SECONDS),
            # Daily sending limits and pacing read a day of sent messages back.
            messages=env.duration("TP_RETENTION_MESSAGES", 90 * DAY_SECONDS, low=DAY_SECONDS, zero_allowed=True),
            refresh_tokens=env.duration("TP_RETENTION_REFRESH_TOKENS", 30 * DAY_SECONDS),
        )
        database = DatabaseSettings(
            url=database_url,
            pool_min=env.integer("TP_DB_POOL_MIN", 1, 0, 1000),
            pool_max=env.integer("TP_DB_POOL_MAX", 10, 1, 1000),
            auto_migrate=env.boolean("TP_AUTO_MIGRATE", profile == "development"),
        )
        file_store, s3 = _file_store(env)
        files = FileSettings(
            max_upload_bytes=env.size("TP_MAX_UPLOAD_BYTES", 50 << 20),
            retention_days=env.number("TP_FILE_RETENTION_DAYS", 30.0, 0.0, 36_500.0),
            cache_dir=Path(env.get("TP_FILE_CACHE_DIR", str(var_dir / "files"))).absolute(),
            purge_interval=env.number("TP_FILE_PURGE_INTERVAL", 3600.0, 1.0, 86_400.0),
            store=file_store,
            s3=s3,
        )
        logging = LoggingSettings(
            level=env.choice("TP_LOG_LEVEL", ("debug", "info", "warning", "error"), "info"),
            format=cast(LogFormat, env.choice("TP_LOG_FORMAT", ("auto", "json", "console"), "auto")),
        )
        return cls(
            profile=profile,
            app_mode=mode,
            encryption_key=encryption_key,
            instance=env.get("TP_INSTANCE", f"{os.uname().nodename}:{os.getpid()}"),
            var_dir=var_dir,
            metrics_dir=Path(env.get("PROMETHEUS_MULTIPROC_DIR")).absolute()
            if env.get("PROMETHEUS_MULTIPROC_DIR") else None,
            emulator_url=env.url("TP_EMULATOR_URL", ("http",), "http://127.0.0.1:3900"),
            database=database,
            redis=redis,
            auth=auth,
            api=api,
            ws=ws,
            events=events,
            webhooks=webhooks,
            worker=worker,
            logging=logging,
            tdlib=tdlib,
            supervision=_supervision(env),
            retention=retention,
            host=HostSettings(id=_host_id(env),
                              gone_after=env.number("TP_HOST_GONE_SECONDS", DEFAULT_HOST_GONE_SECONDS, 10.0, 86_400),
                              drain_on_stop=env.boolean("TP_DRAIN_ON_STOP", True),
                              rebalance_moves_per_minute=env.integer("TP_REBALANCE_MOVES_PER_MINUTE",
                                                                     DEFAULT_REBALANCE_MOVES_PER_MINUTE, 0, 6000)),
            files=files,
        )


def _file_store(env: _Env) -> tuple[Literal["postgres", "s3"], S3Settings | None]:
    """TP_FILE_STORE and, for `s3`, the TP_S3_* variables (an S3 variable without it is a mistake:
    the files would silently stay in PostgreSQL)."""
    store = env.choice("TP_FILE_STORE", ("postgres", "s3"), "postgres")
    if store != "s3":
        for name in S3_VARIABLES:
            if env.get(name):
                raise ConfigError(name, "is set but TP_FILE_STORE is not s3 (the files would stay in PostgreSQL)")
        return "postgres", None
    bucket = env.required("TP_S3_BUCKET")
    if not S3_BUCKET_PATTERN.fullmatch(bucket) or ".." in bucket:
        raise ConfigError("TP_S3_BUCKET", "must be an S3 bucket name: 3-63 lowercase letters, digits, '.' or '-', "
                                          "starting and ending with a letter or digit")
    region = env.get("TP_S3_REGION", "us-east-1")
    if not S3_REGION_PATTERN.fullmatch(region):
        raise ConfigError("TP_S3_REGION", f"must be a region name such as us-east-1 (got {region!r})")
    part_size = env.size("TP_S3_PART_SIZE", 8 << 20)
    if not S3_MIN_PART_SIZE <= part_size <= S3_MAX_PART_SIZE:
        raise ConfigError("TP_S3_PART_SIZE", f"must be between 5MB and 5GB, S3's limits for a part (got {part_size} "
                                             "bytes)")
    s3 = S3Settings(
        bucket=bucket,
        region=region,
        access_key_id=env.required("TP_S3_ACCESS_KEY_ID"),
        secret_access_key=env.required("TP_S3_SECRET_ACCESS_KEY"),
        endpoint=env.url("TP_S3_ENDPOINT", ("https", "http")) if env.get("TP_S3_ENDPOINT") else None,
        part_size=part_size,
        addressing_style=cast(Literal["path", "virtual"],
                              env.choice("TP_S3_ADDRESSING_STYLE", ("path", "virtual"), "path")),
    )
    return "s3", s3


def redis_settings(env: _Env) -> RedisSettings:
    """REDIS_URL alone, or REDIS_SENTINELS + REDIS_SENTINEL_SERVICE (REDIS_URL then optional: its
    credentials, database and TLS apply to the master Sentinel names)."""
    raw = env.get("REDIS_SENTINELS")
    service = env.get("REDIS_SENTINEL_SERVICE") or None
    password = env.get("REDIS_SENTINEL_PASSWORD") or None
    if not raw:
        for name, value in (("REDIS_SENTINEL_SERVICE", service), ("REDIS_SENTINEL_PASSWORD", password)):
            if value:
                raise ConfigError(name, "is set without REDIS_SENTINELS")
        return RedisSettings(url=env.url("REDIS_URL", ("redis", "rediss", "unix")))
    sentinels = []
    for item in raw.split(","):
        host, port = _host_port(item.strip())
        if host is None:
            raise ConfigError("REDIS_SENTINELS",
                              f"must list host:port pairs separated by commas (got {item.strip()!r})")
        sentinels.append((host, port))
    if service is None:
        raise ConfigError("REDIS_SENTINEL_SERVICE", "is not set: name the master the sentinels monitor "
                                                    "(their `sentinel monitor <name> ...`)")
    if not _SENTINEL_SERVICE.fullmatch(service):
        raise ConfigError("REDIS_SENTINEL_SERVICE", "must be 1-64 letters, digits, '.', '_' or '-'")
    url = env.url("REDIS_URL", ("redis", "rediss"), "redis://")
    return RedisSettings(url=url, sentinels=tuple(sentinels), sentinel_service=service, sentinel_password=password)


def _host_port(item: str) -> tuple[str | None, int]:
    """`host:port` or `[v6]:port` -> (host, port); (None, 0) when malformed."""
    match = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})", item)
    if not match or not 1 <= int(match.group(3)) <= 65535:
        return None, 0
    return match.group(1) or match.group(2), int(match.group(3))


def default_host_id() -> str:
    """The hostname's first label, lowercased: `db1.example.com` is host `db1`."""
    return os.uname().nodename.split(".", 1)[0].lower()


def _host_id(env: _Env) -> str:
    explicit = env.get("TP_HOST_ID")
    value = explicit or default_host_id()
    if not HOST_ID_PATTERN.fullmatch(value):
        where = "" if explicit else " (the default, from the hostname: set TP_HOST_ID)"
        raise ConfigError("TP_HOST_ID", f"must be 1-{MAX_HOST_ID_LENGTH} lowercase letters, digits and '-', "
                                        f"starting with a letter or digit{where}")
    return value


def _tdlib(env: _Env, var_dir: Path) -> TdlibSettings:
    api_id_raw = env.get("TDLIB_API_ID")
    api_hash = env.get("TDLIB_API_HASH") or None
    if bool(api_id_raw) != bool(api_hash):
        missing = "TDLIB_API_HASH" if api_id_raw else "TDLIB_API_ID"
        raise ConfigError(missing, "must be set together with the other (TDLIB_API_ID and TDLIB_API_HASH)")
    if api_hash is not None and not re.fullmatch(r"[0-9a-f]{32}", api_hash):
        raise ConfigError("TDLIB_API_HASH", "must be 32 lowercase hex digits")
    log_file = env.get("TDLIB_LOG_FILE")
    return TdlibSettings(
        api_id=env.integer("TDLIB_API_ID", 0, 1, 2**31 - 1) if api_id_raw else None,
        api_hash=api_hash,
        data_dir=Path(env.get("TDLIB_DATA_DIR", str(var_dir / "tdlib"))).absolute(),
        use_test_dc=env.boolean("TDLIB_USE_TEST_DC", False),
        log_verbosity=env.integer("TDLIB_LOG_VERBOSITY", 1, 0, 1024),
        log_file=Path(log_file).absolute() if log_file else None,
        request_timeout=env.number("TDLIB_REQUEST_TIMEOUT", 30.0, 0.1, 3600),
        max_clients=env.integer("TDLIB_MAX_CLIENTS", 10_000, 1, 1_000_000),
        snapshot_seconds=_snapshot_seconds(env),
    )


def _snapshot_seconds(env: _Env) -> float:
    """TDLIB_SNAPSHOT_SECONDS: 0 (off), or 10 s to a day; more often would rewrite every account's
    state in PostgreSQL for little it saves (docs/scaling.md)."""
    value = env.number("TDLIB_SNAPSHOT_SECONDS", 300.0, 0.0, 86_400)
    if 0 < value < 10:
        raise ConfigError("TDLIB_SNAPSHOT_SECONDS", f"must be 0 (off) or at least 10 (got {value:g})")
    return value


def _var_dir(env: _Env) -> Path:
    return Path(env.get("TP_VAR_DIR", "var")).absolute()


def _supervision(env: _Env) -> SupervisionSettings:
    var_dir = _var_dir(env)
    explicit = env.get("TP_SUPERVISOR_SOCKET")
    socket = (Path(explicit) if explicit else socket_from_url(env.get("SUPERVISOR_SERVER_URL"))
              or var_dir / "run" / "supervisor.sock")
    return SupervisionSettings(
        supervisor_socket=socket.absolute(),
        var_dir=var_dir,
        api_group=env.get("TP_API_GROUP", API_GROUP),
        worker_program=env.get("TP_WORKER_PROGRAM", WORKER_PROGRAM),
        managed=tuple(p.strip() for p in env.get("TP_MANAGED_PROGRAMS", f"{API_GROUP},{WORKER_PROGRAM}")
                      .split(",") if p.strip()),
        api_memory_limit=env.size("TP_API_MEMORY_LIMIT", 1 << 30),
        worker_memory_limit=env.size("TP_WORKER_MEMORY_LIMIT", 2 << 30),
        watchdog_interval=env.number("TP_WATCHDOG_INTERVAL", 2.0, 0.2, 5.0),
        backoff_initial=env.number("TP_RESTART_DELAY", 0.1, 0.0, 60.0),
        backoff_max=env.number("TP_RESTART_DELAY_MAX", 15.0, 0.0, 3600.0),
        backoff_reset_after=env.number("TP_RESTART_RESET_AFTER", 30.0, 1.0, 86_400.0),
        ready_timeout=env.number("TP_READY_TIMEOUT", 60.0, 1.0, 3600.0),
    )


def api_processes(environ: Mapping[str, str] | None = None) -> int:
    """TP_API_PROCESSES as a count: unset or `max` is one per CPU this process may run on. Every path
    that starts supervisord (scripts/run, `tp supervise` in the unit) and `tp check` ask this one."""
    env = _Env(os.environ if environ is None else environ)
    if env.get("TP_API_PROCESSES", API_PROCESSES_MAX).lower() == API_PROCESSES_MAX:
        return min(MAX_API_PROCESSES, len(os.sched_getaffinity(0)) or 1)
    try:
        return env.integer("TP_API_PROCESSES", 1, 1, MAX_API_PROCESSES)
    except ConfigError as exc:
        raise ConfigError("TP_API_PROCESSES", f"{exc.problem}, or {API_PROCESSES_MAX} (one per CPU)") from None


def api_host(environ: Mapping[str, str] | None = None) -> str:
    """TP_HOST, or the profile's default (DEFAULT_API_HOST). supervisord.conf opens the API group's
    socket on it, so every path that starts supervisord exports this one answer."""
    env = _Env(os.environ if environ is None else environ)
    profile = env.choice("TP_PROFILE", ("development", "production"), "development")
    return env.get("TP_HOST", DEFAULT_API_HOST[profile])


def socket_from_url(url: str) -> Path | None:
    """supervisord hands its children SUPERVISOR_SERVER_URL=unix:///path/supervisor.sock."""
    return Path(url.removeprefix("unix://")) if url.startswith("unix://") else None


def parse_size(text: str) -> int:
    """'1GB', '512MB', '1.5g', '1073741824' -> bytes (binary units, as memmon and PM2 use)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1GB, 512MB, 1073741824)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _metrics_access(profile: Profile, port: int, token: str | None, listen: tuple[str, int] | None) -> None:
    """GET /metrics reads PostgreSQL, Redis and supervisord and names queues and processes: production
    does not leave it open on the API port. TP_METRICS_LISTEN must not be the API's own port (the
    members would then share it with supervisord's socket, which they cannot)."""
    if listen is not None and listen[1] == port:
        raise ConfigError("TP_METRICS_LISTEN", f"must use another port than PORT ({port})")
    if profile == "production" and token is None and listen is None:
        raise ConfigError("TP_METRICS_TOKEN", "is not set: production needs it (or TP_METRICS_LISTEN, a separate "
                          "address for GET /metrics) so that /metrics is not open on the API port")


def _tls(env: _Env) -> tuple[Path | None, Path | None]:
    """Both or neither; both must be served as they are (a context is built from them now)."""
    cert_raw, key_raw = env.get("TP_TLS_CERT"), env.get("TP_TLS_KEY")
    if not cert_raw and not key_raw:
        return None, None
    if not cert_raw or not key_raw:
        missing = "TP_TLS_KEY" if cert_raw else "TP_TLS_CERT"
        raise ConfigError(missing, "must be set together with the other (TP_TLS_CERT and TP_TLS_KEY)")
    cert, key = Path(cert_raw).absolute(), Path(key_raw).absolute()
    try:
        server_context(cert, key)
    except TlsFileError as exc:
        raise ConfigError("TP_TLS_CERT" if exc.which == "cert" else "TP_TLS_KEY", str(exc)) from None
    return cert, key


def _debug_endpoints(env: _Env, profile: Profile) -> bool:
    enabled = env.boolean("TP_DEBUG_ENDPOINTS", False)
    if enabled and profile == "production":
        raise ConfigError("TP_DEBUG_ENDPOINTS", "must be off in production (test-only endpoints)")
    return enabled


class _Env:
    """Typed accessors over an environment mapping; each failure names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str, default: str = "") -> str:
        return self._environ.get(name, "").strip() or default

    def required(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise ConfigError(name, "is not set")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(name, default).lower()
        for option in allowed:
            if value == option:
                return option
        raise ConfigError(name, f"must be one of {', '.join(allowed)} (got {value!r})")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"must be an integer (got {raw!r})") from None
        if not low <= value <= high:
            raise ConfigError(name, f"must be between {low} and {high} (got {value})")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, f"must be a number (got {raw!r})") from None
        if not low <= value <= high:
            raise ConfigError(name, f"must be between {low} and {high} (got {value})")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.get(name).lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"must be true or false (got {raw!r})")

    def size(self, name: str, default: int) -> int:
        """A memory size ('1GB', '512MB', bytes), at least 1MB."""
        raw = self.get(name)
        if not raw:
            return default
        try:
            value = parse_size(raw)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
        if value < 1 << 20:
            raise ConfigError(name, f"must be at least 1MB (got {value} bytes)")
        return value

    def duration(self, name: str, default: float, *, low: float = 0.0, zero_allowed: bool = False) -> float:
        """A duration in seconds: a number, or with a unit (`90d`, `12h`, `30m`, `45s`); at least
        `low`, or 0 when `zero_allowed` (where 0 means "never")."""
        raw = self.get(name)
        if not raw:
            return default
        match = _DURATION.match(raw)
        if not match:
            raise ConfigError(name, f"must be a duration such as 90d, 12h, 30m or 45s (got {raw!r})")
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        if value > 100 * 365 * DAY_SECONDS:
            raise ConfigError(name, f"must be at most 100 years (got {raw!r})")
        if value < low and not (zero_allowed and value == 0):
            raise ConfigError(name, f"must be at least {low:g} seconds{' or 0' if zero_allowed else ''} (got {raw!r})")
        return value

    def networks(self, name: str) -> tuple[Network, ...]:
        """Addresses and CIDRs, separated by commas or spaces (an address is its own /32 or /128)."""
        networks = []
        for item in self.get(name).replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(name, f"must list IP addresses or CIDRs (got {item!r})") from None
        return tuple(networks)

    def address(self, name: str) -> tuple[str, int] | None:
        """host:port ([v6]:port for IPv6), or None when unset."""
        raw = self.get(name)
        if not raw:
            return None
        try:
            parts = urlsplit(f"//{raw}")
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        if not host or port is None or port < 1 or parts.path or parts.username is not None:
            raise ConfigError(name, f"must be host:port (e.g. 127.0.0.1:9464 or [::1]:9464; got {raw!r})")
        return host, port

    def url(self, name: str, schemes: tuple[str, ...], default: str = "") -> str:
        value = self.get(name, default)
        if not value:
            raise ConfigError(name, f"is not set (expected a {schemes[0]}:// URL)")
        try:
            scheme = urlsplit(value).scheme
        except ValueError:
            scheme = ""
        if scheme not in schemes:
            # The URL may carry a password: name the scheme problem, never the value.
            raise ConfigError(name, f"must be a URL with scheme {' or '.join(schemes)}")
        return value

    def secret_text(self, name: str, min_length: int) -> str:
        value = self.required(name)
        if len(value) < min_length:
            raise ConfigError(name, f"must be at least {min_length} characters (got {len(value)})")
        return value

    def hex_key(self, name: str, size: int) -> bytes:
        value = self.required(name)
        if len(value) != size * 2 or not re.fullmatch(r"[0-9a-fA-F]+", value):
            raise ConfigError(
                name,
                f"must be {size * 2} hex digits (got {len(value)} characters); "
                f"generate one with: openssl rand -hex {size}",
            )
        return bytes.fromhex(value)
