"""The multi-host rig itself (tests/multihost/rig.py, scripts/hosts): the addresses it picks, and that
it removes everything it made: after a start that failed half-way, a run that raised, and a SIGTERM to
`scripts/hosts up`."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from multihost.rig import (
    ADDRESS_POOL,
    REPO,
    Rig,
    RigError,
    RigHost,
    ip,
    networks_in_use,
    pick_subnet,
    remove_rig_names,
    rig_names_present,
    stale_rigs,
    unavailable,
)

pytestmark = [pytest.mark.multihost, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def test_picked_subnet_is_unused_and_inside_the_pool() -> None:
    """The rig's /24 lies in 10.213.0.0/16 and overlaps no address or route of this machine; with all
    but one /24 taken it finds that one, and with none free it refuses."""
    subnet = pick_subnet(networks_in_use())
    assert subnet.subnet_of(ADDRESS_POOL) and subnet.prefixlen == 24
    assert not any(subnet.overlaps(used) for used in networks_in_use())
    free = ipaddress.IPv4Network("10.213.77.0/24")
    taken = [s for s in ADDRESS_POOL.subnets(new_prefix=24) if s != free]
    assert pick_subnet(taken, random.Random(1)) == free
    with pytest.raises(RigError, match="in use"):
        pick_subnet([ADDRESS_POOL])


def test_start_failing_half_way_leaves_nothing(tmp_path: Path) -> None:
    """A start that fails after host 1 runs and host 2's namespace exists removes every namespace,
    link, process and directory it made."""

    seen: list[int] = []

    class FailingRig(Rig):
        def start_host(self, name: str, *, wait: bool = True) -> RigHost:
            if name == "host2":
                # host1's supervisord, started a moment ago (once `ip netns exec` has entered the namespace)
                deadline = time.monotonic() + 10
                while not seen and time.monotonic() < deadline:
                    seen.extend(self.host("host1").pids())
                    time.sleep(0.05)
                raise RigError("injected: host2 does not start")
            return super().start_host(name, wait=wait)

    rig = FailingRig(2)
    with pytest.raises(RigError, match="injected"), rig:
        pass
    assert seen
    assert "host2" in rig.hosts  # its namespace was made before the failure
    assert rig_names_present(rig.rig_id) == []
    assert not rig.base_dir.exists()
    assert not [pid for pid in seen if alive(pid)]


def test_run_that_raised_leaves_nothing() -> None:
    """An exception inside `with Rig(...)` after it served removes the hosts' processes, the shared
    servers, the namespaces, the veths, the bridge and the temporary directory."""
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="mid-way"), Rig(1) as rig:
        assert rig.health("host1") == 200
        assert rig_names_present(rig.rig_id)
        pids = rig.host("host1").pids()
        assert pids
        for server in (rig._postgres, rig._redis):
            assert server is not None
            pids.append(server.pid)
        assert rig._emulator is not None
        pids.append(rig._emulator.pid)
        raise RuntimeError("mid-way")
    assert rig_names_present(rig.rig_id) == []
    assert not rig.base_dir.exists()
    assert not [pid for pid in pids if alive(pid)]


def test_sentinel_rig_fails_over_and_leaves_nothing() -> None:
    """With sentinels=3 the hosts reach Redis only through the sentinels (REDIS_SENTINELS, the master's
    password in REDIS_URL), Redis refuses a client without the password, kill_redis_master's SIGKILL
    makes the sentinels promote a replica that takes writes while the host keeps serving, and an
    exception afterwards removes every server, sentinel and name of the rig."""
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="after the failover"), Rig(1, sentinels=3) as rig:
        env = rig.host("host1").env
        assert env["REDIS_SENTINELS"].count(",") == 2 and env["REDIS_SENTINEL_SERVICE"] == rig.SENTINEL_SERVICE
        assert env["REDIS_SENTINEL_PASSWORD"] == rig.sentinel_password and rig.redis_password in env["REDIS_URL"]
        assert len(rig.redis_servers) == 3
        old = rig.redis_master()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=old[0], port=old[1], socket_timeout=2).set("tp:rig:probe", "1")
        client = rig.redis_client()
        try:
            client.set("tp:rig:probe", "before")
        finally:
            client.close()
        pids = [s.pid for s in (*rig.redis_servers, *rig._sentinels)] + rig.host("host1").pids()
        assert rig.kill_redis_master() == old
        took = rig.wait_failover(old, timeout=60)
        new = rig.redis_master()
        assert new != old and took < 60
        client = rig.redis_client()
        try:
            assert client.set("tp:rig:probe", "after") is True
        finally:
            client.close()
        deadline = time.monotonic() + 60
        while rig.health("host1") != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rig.health("host1") == 200
        hosts = rig.tp("hosts", "--json")  # the platform's own client, through the sentinels
        assert hosts.returncode == 0, hosts.stderr
        assert [h["id"] for h in json.loads(hosts.stdout)["items"]] == ["host1"]
        print(f"sentinel rig: a replica promoted {took:.1f} s after the master's kill")
        raise RuntimeError("after the failover")
    assert len(pids) >= 7
    assert rig_names_present(rig.rig_id) == []
    assert not rig.base_dir.exists()
    assert not [pid for pid in pids if alive(pid)]


def test_sigterm_to_scripts_hosts_up_removes_everything(tmp_path: Path) -> None:
    """`scripts/hosts up 1` serves until SIGTERM, `status` sees the host healthy, and the SIGTERM
    removes the rig: no namespace, link or directory of it is left, and its state file is gone."""
    state = tmp_path / "rig.json"
    script = [str(REPO / "scripts/hosts"), "--state", str(state)]
    up = subprocess.Popen([*script, "up", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not state.exists() and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state.exists(), up.stdout.read().decode() if up.poll() is not None and up.stdout else "no state"
        described = json.loads(state.read_text())
        status = subprocess.run([*script, "status"], capture_output=True, text=True, timeout=30, check=False)
        assert status.returncode == 0, status.stderr
        assert "/api/health: 200" in status.stdout, status.stdout
        assert rig_names_present(described["rig_id"])
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if up.stdout:
            up.stdout.close()
    assert rig_names_present(described["rig_id"]) == []
    assert not Path(described["base_dir"]).exists()
    assert not state.exists()


def test_names_another_rig_holds_are_left_alone() -> None:
    """A rig whose bridge name is already taken (another rig's) fails to start and, cleaning up,
    deletes nothing it did not make: the other bridge is still there."""
    rig = Rig(1)
    ip("link", "add", rig.bridge, "type", "bridge")  # as another rig with the same id would have
    try:
        with pytest.raises(RigError, match="File exists"), rig:
            pass
        assert rig_names_present(rig.rig_id) == [rig.bridge]
    finally:
        ip("link", "del", rig.bridge)
    assert not rig.base_dir.exists()


def test_prune_removes_what_a_killed_owner_left_and_nothing_else() -> None:
    """Names of a rig whose owner was SIGKILLed (a namespace with no process, a bridge) are found
    stale and pruned by id; a rig whose namespace runs a process is not stale and keeps its names."""
    left, busy = Rig(1), Rig(1)
    ip("netns", "add", f"{left.prefix}-host1")
    ip("link", "add", left.bridge, "type", "bridge")
    ip("netns", "add", f"{busy.prefix}-host1")
    sleeper = subprocess.Popen(["ip", "netns", "exec", f"{busy.prefix}-host1", "sleep", "60"])
    try:
        time.sleep(0.2)
        stale = stale_rigs()
        assert left.rig_id in stale and busy.rig_id not in stale
        assert remove_rig_names(left.rig_id) == []
        assert rig_names_present(busy.rig_id) == [f"{busy.prefix}-host1"]
    finally:
        sleeper.kill()
        sleeper.wait()
        for rig in (left, busy):
            remove_rig_names(rig.rig_id)
            shutil.rmtree(rig.base_dir, ignore_errors=True)  # made by the constructor, never started
    assert rig_names_present(left.rig_id) == rig_names_present(busy.rig_id) == []
