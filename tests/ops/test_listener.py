"""The listener's parts on their own: the event protocol, the book of restarts, the back-off policy,
sizes, and memory counted over a process tree."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from telegram_platform.ops import procfs
from telegram_platform.ops.listener import EventChannel, parse_tokens
from telegram_platform.ops.readiness import member_socket
from telegram_platform.ops.restarts import Book, book_path, read_book, read_counters, write_book
from telegram_platform.settings import ConfigError, Settings, SupervisionSettings, parse_size


def test_event_channel_speaks_supervisords_protocol() -> None:
    """READY, then a header line and a payload of `len` bytes, answered with RESULT 2 OK."""
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    with os.fdopen(in_read, "rb") as stdin, os.fdopen(out_write, "wb") as stdout, \
            os.fdopen(in_write, "wb") as feeder, os.fdopen(out_read, "rb") as answers:
        channel = EventChannel(stdin, stdout)
        channel.ready()
        assert answers.read(6) == b"READY\n"
        assert channel.wait(0.05) is None
        payload = b"processname:tp-api-00 groupname:tp-api from_state:RUNNING expected:0 pid:42"
        feeder.write(b"ver:3.0 server:supervisor serial:7 pool:tp-events poolserial:7 "
                     b"eventname:PROCESS_STATE_EXITED len:%d\n" % len(payload) + payload)
        feeder.flush()
        event = channel.wait(1.0)
        assert event is not None
        header, body = event
        assert header["eventname"] == "PROCESS_STATE_EXITED"
        assert parse_tokens(body) == {"processname": "tp-api-00", "groupname": "tp-api", "from_state": "RUNNING",
                                      "expected": "0", "pid": "42"}
        channel.ok()
        assert answers.read(11) == b"RESULT 2\nOK"


def test_book_counts_starts_crashes_and_restarts_by_reason() -> None:
    """Only returns to RUNNING after the first start are restarts, each under why it went down."""
    book = Book()
    name = "tp-api:tp-api-00"
    book.transition(name, "STARTING", "STOPPED", 0.0)
    book.transition(name, "RUNNING", "STARTING", 1.0, pid=10)
    book.transition(name, "RUNNING", "STARTING", 1.5, pid=10)  # seen twice (catch-up + event): once
    book.transition(name, "EXITED", "RUNNING", 5.0, expected=False)  # crash
    book.transition(name, "STARTING", "EXITED", 5.1)
    book.transition(name, "BACKOFF", "STARTING", 5.2)  # a failed start is not a restart
    book.transition(name, "STARTING", "BACKOFF", 6.2)
    book.transition(name, "RUNNING", "STARTING", 7.2, pid=11)
    book.note_intent(name, "memory", 8.0)
    book.transition(name, "STOPPING", "RUNNING", 8.0)
    book.transition(name, "STOPPED", "STOPPING", 9.0)
    book.transition(name, "STARTING", "STOPPED", 9.1)
    book.transition(name, "RUNNING", "STARTING", 10.1, pid=12)
    book.transition(name, "STOPPING", "RUNNING", 11.0)  # supervisorctl, no intent: manual
    book.transition(name, "STOPPED", "STOPPING", 11.5)
    book.transition(name, "RUNNING", "STARTING", 12.5, pid=13)
    record = book.processes[name]
    assert (record.starts, record.restarts, record.crashes, record.start_failures) == (4, 3, 1, 1)
    assert record.by_reason == {"crash": 1, "memory": 1, "reload": 0, "manual": 1}


def test_consecutive_crashes_reset_after_a_long_run() -> None:
    """Crashes within `reset_after` of a start count up; one after a long run starts again at 1."""
    book = Book(reset_after=30.0)
    name = "tp-worker"
    now = 0.0
    for expected in (1, 2, 3):
        book.transition(name, "RUNNING", "STARTING", now, pid=int(now) + 1)
        now += 5
        assert book.transition(name, "EXITED", "RUNNING", now).consecutive_crashes == expected
        now += 1
    book.transition(name, "RUNNING", "STARTING", now, pid=99)
    assert book.transition(name, "EXITED", "RUNNING", now + 31).consecutive_crashes == 1


def test_backoff_is_pm2s_exponential_delay() -> None:
    """x1.5 per consecutive crash from TP_RESTART_DELAY, capped at TP_RESTART_DELAY_MAX."""
    config = SupervisionSettings.from_env({"TP_VAR_DIR": "/tmp/x"})
    delays = [config.backoff_delay(n) for n in range(1, 16)]
    assert delays[:3] == pytest.approx([0.1, 0.15, 0.225])
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays[-1] == 15.0
    slow = SupervisionSettings.from_env({"TP_RESTART_DELAY": "1", "TP_RESTART_DELAY_MAX": "2"})
    assert [slow.backoff_delay(n) for n in (1, 2, 3)] == pytest.approx([1.0, 1.5, 2.0])


def test_supervision_settings_read_limits_and_name_bad_values() -> None:
    """Memory limits accept 1GB/512MB/bytes; a bad value is a ConfigError naming the variable."""
    config = SupervisionSettings.from_env({"TP_API_MEMORY_LIMIT": "512MB", "TP_WORKER_MEMORY_LIMIT": "3g",
                                 "SUPERVISOR_SERVER_URL": "unix:///srv/tp/var/run/supervisor.sock"})
    assert config.api_memory_limit == 512 << 20 and config.worker_memory_limit == 3 << 30
    assert config.supervisor_socket == Path("/srv/tp/var/run/supervisor.sock")
    assert book_path(config.supervisor_socket) == Path("/srv/tp/var/run/tp-processes.json")
    assert config.memory_limit("tp-api") == (512 << 20, False)
    assert config.memory_limit("tp-worker") == (3 << 30, True)
    assert config.memory_limit("redis") is None
    assert parse_size("1073741824") == 1 << 30 and parse_size("1.5 GiB") == 3 << 29
    with pytest.raises(ConfigError) as info:
        SupervisionSettings.from_env({"TP_WORKER_MEMORY_LIMIT": "plenty"})
    assert info.value.variable == "TP_WORKER_MEMORY_LIMIT"
    with pytest.raises(ConfigError):
        SupervisionSettings.from_env({"TP_WATCHDOG_INTERVAL": "30"})  # checked at least every 5 s


def test_supervision_settings_are_the_settings_own_part() -> None:
    """The listener's settings, read alone without secrets, equal the part every program's Settings holds."""
    environ = {"DATABASE_URL": "postgresql://u@localhost/db", "REDIS_URL": "redis://localhost:6379/0",
               "JWT_SECRET": "j" * 40, "ENCRYPTION_KEY": "ab" * 32, "TP_VAR_DIR": "/srv/tp/var",
               "TP_WORKER_MEMORY_LIMIT": "3g", "TP_RESTART_DELAY": "2"}
    alone = SupervisionSettings.from_env({k: v for k, v in environ.items() if k.startswith("TP_")})
    assert Settings.from_env(environ).supervision == alone
    assert alone.supervisor_socket == Path("/srv/tp/var/run/supervisor.sock")
    assert (alone.worker_memory_limit, alone.backoff_initial) == (3 << 30, 2.0)


def test_member_socket_stays_within_sun_path(tmp_path: Path) -> None:
    """A deep var/ still gives a usable unix socket path (shortened under /tmp)."""
    deep = tmp_path / ("d" * 90)
    path = member_socket(deep, "tp-api-00")
    assert len(str(path)) <= 100 and path.name == "tp-api-00.sock"
    assert member_socket(Path("/srv/tp/var"), "tp-api-01") == Path("/srv/tp/var/run/api/tp-api-01.sock")


def test_book_file_round_trips_and_feeds_the_counters(tmp_path: Path) -> None:
    """What the listener writes, readers (metrics, tp status) read back atomically."""
    book = Book(supervisord_pid=5)
    book.transition("tp-worker", "RUNNING", "STARTING", 1.0, pid=7)
    book.transition("tp-worker", "EXITED", "RUNNING", 2.0)
    book.transition("tp-worker", "RUNNING", "STARTING", 3.0, pid=8)
    path = tmp_path / "run" / "tp-processes.json"
    write_book(path, book)
    assert read_book(path) == book
    counters = read_counters(tmp_path / "run" / "supervisor.sock")
    assert counters["tp-worker"].restarts == 1 and counters["tp-worker"].by_reason["crash"] == 1
    assert read_counters(tmp_path / "elsewhere.sock") == {}


def test_worker_memory_counts_its_children() -> None:
    """A process's tree memory is its own plus its children's (the worker's pool)."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        members: list[procfs.ProcStat] = []
        while time.monotonic() < deadline and len(members) < 3:
            members = procfs.tree(parent.pid)
            time.sleep(0.02)
        assert len(members) == 3
        own = procfs.rss(parent.pid)
        total = procfs.rss(parent.pid, with_children=True)
        assert own is not None and total is not None and total > own
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert procfs.rss(parent.pid) is None


def test_cpu_percent_sees_a_busy_process() -> None:
    """CPU use is sampled over an interval: a spinning process shows tens of percent."""
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        usage = procfs.cpu_percent({"spin": (spinner.pid, False)}, interval=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert usage["spin"] > 20
