"""The multi-host test rig: N platform hosts on this machine, each in a Linux network namespace of its
own, so that killing one or cutting it off the network is as real as it is between servers.

What it makes (every name carries the rig's random id, so two rigs never meet and a leftover is
recognisable): a bridge `tpr<id>br` in the root namespace with the first address of a private /24 it
picked unused (10.213.x.0/24); per host a namespace `tpr<id>-<host>` whose `eth0` is one end of a veth
pair, the other end (`tpr<id>h<n>`) on the bridge; a throwaway PostgreSQL, Redis and Telegram
emulator in the root namespace listening on the bridge address; and per host the repository's
supervisord.conf (API group, worker, listener) run by its own supervisord inside the namespace
(`ip netns exec`), with its own var/ and TP_HOST_ID set to the host's name.

Everything it made goes at `close()` (the context manager's exit), also after a failure half-way
through a start: processes (by namespace: `ip netns pids`), namespaces, links, servers and the
temporary directory. Children it starts get a parent-death signal, so even a rig whose owner is
SIGKILLed leaves no process serving; `scripts/hosts down` removes the names of the rig it started, and
`scripts/hosts prune` those any killed owner left.

Processes are started from the calling thread, and the parent-death signal follows that thread: use
a rig from one thread (a test's, the script's main thread), never through `asyncio.to_thread`.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from telegram_platform import redis_keys
from telegram_platform.devstack.errors import DevStackError
from telegram_platform.devstack.servers import (
    ThrowawayPostgres,
    ThrowawayRedis,
    free_port,
    postgres_argv,
    postgres_url,
    redis_argv,
    redis_ping,
    redis_url,
)
from telegram_platform.devstack.users import pdeathsig
from telegram_platform.ops.supervisor import SupervisorClient

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
NAME_PREFIX = "tpr"  # every namespace and link the rig makes starts with it
RIG_ID_LENGTH = 4  # hex digits after it: `tpr<id>br`, `tpr<id>h<n>`, `tpr<id>-<host>`
ADDRESS_POOL = ipaddress.IPv4Network("10.213.0.0/16")  # the rig's /24 is picked inside it
API_PORT = 8000  # the same in every host: each namespace has its own ports
FIRST_HOST_OCTET = 11  # host n is .(10 + n); .1 is the bridge


class RigError(Exception):
    """The rig could not be made or used; the message says which step failed."""


def unavailable() -> str | None:
    """Why the rig cannot run on this machine (a skip reason), or None when it can."""
    if sys.platform != "linux":
        return "the multi-host rig needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the multi-host rig needs root (ip netns, veth pairs, a bridge)"
    if shutil.which("ip") is None:
        return "the multi-host rig needs iproute2's `ip`"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    if shutil.which("supervisord", path=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        return "supervisord is not installed next to this Python"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One `ip` command; a failure raises RigError with its message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise RigError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address or a route in (all tables)."""
    used: list[ipaddress.IPv4Network] = []
    for entry in json.loads(ip("-4", "-j", "addr", "show").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(ip("-4", "-j", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return used


def pick_subnet(used: Sequence[ipaddress.IPv4Network], rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A /24 of ADDRESS_POOL that overlaps none of `used`, from a random start (rigs run side by side)."""
    candidates = list(ADDRESS_POOL.subnets(new_prefix=24))
    start = (rng or random.Random()).randrange(len(candidates))
    for subnet in candidates[start:] + candidates[:start]:
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RigError(f"every /24 of {ADDRESS_POOL} is in use on this machine")


def rig_names_present(rig_id: str) -> list[str]:
    """The namespaces and links of rig `rig_id` that exist now (empty once it is cleaned up)."""
    prefix = f"{NAME_PREFIX}{rig_id}"
    namespaces = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
    links = [entry["ifname"] for entry in json.loads(ip("-j", "link", "show").stdout or "[]")]
    return [name for name in [*namespaces, *links] if name.startswith(prefix)]


def stale_rigs() -> list[str]:
    """The ids of rigs whose names are left and whose namespaces hold no process: what a rig whose
    owner was SIGKILLed (no `close()`, no state file) leaves behind. A rig starting at this very
    moment looks the same, so prune only while no rig is in use."""
    namespaces = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
    links = [entry["ifname"] for entry in json.loads(ip("-j", "link", "show").stdout or "[]")]
    ids = {name[len(NAME_PREFIX):len(NAME_PREFIX) + RIG_ID_LENGTH] for name in [*namespaces, *links]
           if name.startswith(NAME_PREFIX) and len(name) > len(NAME_PREFIX) + RIG_ID_LENGTH}
    busy = {rig_id for rig_id in ids for ns in namespaces
            if ns.startswith(f"{NAME_PREFIX}{rig_id}-") and netns_pids(ns)}
    return sorted(ids - busy)


def remove_rig_names(rig_id: str) -> list[str]:
    """Delete what is left of rig `rig_id` by name (its namespaces' processes killed first); returns
    what is still there after."""
    for name in rig_names_present(rig_id):
        if name in ip("netns", "list").stdout.split():
            kill_namespace(name)
            ip("netns", "del", name, check=False)
        else:
            ip("link", "del", name, check=False)
    return rig_names_present(rig_id)


def netns_pids(netns: str) -> list[int]:
    """The processes running in a namespace (every one the host started, however deep)."""
    result = ip("netns", "pids", netns, check=False)
    return [int(line) for line in result.stdout.split() if line.strip().isdigit()]


def kill_namespace(netns: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in the namespace until none is left (a forking child cannot escape);
    the pids killed. Whatever survives `timeout` is the caller's to report."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while (pids := netns_pids(netns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    return killed


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `check` until it returns a truthy value (returned); RigError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise RigError(f"{what}: not within {timeout}s (last: {last!r})")


def http_call(url: str, method: str = "GET", body: Any = None, token: str | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """One JSON request (status, decoded body); OSError when the address does not answer."""
    parts = url.split("/", 3)
    host, _, port = parts[2].partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
    headers = {"Connection": "close", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, "/" + (parts[3] if len(parts) > 3 else ""),
                     body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"{method} {url}: {exc!r}") from exc
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw.decode(errors="replace")


# -- the shared servers, listening on the bridge ------------------------------------------------------


class _BridgePostgres(ThrowawayPostgres):
    """The throwaway PostgreSQL, listening on the bridge and trusting the rig's subnet."""

    def __init__(self, base_dir: Path, address: str, subnet: ipaddress.IPv4Network) -> None:
        super().__init__(base_dir)
        self.address = address
        self.subnet = subnet

    def _prepare(self) -> None:
        super()._prepare()
        hba = self.data_dir / "pg_hba.conf"
        line = f"host all all {self.subnet} trust\n"
        if line not in hba.read_text():
            with hba.open("a") as f:
                f.write(line)

    def _argv(self) -> list[str]:
        return postgres_argv(self.data_dir, self.port, self.socket_dir, throwaway=True, host=self.address,
                             binaries=self._binaries)

    def url_for(self, database: str) -> str:
        return postgres_url(self.port, database, host=self.address)


class _BridgeRedis(ThrowawayRedis):
    """A throwaway Redis listening on the bridge, with a password (in its 0600 config file); with
    `replica_of`, a replica of that master. Every one also knows the master's password (`masterauth`),
    since Sentinel may make any of them a replica of another."""

    def __init__(self, base_dir: Path, address: str, password: str,
                 replica_of: tuple[str, int] | None = None) -> None:
        super().__init__(base_dir, password=password)
        self.address = address
        self.replica_of = replica_of

    def _prepare(self) -> None:
        super()._prepare()
        with self._config_file.open("a") as config:
            config.write(f"masterauth {self.password}\n")

    def _argv(self) -> list[str]:
        argv = redis_argv(self.data_dir, self.port, throwaway=True, host=self.address, binary=self._binary,
                          config_file=self._config_file)
        # Protected mode refuses every address but loopback without a password; this Redis has one and
        # listens only on the rig's own bridge, which only the rig's namespaces reach.
        argv[argv.index("--protected-mode") + 1] = "no"
        if self.replica_of is not None:
            argv += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        return argv

    def _ready(self) -> bool:
        return redis_ping(self.port, host=self.address, password=self.password)

    @property
    def url(self) -> str:
        return redis_url(self.port, host=self.address, password=self.password)

    def kill(self) -> None:
        """kill -9, as a machine's death would end it (reaped; nothing of it left)."""
        self._kill()


@dataclass(frozen=True)
class SentinelTiming:
    """How quickly the rig's sentinels fail over (see Rig's docstring for why these values)."""

    down_after_ms: int = 2000
    failover_timeout_ms: int = 6000


class _BridgeSentinel(ThrowawayRedis):
    """One `redis-server --sentinel` on the bridge, monitoring the rig's master as `service`, with a
    password of its own (`requirepass`, which it also gives the other sentinels) and the master's."""

    name = "sentinel"

    def __init__(self, base_dir: Path, address: str, *, service: str, master: tuple[str, int], quorum: int,
                 password: str, master_password: str, timing: SentinelTiming) -> None:
        super().__init__(base_dir)
        self.address = address
        self.service = service
        self.master = master
        self.quorum = quorum
        self.sentinel_password = password
        self.master_password = master_password
        self.timing = timing

    def _argv(self) -> list[str]:
        # Sentinel rewrites its configuration file (what it learns of replicas, sentinels, failovers):
        # one per sentinel, written afresh for the port this attempt listens on.
        config = self.base_dir / "sentinel.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(
                f"port {self.port}\nbind {self.address}\nprotected-mode no\ndir {self.data_dir}\nlogfile \"\"\n"
                f"requirepass {self.sentinel_password}\nsentinel sentinel-pass {self.sentinel_password}\n"
                f"sentinel monitor {self.service} {self.master[0]} {self.master[1]} {self.quorum}\n"
                f"sentinel auth-pass {self.service} {self.master_password}\n"
                f"sentinel down-after-milliseconds {self.service} {self.timing.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.timing.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n")
        assert self._binary is not None
        return [str(self._binary), str(config), "--sentinel"]

    def _ready(self) -> bool:
        return redis_ping(self.port, host=self.address, password=self.sentinel_password)

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host=self.address, port=self.port, password=self.sentinel_password,
                           socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True)

    def view(self) -> dict[str, str]:
        """`SENTINEL MASTER <service>`: what this sentinel knows (replicas, other sentinels, flags)."""
        client = self.client()
        try:
            reply = client.execute_command("SENTINEL", "MASTER", self.service)
        except redis.RedisError:
            return {}
        finally:
            client.close()
        return dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else dict(reply)


# -- hosts ---------------------------------------------------------------------------------------


@dataclass
class RigHost:
    """One host: its namespace, its end of the network, and the deployment supervisord runs there."""

    name: str  # also its TP_HOST_ID
    index: int
    netns: str
    veth: str  # the root namespace's end, on the bridge: what a cut takes down
    address: str
    root: Path
    env: dict[str, str] = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{API_PORT}"

    @property
    def socket(self) -> Path:
        return self.root / "var/run/supervisor.sock"

    def client(self) -> SupervisorClient:
        return SupervisorClient(self.socket)

    def pids(self) -> list[int]:
        return netns_pids(self.netns)

    def log(self, name: str, err: bool = True) -> str:
        path = self.root / "var/log" / f"{name}.{'err' if err else 'out'}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Rig:
    """N hosts in network namespaces on one bridge, with shared PostgreSQL, Redis and emulator.

    `with Rig(3) as rig:` starts everything (hosts in parallel) and waits until every host's API
    answers /api/health over the bridge and its supervisord runs every program; the exit removes all
    of it, whatever happened inside.

    Redis always requires a password (as production's `tp check` demands). With `sentinels=N` it is
    Sentinel-managed, as issue 28 deploys it: a master, `replicas` replicas (2 by default: after one
    failover there is still a replica to promote) and N `redis-server --sentinel` processes (quorum a
    majority), all in the root namespace on the bridge address, the sentinels with a password of their
    own; the hosts are then given REDIS_SENTINELS / REDIS_SENTINEL_SERVICE / REDIS_SENTINEL_PASSWORD,
    and REDIS_URL only for the master's password. `kill_redis_master()` SIGKILLs whichever server
    the sentinels name master now, `wait_failover()` waits for them to name another one.
    The sentinels judge a master down after 2 s of silence and give a failover 6 s
    (`SentinelTiming`), where Sentinel's defaults are 30 s and 3 min: a test waits for the failover,
    and a rig must stay quick, while 2 s is still well above what a loaded test machine's Redis takes
    to answer a PING (a shorter window fails over a master that is only slow).
    """

    SENTINEL_SERVICE = "tp-rig"  # the master's name in the sentinels' `sentinel monitor`

    def __init__(self, hosts: int = 3, *, api_processes: int = 1, base_dir: Path | None = None,
                 env: dict[str, str] | None = None, admin: tuple[str, str] | None = None,
                 start_timeout: float = 90.0, sentinels: int = 0, replicas: int = 2,
                 sentinel_timing: SentinelTiming | None = None) -> None:
        if not 1 <= hosts <= 200:
            raise RigError(f"hosts must be 1..200, not {hosts}")
        if not 0 <= sentinels <= 9 or (sentinels and not 1 <= replicas <= 5):
            raise RigError(f"sentinels must be 0..9 (with 1..5 replicas), not {sentinels} ({replicas})")
        self.sentinel_count = sentinels
        self.replica_count = replicas if sentinels else 0
        self.sentinel_timing = sentinel_timing or SentinelTiming()
        self.redis_password = secrets.token_urlsafe(18)
        self.sentinel_password = secrets.token_urlsafe(18)
        self.rig_id = secrets.token_hex(RIG_ID_LENGTH // 2)
        self.prefix = f"{NAME_PREFIX}{self.rig_id}"
        self.host_count = hosts
        self.api_processes = api_processes
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.admin = admin  # (username, password) of an admin user made at the start
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-")) if base_dir is None else base_dir
        self.bridge = f"{self.prefix}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self.hosts: dict[str, RigHost] = {}
        self.env: dict[str, str] = {}
        self.emulator_url = ""
        self._postgres: _BridgePostgres | None = None
        self._redis: _BridgeRedis | None = None  # the first master; with sentinels, maybe no longer
        self._replicas: list[_BridgeRedis] = []
        self._sentinels: list[_BridgeSentinel] = []
        self._emulator: subprocess.Popen[bytes] | None = None
        self._closed = False
        # Only what this rig made is ever deleted: a name taken by another rig is not ours to remove.
        self._made: set[str] = set()

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException as exc:
            try:
                self.close()
            except RigError as cleanup:  # the start's failure stays the error; the cleanup's is noted
                exc.add_note(str(cleanup))
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> Self:
        reason = unavailable()
        if reason:
            raise RigError(reason)
        self._make_bridge()
        self._start_servers()
        if self.admin:  # `tp create-user` migrates first: one program start instead of two
            self.create_user(*self.admin)
        else:
            self._migrate()
        for index in range(1, self.host_count + 1):
            self._make_host(index)
        for host in self.hosts.values():  # all at once: they start in parallel
            self.start_host(host.name, wait=False)
        self.wait_serving(list(self.hosts), self.start_timeout)
        return self

    def close(self) -> None:
        """Remove everything the rig made; safe to call twice and after a failed start."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []

        def attempt(what: str, action: Any, *args: Any) -> None:
            try:
                action(*args)
            except Exception as exc:  # one failed step must not leave the rest behind
                errors.append(f"{what}: {exc}")

        stopping = [h for h in self.hosts.values() if self._ask_to_stop(h)]  # all at once, then wait
        for host in stopping:
            attempt(f"stop {host.name}", self._wait_stopped, host)
        for host in (h for h in self.hosts.values() if h.netns in self._made):
            attempt(f"kill {host.name}", self._kill_all, host)
            attempt(f"delete {host.netns}", self._delete_netns, host)
        if self.bridge in self._made:
            attempt("delete bridge", ip, "link", "del", self.bridge)
        if self._emulator is not None:
            attempt("stop emulator", _stop_process, self._emulator)
        for sentinel in self._sentinels:
            attempt(f"stop sentinel {sentinel.port}", sentinel.stop)
        for replica in self._replicas:
            attempt(f"stop redis replica {replica.port}", replica.stop)
        if self._redis is not None:
            attempt("stop redis", self._redis.stop)
        if self._postgres is not None:
            attempt("stop postgres", self._postgres.stop)
        if self._own_dir:
            attempt("remove directory", shutil.rmtree, self.base_dir)
        with contextlib.suppress(RigError):
            left = [name for name in rig_names_present(self.rig_id) if name in self._made]
            if left:
                errors.append(f"left behind: {left}")
        if errors:
            raise RigError("rig cleanup: " + "; ".join(errors))

    # -- setting up -------------------------------------------------------------------------------

    def _link_exists(self, name: str) -> bool:
        return ip("link", "show", name, check=False).returncode == 0

    def _make_bridge(self) -> None:
        self.subnet = pick_subnet(networks_in_use())
        self.gateway = str(self.subnet.network_address + 1)
        ip("link", "add", self.bridge, "type", "bridge")
        self._made.add(self.bridge)
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def _start_servers(self) -> None:
        assert self.subnet is not None
        self._postgres = _BridgePostgres(self.base_dir / "postgres", self.gateway, self.subnet)
        self._postgres.start()
        self._redis = _BridgeRedis(self.base_dir / "redis", self.gateway, self.redis_password)
        self._redis.start()
        redis_env = {"REDIS_URL": self._redis.url}
        if self.sentinel_count:
            redis_env = self._start_sentinels()
        port = free_port(self.gateway)
        self.emulator_url = f"http://{self.gateway}:{port}"
        with open(self.base_dir / "emulator.log", "wb") as log:
            self._emulator = subprocess.Popen(
                [str(BIN_DIR / "tp-emulator"), "--host", self.gateway, "--port", str(port), "--latency-ms", "1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": os.environ.get("PATH", ""), "TP_LOG_FORMAT": "json"},
                preexec_fn=pdeathsig(signal.SIGTERM))
        self._wait(lambda: self._answers(f"{self.emulator_url}/health"), 30, "the emulator to answer")
        self.env = {
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "LANG": "C.UTF-8",
            "HOME": str(self.base_dir),
            "DATABASE_URL": self._postgres.url_for("postgres"),
            **redis_env,
            "JWT_SECRET": secrets.token_hex(32),
            "ENCRYPTION_KEY": secrets.token_hex(32),
            "TP_EMULATOR_URL": self.emulator_url,
            "TP_LOG_FORMAT": "json",
            "TP_LOG_LEVEL": "info",
            "TP_WORKER_DRAIN_SECONDS": "5",
            "TP_API_DRAIN_SECONDS": "2",
            **self.extra_env,
        }

    def _start_sentinels(self) -> dict[str, str]:
        """The replicas and sentinels; the programs' Redis settings naming the sentinels."""
        assert self._redis is not None
        master = (self.gateway, self._redis.port)
        for n in range(1, self.replica_count + 1):
            replica = _BridgeRedis(self.base_dir / f"redis-replica{n}", self.gateway, self.redis_password,
                                   replica_of=master)
            self._replicas.append(replica)
            replica.start()
        for n in range(1, self.sentinel_count + 1):
            sentinel = _BridgeSentinel(self.base_dir / f"sentinel{n}", self.gateway, service=self.SENTINEL_SERVICE,
                                       master=master, quorum=self.sentinel_count // 2 + 1,
                                       password=self.sentinel_password, master_password=self.redis_password,
                                       timing=self.sentinel_timing)
            self._sentinels.append(sentinel)
            sentinel.start()

        def everyone_known() -> bool:  # a failover needs the replicas found and a quorum of sentinels
            for sentinel in self._sentinels:
                view = sentinel.view()
                if (int(view.get("num-slaves", 0)) < self.replica_count
                        or int(view.get("num-other-sentinels", 0)) < self.sentinel_count - 1):
                    return False
            return all(r.port and _replication(r, "master_link_status") == "up" for r in self._replicas)

        self._wait(everyone_known, 60, "the sentinels to know the master, its replicas and each other")
        return {
            "REDIS_SENTINELS": ",".join(f"{self.gateway}:{s.port}" for s in self._sentinels),
            "REDIS_SENTINEL_SERVICE": self.SENTINEL_SERVICE,
            "REDIS_SENTINEL_PASSWORD": self.sentinel_password,
            # Only the master's password (and database) count: its address is the sentinels' to give.
            "REDIS_URL": self._redis.url,
        }

    # -- Redis and its sentinels -------------------------------------------------------------------

    @property
    def redis_servers(self) -> list[_BridgeRedis]:
        """Every redis-server of the rig that is running (the master and its replicas)."""
        return [s for s in (self._redis, *self._replicas) if s is not None and s.running]

    def redis_master(self) -> tuple[str, int]:
        """Where the master is now: as most sentinels name it (the one Redis, without sentinels)."""
        assert self._redis is not None
        if not self._sentinels:
            return (self.gateway, self._redis.port)
        return sentinels_master([(self.gateway, s.port) for s in self._sentinels], self.sentinel_password,
                                self.SENTINEL_SERVICE)

    def redis_client(self, timeout: float = 5.0) -> redis.Redis:
        """A client of the master as it is now (decode_responses)."""
        address, port = self.redis_master()
        return redis.Redis(host=address, port=port, password=self.redis_password, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True)

    def kill_redis_master(self) -> tuple[str, int]:
        """kill -9 the server the sentinels name master now; its address."""
        if not self._sentinels:
            raise RigError("kill_redis_master needs a rig with sentinels")
        master = self.redis_master()
        server = next((s for s in self.redis_servers if s.port == master[1]), None)
        if server is None:
            raise RigError(f"the master {master} is none of the rig's running servers")
        server.kill()
        return master

    def wait_failover(self, old: tuple[str, int], timeout: float = 60.0) -> float:
        """Wait until most sentinels name a master other than `old` and that server acts as one (it
        takes writes); the seconds waited."""
        started = time.monotonic()

        def promoted() -> bool:
            try:
                master = self.redis_master()
            except RigError:
                return False
            server = next((s for s in self.redis_servers if s.port == master[1]), None)
            return master != old and server is not None and _replication(server, "role") == "master"

        self._wait(promoted, timeout, f"the sentinels to promote a replica of {old[0]}:{old[1]}")
        return time.monotonic() - started

    def _migrate(self) -> None:
        """Once, from the root namespace, before any host starts (no host races another to it)."""
        result = self.tp("migrate", env={"TP_VAR_DIR": str(self.base_dir / "var")})
        if result.returncode != 0:
            raise RigError(f"tp migrate: {result.stderr.strip() or result.stdout.strip()}")

    def _make_host(self, index: int) -> RigHost:
        assert self.subnet is not None
        name = f"host{index}"
        netns = f"{self.prefix}-{name}"
        veth = f"{self.prefix}h{index}"
        address = str(self.subnet.network_address + FIRST_HOST_OCTET - 1 + index)
        root = self.base_dir / name
        env = {
            **self.env,
            "TP_HOST": "0.0.0.0",
            "PORT": str(API_PORT),
            "TP_API_PROCESSES": str(self.api_processes),
            "TP_VAR_DIR": str(root / "var"),
            "TP_SUPERVISOR_SOCKET": str(root / "var/run/supervisor.sock"),
            "TP_HOST_ID": name,
            "TP_INSTANCE": name,
        }
        host = self.hosts[name] = RigHost(name, index, netns, veth, address, root, env)  # known before made
        # The inside end is made under a rig-named name, so nothing of ours is ever unnamed.
        ip("netns", "add", netns)
        self._made.add(netns)
        ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}i")
        self._made.add(veth)
        ip("link", "set", f"{veth}i", "netns", netns)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        ip("-n", netns, "link", "set", f"{veth}i", "name", "eth0")
        ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        for sub in ("var/run", "var/log", "var/supervisor.d"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
        return host

    # -- operating hosts ------------------------------------------------------------------------------

    def host(self, name: str) -> RigHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise RigError(f"no host {name!r} (hosts: {', '.join(self.hosts)})") from None

    def start_host(self, name: str, *, wait: bool = True) -> RigHost:
        """(Re)start a host's supervisord inside its namespace; with `wait`, until it serves."""
        host = self.host(name)
        if host.pids():
            raise RigError(f"{name} still has processes: {host.pids()}")
        with contextlib.suppress(FileNotFoundError):
            host.socket.unlink()
        with open(host.root / "supervisord.stdout", "ab") as log:
            host.process = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "supervisord", "-n", "-c", str(host.root / "supervisord.conf")],
                env=host.env, cwd=host.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=pdeathsig(signal.SIGTERM))
        if wait:
            self.wait_serving([name], self.start_timeout)
        return host

    def serving(self, name: str) -> bool:
        """Every program RUNNING under the host's supervisord, and its API healthy over the bridge."""
        host = self.host(name)
        try:
            processes = host.client().processes()
        except OSError:
            return False
        if not processes or any(p.state != "RUNNING" for p in processes):
            return False
        return self.health(name) == 200

    def wait_serving(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                host = self.host(name)
                if host.process is not None and host.process.poll() is not None:
                    tail = (host.root / "supervisord.stdout").read_text(errors="replace")[-2000:]
                    raise RigError(f"{name}'s supervisord exited: {tail}")
                if self.serving(name):
                    waiting.remove(name)
            time.sleep(0.2)
        if waiting:
            detail = {n: self.host(n).log("tp-api-00")[-800:] for n in waiting}
            raise RigError(f"not serving within {timeout}s: {waiting}; api logs: {detail}")

    def health(self, name: str, timeout: float = 2.0) -> int | None:
        """The HTTP status of the host's /api/health from the root namespace, None if it does not answer."""
        try:
            status, _ = http_call(f"{self.host(name).url}/api/health", timeout=timeout)
        except OSError:
            return None
        return status

    def kill(self, name: str) -> list[int]:
        """kill -9 the host's whole process tree (every process in its namespace); the pids killed."""
        host = self.host(name)
        killed = self._kill_all(host)
        if host.process is not None:
            host.process.wait(timeout=10)
            host.process = None
        return killed

    def cut(self, name: str) -> None:
        """Cut the host off: its link to the bridge goes down (packets vanish; nothing is refused)."""
        ip("link", "set", self.host(name).veth, "down")

    def restore(self, name: str) -> None:
        """Undo `cut`."""
        ip("link", "set", self.host(name).veth, "up")

    @contextlib.contextmanager
    def cut_off(self, name: str) -> Iterator[None]:
        """The host is cut off inside the block and restored after it, whatever happens."""
        self.cut(name)
        try:
            yield
        finally:
            self.restore(name)

    def run_in(self, name: str, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A command inside the host's namespace: the network as its programs see it."""
        host = self.host(name)
        return subprocess.run(["ip", "netns", "exec", host.netns, *argv], env=host.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def reaches(self, name: str, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from inside host `name` to address:port is accepted within `timeout`."""
        code = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
        return self.run_in(name, [sys.executable, "-c", code, address, str(port), str(timeout)]).returncode == 0

    @property
    def servers(self) -> dict[str, tuple[str, int]]:
        """Where the shared servers listen: (address, port) of postgres, redis and the emulator."""
        assert self._postgres is not None and self._redis is not None
        return {"postgres": (self.gateway, self._postgres.port), "redis": self.redis_master(),
                "emulator": (self.gateway, int(self.emulator_url.rsplit(":", 1)[1])),
                **{f"sentinel{n}": (self.gateway, s.port) for n, s in enumerate(self._sentinels, 1)}}

    def is_cut(self, name: str) -> bool:
        result = ip("-j", "link", "show", self.host(name).veth)
        return "UP" not in json.loads(result.stdout)[0].get("flags", [])

    def stop_host(self, name: str, timeout: float = 60.0) -> None:
        """Stop a host cleanly (supervisord shuts its programs down), then kill whatever remains."""
        host = self.host(name)
        with contextlib.suppress(OSError, xmlrpc.client.Fault):
            host.client().rpc.shutdown()
        if host.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.process.wait(timeout=timeout)
        self.kill(name)

    def _ask_to_stop(self, host: RigHost) -> bool:
        """Ask a running, linked host's supervisord to shut down; False when there is none to ask (a
        cut host is killed instead: its programs could not drain against servers they cannot reach)."""
        try:
            if host.process is None or host.process.poll() is not None or self.is_cut(host.name):
                return False
            host.client().rpc.shutdown()
        except (OSError, RigError, xmlrpc.client.Fault):
            return False
        return True

    def _wait_stopped(self, host: RigHost) -> None:
        if host.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.process.wait(timeout=20)

    def _kill_all(self, host: RigHost) -> list[int]:
        killed = kill_namespace(host.netns)
        if host.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.process.wait(timeout=5)
        if host.pids():
            raise RigError(f"{host.name}: processes survive SIGKILL: {host.pids()}")
        return killed

    def _delete_netns(self, host: RigHost) -> None:
        if host.veth in self._made and self._link_exists(host.veth):
            ip("link", "del", host.veth)  # takes its peer, the namespace's eth0, with it
        if host.netns in self._made and host.netns in ip("netns", "list").stdout.split():
            ip("netns", "del", host.netns)

    # -- using the platform ------------------------------------------------------------------------------

    def tp(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
           timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`tp ARGS` from the root namespace, with the rig's database, Redis and secrets."""
        return subprocess.run([str(BIN_DIR / "tp"), *args], env={**self.env, **(env or {})}, cwd=self.base_dir,
                              input=stdin, capture_output=True, text=True, timeout=timeout, check=False)

    def create_user(self, username: str, password: str, role: str = "admin") -> None:
        result = self.tp("create-user", "--username", username, "--role", role, "--password-stdin",
                         stdin=password + "\n", env={"TP_VAR_DIR": str(self.base_dir / "var")})
        if result.returncode != 0:
            raise RigError(f"tp create-user: {result.stderr.strip()}")

    def call(self, name: str, method: str, path: str, body: Any = None, token: str | None = None,
             timeout: float = 10.0) -> tuple[int, Any]:
        """One request to host `name`'s API over the bridge."""
        return http_call(f"{self.host(name).url}{path}", method, body, token, timeout)

    def login(self, name: str, username: str, password: str) -> str:
        status, body = self.call(name, "POST", "/api/auth/login", {"username": username, "password": password})
        if status != 200:
            raise RigError(f"login via {name}: {status} {body}")
        return str(body["access_token"])

    def log_in(self, via: str, token: str, phone: str, *, limits: dict[str, Any] | None = None) -> int:
        """Add an emulator account through host `via`'s API and log it in with the test-DC code
        (`+99966X...` takes `XXXXX`); with `limits`, set its sending limits too. Returns its id."""
        status, account = self.call(via, "POST", "/api/accounts", {"phone": phone}, token=token, timeout=30)
        if status not in (200, 201) or account.get("auth_state") != "wait_code":
            raise RigError(f"adding {phone} via {via}: {status} {account}")
        status, account = self.call(via, "POST", f"/api/accounts/{account['id']}/auth/code",
                                    {"code": phone[6] * 5}, token=token, timeout=30)
        if status != 200 or account.get("auth_state") != "ready":
            raise RigError(f"logging {phone} in via {via}: {status} {account}")
        account_id = int(account["id"])
        if limits is not None:
            status, body = self.call(via, "PUT", f"/api/accounts/{account_id}/limits", limits, token=token)
            if status != 200:
                raise RigError(f"limits of account {account_id}: {status} {body}")
        return account_id

    def emulator(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """The emulator's control surface (`/control/deliveries`, ...): what Telegram saw."""
        status, answer = http_call(f"{self.emulator_url}{path}", method, body)
        if status != 200:
            raise RigError(f"emulator {path}: {status} {answer}")
        return answer

    def owner_of(self, account_id: int) -> str | None:
        """The host whose worker holds the account's lease now (None: nobody). A worker child's
        identity ends with its pid, and a pid lives in exactly one host's namespace."""
        client = self.redis_client()
        try:
            lease = client.get(redis_keys.account_lease(account_id))
        finally:
            client.close()
        if lease is None:
            return None
        pid = int(str(lease).split("|", 1)[0].rsplit("-", 1)[-1])
        return next((h.name for h in self.hosts.values() if pid in h.pids()), None)

    def describe(self) -> dict[str, Any]:
        """What a person (or `scripts/hosts status`) needs to reach and operate the rig."""
        return {
            "rig_id": self.rig_id,
            "pid": os.getpid(),
            "base_dir": str(self.base_dir),
            "bridge": self.bridge,
            "subnet": str(self.subnet),
            "database_url": self.env.get("DATABASE_URL", ""),
            "redis_url": self.env.get("REDIS_URL", ""),
            "redis_sentinels": self.env.get("REDIS_SENTINELS", ""),
            "redis_servers": {str(s.port): s.pid for s in self.redis_servers},
            "emulator_url": self.emulator_url,
            "hosts": {h.name: {"netns": h.netns, "veth": h.veth, "address": h.address, "url": h.url,
                               "root": str(h.root)} for h in self.hosts.values()},
        }

    # -- small helpers --------------------------------------------------------------------------------

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return http_call(url, timeout=1.0)[0] == 200
        except OSError:
            return False

    @staticmethod
    def _wait(check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise RigError(f"timed out after {timeout}s waiting for {what}")


def sentinels_master(sentinels: Sequence[tuple[str, int]], password: str, service: str) -> tuple[str, int]:
    """The master most of the sentinels name now (`SENTINEL GET-MASTER-ADDR-BY-NAME`); RigError when no
    majority agrees (a failover under way, or too few sentinels answering)."""
    answers = []
    for address, port in sentinels:
        client = redis.Redis(host=address, port=port, password=password, socket_timeout=1, socket_connect_timeout=1,
                             decode_responses=True)
        try:
            answer = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
            if answer:
                answers.append((str(answer[0]), int(answer[1])))
        except redis.RedisError:
            pass
        finally:
            client.close()
    best = max(set(answers), key=answers.count, default=None)
    if best is None or answers.count(best) <= len(sentinels) // 2:
        raise RigError(f"the sentinels agree on no master: {answers}")
    return best


def _replication(server: _BridgeRedis, field_name: str) -> str | None:
    """One field of a server's INFO replication (None: it does not answer)."""
    client = redis.Redis(host=server.address, port=server.port, password=server.password, socket_timeout=1,
                         socket_connect_timeout=1, decode_responses=True)
    try:
        value = client.info("replication").get(field_name)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return None if value is None else str(value)


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- scripts/hosts: the rig by hand --------------------------------------------------------------------

DEFAULT_STATE = Path(tempfile.gettempdir()) / "tp-hosts.json"


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise RigError(f"no rig is up ({path} does not exist): `scripts/hosts up N` first") from None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _up(count: int, api_processes: int, state_path: Path, password: str, sentinels: int) -> int:
    if state_path.exists() and _alive(int(_read_state(state_path)["pid"])):
        raise RigError(f"a rig is already up (see {state_path}); `scripts/hosts down` first")

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the `with`: everything is removed

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    print(f"starting {count} hosts ...", flush=True)
    rig = Rig(count, api_processes=api_processes, admin=("admin", password), sentinels=sentinels)
    atexit.register(rig.close)  # a second chance, should the `with` be cut short; close() is idempotent
    with rig:
        state = {**rig.describe(), "env": rig.env,
                 "host_env": {h.name: h.env for h in rig.hosts.values()}}
        state_path.touch(mode=0o600)
        state_path.write_text(json.dumps(state, indent=2))
        try:
            print(f"rig {rig.rig_id} up: bridge {rig.bridge} {rig.subnet} (the servers on {rig.gateway})")
            print(f"  DATABASE_URL={rig.env['DATABASE_URL']}\n  REDIS_URL={rig.env['REDIS_URL']}")
            if sentinels:
                print(f"  REDIS_SENTINELS={rig.env['REDIS_SENTINELS']} (service {rig.SENTINEL_SERVICE}, "
                      f"password {rig.sentinel_password}); master now {':'.join(map(str, rig.redis_master()))}")
            print(f"  emulator {rig.emulator_url}\n  admin password: {password}")
            for host in rig.hosts.values():
                print(f"  {host.name}: {host.url} (netns {host.netns}, var {host.root / 'var'})")
            print("Ctrl-C (or `scripts/hosts down`) removes everything.", flush=True)
            while True:
                time.sleep(1)
                for host in rig.hosts.values():  # reap a supervisord another command killed
                    if host.process is not None and host.process.poll() is not None:
                        host.process = None
        finally:
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
            print("removing the rig ...", flush=True)
    return 0


def _status(state: dict[str, Any]) -> int:
    up = _alive(int(state["pid"]))
    print(f"rig {state['rig_id']} (pid {state['pid']}, {'up' if up else 'its owner is gone'}): "
          f"bridge {state['bridge']} {state['subnet']}")
    for name, host in state["hosts"].items():
        links = json.loads(ip("-j", "link", "show", host["veth"], check=False).stdout or "[{}]")
        link = "cut" if "UP" not in links[0].get("flags", []) else "linked"
        try:
            health: Any = http_call(f"{host['url']}/api/health", timeout=2.0)[0]
        except OSError as exc:
            health = f"no answer ({type(exc).__name__})"
        print(f"  {name:8} {host['address']:15} {link:7} processes={len(netns_pids(host['netns'])):3} "
              f"/api/health: {health}")
    return 0


def _kill(state: dict[str, Any], name: str) -> int:
    netns = _state_host(state, name)["netns"]
    print(f"{name}: killed {len(kill_namespace(netns))} processes")
    left = netns_pids(netns)
    if left:
        raise RigError(f"{name}: processes survive SIGKILL: {left}")
    return 0


def _start(state: dict[str, Any], name: str) -> int:
    host = _state_host(state, name)
    if netns_pids(host["netns"]):
        raise RigError(f"{name} is running; `scripts/hosts kill {name}` first")
    root = Path(host["root"])
    with contextlib.suppress(FileNotFoundError):
        (root / "var/run/supervisor.sock").unlink()
    with open(root / "supervisord.stdout", "ab") as log:
        subprocess.Popen(["ip", "netns", "exec", host["netns"], "supervisord", "-n", "-c",
                          str(root / "supervisord.conf")], env=state["host_env"][name], cwd=root,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"{name}: supervisord started in {host['netns']} (`scripts/hosts status` shows when it serves)")
    return 0


def _cut(state: dict[str, Any], name: str, seconds: float) -> int:
    veth = _state_host(state, name)["veth"]
    ip("link", "set", veth, "down")
    print(f"{name} cut off for {seconds:g}s", flush=True)
    try:
        time.sleep(seconds)
    finally:
        ip("link", "set", veth, "up")
        print(f"{name} restored")
    return 0


def _kill_redis_master(state: dict[str, Any]) -> int:
    env = state["env"]
    if not env.get("REDIS_SENTINELS"):
        raise RigError("this rig has no sentinels (`scripts/hosts up N --sentinels 3`)")
    sentinels = [(host, int(port)) for host, _, port in (s.rpartition(":") for s in env["REDIS_SENTINELS"].split(","))]
    password, service = env["REDIS_SENTINEL_PASSWORD"], env["REDIS_SENTINEL_SERVICE"]
    old = sentinels_master(sentinels, password, service)
    pid = state["redis_servers"].get(str(old[1]))
    if pid is None:
        raise RigError(f"the master {old[0]}:{old[1]} is none of the rig's servers")
    os.kill(int(pid), signal.SIGKILL)
    killed_at = time.monotonic()
    print(f"Redis master {old[0]}:{old[1]} (pid {pid}) killed", flush=True)
    deadline = killed_at + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(RigError):
            new = sentinels_master(sentinels, password, service)
            if new != old:
                print(f"Sentinel promoted {new[0]}:{new[1]} {time.monotonic() - killed_at:.1f} s after the kill")
                return 0
        time.sleep(0.1)
    raise RigError("no failover within 60 s")


def _scenario(recipients: int, sends: str) -> int:
    """Issue 28's check on a rig of its own (three hosts, three sentinels), printed as it happens."""
    from multihost.scenario import PASSWORD, USERNAME, Plan, Scenario, judge

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    plan = Plan(recipients=recipients, sends=sends)
    print("starting 3 hosts, a Redis master with 2 replicas and 3 sentinels ...", flush=True)
    started = time.monotonic()
    with Rig(3, sentinels=3, admin=(USERNAME, PASSWORD)) as rig:
        print(f"rig {rig.rig_id} up in {time.monotonic() - started:.1f} s", flush=True)
        outcome = Scenario(rig, plan, say=lambda line: print(line, flush=True)).run()
        verdicts = judge(outcome, plan, list(rig.hosts))
        print("removing the rig ...", flush=True)
    print()
    for verdict in verdicts:
        print(f"{'PASS' if verdict.ok else 'FAIL'}  {verdict.claim}\n      {verdict.detail}")
    return 0 if all(v.ok for v in verdicts) else 1


def _down(state_path: Path) -> int:
    state = _read_state(state_path)
    pid = int(state["pid"])
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if _alive(pid):
        raise RigError(f"the rig's process {pid} did not stop")
    # Its owner was killed outright: remove what it made, by name.
    for host in state["hosts"].values():
        kill_namespace(host["netns"])
    left = remove_rig_names(state["rig_id"])
    shutil.rmtree(state["base_dir"], ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
    print("rig removed" if not left else f"left behind: {left}")
    return 0 if not left else 1


def _prune(rig_ids: list[str]) -> int:
    left = {rig_id: remaining for rig_id in rig_ids if (remaining := remove_rig_names(rig_id))}
    for rig_id in rig_ids:  # and the directories (Rig's default base_dir) of those it removed
        if rig_id not in left:
            for leftover in Path(tempfile.gettempdir()).glob(f"{NAME_PREFIX}{rig_id}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
    print(f"pruned: {', '.join(rig_ids) or 'nothing'}" if not left else f"left behind: {left}")
    return 0 if not left else 1


def _state_host(state: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        host: dict[str, Any] = state["hosts"][name]
    except KeyError:
        raise RigError(f"no host {name!r} (hosts: {', '.join(state['hosts'])})") from None
    return host


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/hosts", description="N platform hosts in network namespaces.")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help=f"the rig's state file ({DEFAULT_STATE})")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N hosts and keep them until Ctrl-C / SIGTERM / `down`")
    up.add_argument("count", type=int)
    up.add_argument("--api-processes", type=int, default=1)
    up.add_argument("--admin-password", default="", help="the `admin` user's password (default: generated)")
    up.add_argument("--sentinels", type=int, default=0,
                    help="a Sentinel-managed Redis: a master, 2 replicas and this many sentinels (0: one Redis)")
    sub.add_parser("status", help="each host's address, link, processes and /api/health")
    for command, text in (("kill", "kill -9 every process of HOST"), ("start", "start HOST's supervisord again")):
        sub.add_parser(command, help=text).add_argument("host")
    cut = sub.add_parser("cut", help="take HOST's link down for SECONDS, then restore it")
    cut.add_argument("host")
    cut.add_argument("seconds", type=float)
    sub.add_parser("kill-redis-master", help="kill -9 the Redis master (a rig with sentinels); wait for the failover")
    scenario = sub.add_parser("scenario", help="issue 28's check on a rig of its own: a campaign through a host's "
                                               "death, a Redis failover and a host cut off for 20 s")
    scenario.add_argument("--recipients", type=int, default=5000)
    scenario.add_argument("--sends", choices=("campaign", "messages"), default="campaign",
                          help="one campaign, or single POST /api/messages at the same pace")
    sub.add_parser("down", help="stop the rig and remove everything it made")
    prune = sub.add_parser("prune", help="remove the names rigs whose owner was killed left behind (namespaces "
                                         "with no process, their links); only while no rig is in use")
    prune.add_argument("rig_ids", nargs="*", help="only these rigs (default: every stale one)")
    args = parser.parse_args(argv)
    try:
        reason = unavailable()
        if reason:
            raise RigError(reason)
        if args.command == "up":
            return _up(args.count, args.api_processes, args.state, args.admin_password or secrets.token_urlsafe(12),
                       args.sentinels)
        if args.command == "scenario":
            return _scenario(args.recipients, args.sends)
        if args.command == "down":
            return _down(args.state)
        if args.command == "prune":
            return _prune(args.rig_ids or stale_rigs())
        state = _read_state(args.state)
        if args.command == "status":
            return _status(state)
        if args.command == "kill":
            return _kill(state, args.host)
        if args.command == "start":
            return _start(state, args.host)
        if args.command == "kill-redis-master":
            return _kill_redis_master(state)
        return _cut(state, args.host, args.seconds)
    except (RigError, DevStackError) as exc:
        print(f"scripts/hosts: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the rig is already removed on the way out
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
