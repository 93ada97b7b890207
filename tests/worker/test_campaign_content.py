"""Campaigns carry formatted messages (values escaped, never markup) and say what holds them back;
the real API records them, a real worker runs them through the emulator."""

from __future__ import annotations

import datetime as dt
from typing import Any

from support import ApiClient, EmulatorHandle, WorkerProcess, eventually
from worker.test_campaigns import _accounts, _finished, _limits

HOSTILE = "*x* [evil](http://evil.example) _y_ <b>z</b> &amp; \\"


async def test_a_formatted_campaign_escapes_its_values(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                       fresh_emulator: EmulatorHandle) -> None:
    """MarkdownV2 and HTML templates: each recipient gets the template's entities only, the hostile
    value arriving as literal text at the right UTF-16 offset; the options reach Telegram too."""
    (account_id,) = await _accounts(api, admin_token, 1)
    await _limits(api, admin_token, account_id, per_second=20, burst=5, warmup_days=0, per_chat_seconds=0)
    cases = [("markdown", "*Hi* 😀 {name}, [see](https://example.com/)"),
             ("html", "<b>Hi</b> 😀 {name}, <a href=\"https://example.com/\">see</a>")]
    for n, (mode, template) in enumerate(cases):
        status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
            "name": f"fmt-{mode}", "account_ids": [account_id], "template": template, "parse_mode": mode,
            "silent": True, "recipients": [{"peer": f"@c{n}", "variables": {"name": HOSTILE}}]})
        assert status == 201, campaign
        assert campaign["parse_mode"] == mode and campaign["options"]["silent"] is True
        await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)
        assert (await _finished(api, admin_token, campaign["id"]))["status"] == "completed"
        (received,) = fresh_emulator.telegram.received_by(f"@c{n}")
        expected = f"Hi 😀 {HOSTILE}, see"
        link_at = len(f"Hi 😀 {HOSTILE}, ".encode("utf-16-le")) // 2
        assert received.text == expected
        assert received.entities == [{"type": "bold", "offset": 0, "length": 2},
                                     {"type": "text_link", "offset": link_at, "length": 3,
                                      "url": "https://example.com/"}]
        assert received.options["silent"] is True


async def test_a_template_whose_markup_does_not_parse_is_refused(api: ApiClient, admin_token: str,
                                                                 fresh_emulator: EmulatorHandle) -> None:
    """422 naming `template`, in TDLib's words, before anything is stored."""
    status, body = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "bad", "account_ids": [1], "template": "*Hi {name}", "parse_mode": "markdown"})
    assert status == 422, body
    (error,) = body["error"]["details"]["errors"]
    assert error["field"] == "template" and "Can't parse entities" in error["message"]


async def test_a_campaign_held_back_by_warm_up_says_so(api: ApiClient, admin_token: str, worker: WorkerProcess,
                                                       fresh_emulator: EmulatorHandle) -> None:
    """A new account sends its first day's 20 and stops: the campaign, still running, names the
    per_day limit (warm-up) and when sending resumes, about a day later."""
    (account_id,) = await _accounts(api, admin_token, 1, first=5)
    await _limits(api, admin_token, account_id, per_second=50, burst=10, per_chat_seconds=0)
    status, campaign = await api.call("POST", "/api/campaigns", admin_token, json={
        "name": "warm", "account_ids": [account_id], "template": "hi {peer}",
        "recipients": [{"peer": f"@w{i}"} for i in range(22)]})
    assert status == 201, campaign
    started_at = dt.datetime.now(dt.UTC)
    await api.call("POST", f"/api/campaigns/{campaign['id']}/start", admin_token)

    async def held() -> Any:
        _, body = await api.call("GET", f"/api/campaigns/{campaign['id']}", admin_token)
        return body if body["held_back"] is not None else None

    body = await eventually(held, timeout=30)
    assert body["status"] == "running" and body["progress"]["sent"] == 20 and body["progress"]["pending"] == 2
    held_back = body["held_back"]
    assert held_back["limit"] == "per_day" and held_back["account_id"] == account_id
    assert "20 sends in 24 hours" in held_back["detail"] and "warm-up: day 1 of 14" in held_back["detail"]
    resumes = dt.datetime.fromisoformat(held_back["resumes_at"])
    assert dt.timedelta(hours=23, minutes=59) < resumes - started_at < dt.timedelta(hours=24, minutes=1)
    assert len(fresh_emulator.telegram.received) == 20
