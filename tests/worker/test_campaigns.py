"""Campaigns end to end: the real API records them, a real worker runs them through the emulator;
and the runner's watch, in this process, through a Redis outage."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, HostFactory, TcpProxy, WorkerProcess, eventually
from worker.test_end_to_end import _ready_account

from telegram_platform.queue.consumer import JobContext
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import campaigns as campaign_store
from telegram_platform.worker.campaigns import PROGRESS_SECONDS, WATCH_SECONDS, CampaignRunner


async def _accounts(api: ApiClient, token: str, count: int, first: int = 0) -> list[int]:
    """Logged-in accounts with phones +99966X1000+i (X = 1..9 cycling)."""
    ids = []
    for i in range(first, first + count):
        digit = 1 + i % 9
        account = await _ready_account(api, token, f"+99966{digit}{1000 + i:04d}")
        ids.append(account["id"])
    return ids


async def _limits(api: ApiClient, token: str, account_id: int, **limits: Any) -> None:
    status, body = await api.call("PUT", f"/api/accounts/{account_id}/limits", token, json=limits)
    assert status == 200, body


async def _finished(api: ApiClient, token: str, campaign_id: int, timeout: float = 60.0) -> dict[str, Any]:
    async def done() -> Any:
        _, body = await api.call("GET", f"/api/campaigns/{campaign_id}", token)
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = await eventually(done, timeout=timeout, interval=0.2)
    return result


async def test_campaign_reaches_every_recipient_once(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                     fresh_emulator: EmulatorHandle) -> None:
    """Two accounts share 40 recipients: each gets exactly one rendered message; an opted-out peer none."""
    accounts = await _accounts(api, admin_token, 2)
    for account_id in accounts:
        await _limits(api, admin_token, account_id, per_second=20, burst=5, warmup_days=0)
    recipients = [{"peer": f"@user{i}", "variables": {"first_name": f"Name{i}"}} for i in range(40)]
    status, body = await api.call("POST", "/api/optouts", admin_token, json={"peers": ["@USER7"]})
    assert status == 201 and body == {"added": 1}
    status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "hello", "account_ids": accounts, "template": "Hi {first_name}, {{{peer}}}",
        "recipients": recipients})
    assert status == 201, campaign
    assert campaign["status"] == "draft" and campaign["progress"]["total"] == 40
    status, started = await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
    assert status == 200 and started["status"] == "running"

    final = await _finished(api, admin_token, campaign["id"])
    assert final["status"] == "completed"
    assert final["progress"] == {"total": 40, "sent": 39, "failed": 0, "pending": 0, "skipped": 1, "cancelled": 0}
    deliveries = fresh_emulator.telegram.deliveries()
    assert deliveries == {f"@user{i}": 1 for i in range(40) if i != 7}
    texts = {r.to: r.text for r in fresh_emulator.telegram.received}
    assert texts["@user3"] == "Hi Name3, {@user3}"
    senders = {r.from_user_id for r in fresh_emulator.telegram.received}
    assert len(senders) == 2, "both accounts should have sent"


async def test_campaign_paced_to_account_limits(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                fresh_emulator: EmulatorHandle) -> None:
    """An account limited to 5/s sends 21 messages in about 4 s and Telegram never answers 429."""
    fresh_emulator.telegram.config.account_rate = 5.0
    fresh_emulator.telegram.config.account_burst = 2
    [account_id] = await _accounts(api, admin_token, 1, first=20)
    await _limits(api, admin_token, account_id, per_second=5, burst=1, per_chat_seconds=0, warmup_days=0)
    status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "paced", "account_ids": [account_id], "template": "x",
        "recipients": [{"peer": f"@p{i}"} for i in range(21)]})
    assert status == 201
    started = time.monotonic()
    await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
    final = await _finished(api, admin_token, campaign["id"])
    elapsed = time.monotonic() - started
    assert final["progress"]["sent"] == 21
    assert fresh_emulator.telegram.counters.get("rate_limited", 0) == 0
    times = sorted(r.at for r in fresh_emulator.telegram.received)
    span = times[-1] - times[0]
    assert 3.8 <= span <= 6.0, f"20 intervals at 5/s should take ~4 s, took {span:.2f}"
    assert elapsed < 15


async def test_pause_resume_and_cancel(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                       fresh_emulator: EmulatorHandle, db: asyncpg.Pool) -> None:
    """Pause stops new sends, resume finishes the campaign; cancel leaves the rest unsent."""
    [account_id] = await _accounts(api, admin_token, 1, first=30)
    await _limits(api, admin_token, account_id, per_second=10, burst=1, warmup_days=0)
    status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "pausable", "account_ids": [account_id], "template": "t",
        "recipients": [{"peer": f"@q{i}"} for i in range(30)]})
    cid = campaign["id"]
    await api.call("POST", f"/api/campaigns/{cid}/start", admin_token)
    await eventually(lambda: _sent_at_least(api, admin_token, cid, 5), timeout=20)
    status, paused = await api.call("POST", f"/api/campaigns/{cid}/pause", admin_token)
    assert status == 200 and paused["status"] == "paused"
    await asyncio.sleep(0.5)  # a send in flight at the pause may still land
    count = len(fresh_emulator.telegram.received)
    await asyncio.sleep(1.0)
    assert len(fresh_emulator.telegram.received) == count, "no send after the pause settled"
    status, body = await api.call("POST", f"/api/campaigns/{cid}/pause", admin_token)
    assert status == 409 and body["error"]["details"]["status"] == "paused"
    await api.call("POST", f"/api/campaigns/{cid}/resume", admin_token)
    final = await _finished(api, admin_token, cid)
    assert final["status"] == "completed" and final["progress"]["sent"] == 30

    status, second = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "cancelled", "account_ids": [account_id], "template": "t",
        "recipients": [{"peer": f"@r{i}"} for i in range(50)]})
    await api.call("POST", f"/api/campaigns/{second['id']}/start", admin_token)
    await eventually(lambda: _sent_at_least(api, admin_token, second["id"], 3), timeout=20)
    status, cancelled = await api.call("POST", f"/api/campaigns/{second['id']}/cancel", admin_token)
    assert status == 200 and cancelled["status"] == "cancelled"
    await asyncio.sleep(1.0)
    _, final = await api.call("GET", f"/api/campaigns/{second['id']}", admin_token)
    progress = final["progress"]
    assert progress["pending"] == 0 and progress["sent"] + progress["cancelled"] == 50
    assert progress["sent"] < 50
    got = sum(1 for r in fresh_emulator.telegram.received if r.to.startswith("@r"))
    assert got == progress["sent"]


async def _sent_at_least(api: ApiClient, token: str, campaign_id: int, count: int) -> bool:
    _, body = await api.call("GET", f"/api/campaigns/{campaign_id}", token)
    return bool(body["progress"]["sent"] >= count)


async def test_scheduled_campaign_starts_by_itself(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                   fresh_emulator: EmulatorHandle) -> None:
    """A campaign with `schedule_at` a moment ahead is `scheduled`, then runs and completes unprompted."""
    [account_id] = await _accounts(api, admin_token, 1, first=40)
    await _limits(api, admin_token, account_id, per_second=20, warmup_days=0)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "later", "account_ids": [account_id], "template": "t", "schedule_at": at,
        "recipients": [{"peer": "@s1"}, {"peer": "@s2"}]})
    assert status == 201 and campaign["status"] == "scheduled"
    final = await _finished(api, admin_token, campaign["id"], timeout=30)
    assert final["status"] == "completed" and final["progress"]["sent"] == 2
    assert final["started_at"] >= at.replace("Z", "")


async def test_account_at_its_daily_limit_hands_over(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                     fresh_emulator: EmulatorHandle) -> None:
    """An account allowed 3 messages a day sends 3; the other account sends the rest at once."""
    capped, free = await _accounts(api, admin_token, 2, first=70)
    await _limits(api, admin_token, capped, per_second=5, burst=5, per_day=3, warmup_days=0)
    await _limits(api, admin_token, free, per_second=5, burst=5, warmup_days=0)
    _, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "capped", "account_ids": [capped, free], "template": "t",
        "recipients": [{"peer": f"@d{i}"} for i in range(12)]})
    await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
    final = await _finished(api, admin_token, campaign["id"], timeout=30)
    assert final["status"] == "completed" and final["progress"]["sent"] == 12
    telegram = fresh_emulator.telegram
    assert telegram.deliveries() == {f"@d{i}": 1 for i in range(12)}
    by_account: dict[int, int] = {}
    for received in telegram.received:
        by_account[received.from_user_id] = by_account.get(received.from_user_id, 0) + 1
    assert sorted(by_account.values()) == [3, 9]


async def test_the_watch_outlives_a_redis_outage_and_still_stops_the_senders(
        redis_proxy: tuple[TcpProxy, aioredis.Redis], make_host: HostFactory, db: asyncpg.Pool) -> None:
    """With Redis cut, the campaign watch's progress events fail (logged) and it goes on: a pause
    (stored in PostgreSQL) still stops the senders."""
    proxy, cut_off = redis_proxy
    host = await make_host("host-a", redis_client=cut_off)
    account = await account_store.create_account(db, "+9996631201", None)
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="hi", account_ids=[account["id"]], schedule_at=None, recipients=[("@one", {})],
        idempotency_key=None, created_by=None)
    await campaign_store.transition(db, campaign["id"], "start")
    stop = asyncio.Event()
    await proxy.cut()
    try:
        watch = asyncio.create_task(CampaignRunner(host.sessions, host.sender, db, cut_off)._watch(
            JobContext("job", "campaigns", "run_campaign"), campaign["id"], stop))
        await asyncio.sleep(PROGRESS_SECONDS + 2 * WATCH_SECONDS)  # a progress event has failed by now
        assert not watch.done() and not stop.is_set()
        await campaign_store.transition(db, campaign["id"], "pause")
        await asyncio.wait_for(watch, timeout=5 * WATCH_SECONDS)
        assert stop.is_set()
    finally:
        await proxy.start()
