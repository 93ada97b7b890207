"""Campaigns: their recipients, their state machine, and the hand-out of recipients to accounts.

A recipient becomes a message of the outbox (bound to one of the campaign's accounts) only when
that account is about to need it: `assign_batch` takes pending recipients with FOR UPDATE SKIP
LOCKED, skips those who opted out, renders the template and inserts their messages as `queued`.
From there a campaign message is claimed and recorded exactly like any other message; a unique
index allows one message per recipient, ever.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from ..errors import Conflict, NotFound, ValidationFailed
from ..states import CampaignStatus, MessageStatus
from ..telegram import formatting
from ..telegram.content import FormattedText, ParseMode
from ..telegram.formatting import ContentInvalid, escape
from .db import Queryable
from .optouts import peer_key
from .outbox import MESSAGE_COLUMNS, message_dict

MAX_RECIPIENTS = 100_000
MAX_TEXT = 4096

CAMPAIGN_COLUMNS = (
    "id, name, template, status, schedule_at, total, skipped, idempotency_key, error, started_at, "
    "finished_at, created_at, updated_at, parse_mode, options, held_back"
)

# action -> (statuses it applies to, the status it leads to)
TRANSITIONS: Mapping[str, tuple[frozenset[CampaignStatus], CampaignStatus]] = {
    "start": (frozenset({CampaignStatus.DRAFT, CampaignStatus.SCHEDULED}), CampaignStatus.RUNNING),
    "pause": (frozenset({CampaignStatus.SCHEDULED, CampaignStatus.RUNNING}), CampaignStatus.PAUSED),
    # Or back to scheduled, before its time (`transition`). A failed campaign (no account could send:
    # PEER_FLOOD, limits, logged out) resumes once its accounts can, with the recipients still pending.
    "resume": (frozenset({CampaignStatus.PAUSED, CampaignStatus.FAILED}), CampaignStatus.RUNNING),
    "cancel": (frozenset({CampaignStatus.DRAFT, CampaignStatus.SCHEDULED, CampaignStatus.RUNNING,
                          CampaignStatus.PAUSED, CampaignStatus.FAILED}), CampaignStatus.CANCELLED),
}

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]{0,63})\}|\{|\}")


# -- templates ----------------------------------------------------------------------------------------

def template_variables(template: str) -> set[str]:
    """The variables a template uses (`{first_name}`); `{{` and `}}` are literal braces.
    ValueError for a brace that opens or closes nothing."""
    names: set[str] = set()
    for match in _TOKEN.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise ValueError(f"unmatched {token!r} at position {match.start()} (write {token * 2} for a brace)")
        names.add(match.group(1))
    return names


def render(template: str, variables: Mapping[str, Any], peer: str, parse_mode: ParseMode | None = None) -> str:
    """Fill the template; a variable the recipient lacks renders empty (`{peer}` is always known).
    With a parse mode, each value is escaped for it first: a value is always literal text, it can
    never add markup (formatting.escape)."""

    def fill(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name is None:
            return token
        if name == "peer" and "peer" not in variables:
            return escape(peer, parse_mode)
        value = variables.get(name)
        return "" if value is None else escape(str(value), parse_mode)

    return _TOKEN.sub(fill, template)


# -- campaigns ----------------------------------------------------------------------------------------

def compose(template: str, variables: Mapping[str, Any], peer: str, parse_mode: str | None) -> FormattedText:
    """A recipient's message: the template filled (values escaped), then parsed by TDLib and checked
    by Telegram's rules (ContentInvalid in Telegram's words)."""
    mode = ParseMode(parse_mode) if parse_mode else None
    text = render(template, variables, peer, mode)
    return formatting.check(formatting.parse(text, mode) if mode is not None else FormattedText(text))


def check_template(template: str, parse_mode: str | None) -> None:
    """ContentInvalid when the template's own markup does not parse (each variable filled with a
    sample value, escaped as every value is); lengths are checked per recipient."""
    if parse_mode:
        sample = dict.fromkeys(template_variables(template), "x")
        formatting.parse(render(template, sample, "x", ParseMode(parse_mode)), ParseMode(parse_mode))


def _campaign(row: asyncpg.Record, progress: dict[str, int] | None = None,
              account_ids: list[int] | None = None) -> dict[str, Any]:
    data = dict(row)
    for name in ("options", "held_back"):
        if isinstance(data.get(name), str):
            data[name] = json.loads(data[name])
    held = data.get("held_back")
    if held is not None and "resumes_at" in held:
        held["resumes_at"] = dt.datetime.fromtimestamp(float(held["resumes_at"]), dt.UTC)
    if progress is not None:
        data["progress"] = progress
    if account_ids is not None:
        data["account_ids"] = account_ids
    return data


async def create_campaign(
    pool: asyncpg.Pool, *, name: str, template: str, account_ids: Sequence[int], schedule_at: dt.datetime | None,
    recipients: Sequence[tuple[str, Mapping[str, Any]]], idempotency_key: str | None, created_by: int | None,
    media: Sequence[tuple[int, str]] = (),
    parse_mode: str | None = None, options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Create a draft (or scheduled) campaign with its accounts and inline recipients, all or nothing.

    With a known idempotency key, return the first campaign instead. Returns (campaign, created)."""
    async with pool.acquire() as conn, conn.transaction():
        found = await conn.fetch("SELECT id FROM accounts WHERE id = ANY($1::bigint[])", list(account_ids))
        missing = sorted(set(account_ids) - {r["id"] for r in found})
        if missing:
            raise ValidationFailed([{"field": "account_ids", "message": f"unknown accounts: {missing}"}])
        status = CampaignStatus.SCHEDULED if schedule_at is not None else CampaignStatus.DRAFT
        row = await conn.fetchrow(
            """INSERT INTO campaigns (name, template, status, schedule_at, idempotency_key, created_by, parse_mode,
                                      options)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
                ON CONFLICT (created_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING id""",
            name, template, status, schedule_at, idempotency_key, created_by, parse_mode,
            json.dumps(dict(options or {})))
        if row is None:
            existing = await conn.fetchval(
                "SELECT id FROM campaigns WHERE created_by IS NOT DISTINCT FROM $1 AND idempotency_key = $2",
                created_by, idempotency_key)
            return await get_campaign(conn, existing), False
        campaign_id = row["id"]
        await conn.execute(
            """INSERT INTO campaign_accounts (campaign_id, account_id)
               SELECT $1, a FROM unnest($2::bigint[]) AS a ON CONFLICT DO NOTHING""",
            campaign_id, list(account_ids))
        if recipients:
            await add_recipients(conn, campaign_id, recipients)
        if media:  # (file id, kind): the files each of its messages carries (storage/files.py)
            await conn.execute(
                """INSERT INTO campaign_files (campaign_id, position, file_id, kind)
                   SELECT $1, p - 1, f, k FROM unnest($2::bigint[], $3::text[]) WITH ORDINALITY AS t(f, k, p)""",
                campaign_id, [m[0] for m in media], [m[1] for m in media])
        return await get_campaign(conn, campaign_id), True


def _taking_recipients(campaign_id: int, status: str | None) -> None:
    if status is None:
        raise NotFound(f"campaign {campaign_id} not found")
    if status in CampaignStatus.ENDED:
        raise Conflict(f"a {status} campaign takes no more recipients", details={"status": status})


async def check_takes_recipients(conn: Queryable, campaign_id: int) -> None:
    """NotFound or Conflict at once, before a large import is read and parsed (`add_recipients`
    checks again, with the campaign's row locked)."""
    _taking_recipients(campaign_id, await conn.fetchval("SELECT status FROM campaigns WHERE id = $1", campaign_id))


async def add_recipients(conn: asyncpg.Connection, campaign_id: int,
                         recipients: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[int, int]:
    """Add recipients (a peer already in the campaign is ignored); call inside a transaction.

    Returns (added, ignored as duplicates). More than MAX_RECIPIENTS in all is refused."""
    _taking_recipients(campaign_id, await conn.fetchval("SELECT status FROM campaigns WHERE id = $1 FOR UPDATE",
                                                        campaign_id))
    peers = [peer.strip() for peer, _ in recipients]
    keys = [peer_key(peer) for peer in peers]
    variables = [json.dumps(dict(v), ensure_ascii=False) for _, v in recipients]
    result = await conn.execute(
        """INSERT INTO campaign_recipients (campaign_id, peer, peer_key, variables)
           SELECT $1, p, k, v::jsonb FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(p, k, v, n)
           ORDER BY n
           ON CONFLICT (campaign_id, peer_key) DO NOTHING""",
        campaign_id, peers, keys, variables)
    added = int(result.rsplit(" ", 1)[-1])
    total = await conn.fetchval(
        "UPDATE campaigns SET total = total + $2, updated_at = now() WHERE id = $1 RETURNING total",
        campaign_id, added)
    if total > MAX_RECIPIENTS:
        raise ValidationFailed([{"field": "recipients",
                                 "message": f"a campaign holds at most {MAX_RECIPIENTS} recipients "
                                            f"(this would make {total})"}])
    return added, len(recipients) - added


async def get_campaign(conn: Queryable, campaign_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1", campaign_id)
    if row is None:
        raise NotFound(f"campaign {campaign_id} not found")
    accounts = await conn.fetch(
        "SELECT account_id FROM campaign_accounts WHERE campaign_id = $1 ORDER BY account_id", campaign_id)
    return _campaign(row, await progress(conn, row), [r["account_id"] for r in accounts])


async def list_campaigns(conn: Queryable, *, status: str | None, before_id: int | None,
                         limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT {CAMPAIGN_COLUMNS} FROM campaigns
            WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR id < $2)
            ORDER BY id DESC LIMIT $3""",
        status, before_id, limit)
    items = []
    for row in rows:
        accounts = await conn.fetch(
            "SELECT account_id FROM campaign_accounts WHERE campaign_id = $1 ORDER BY account_id", row["id"])
        items.append(_campaign(row, await progress(conn, row), [r["account_id"] for r in accounts]))
    return items


async def progress(conn: Queryable, campaign: Mapping[str, Any]) -> dict[str, int]:
    """total, sent, failed, pending (not yet sent nor failed), skipped (opted out), cancelled. Messages
    the retention purge deleted are counted in the campaign's row (worker/retention.py)."""
    counts = await conn.fetchrow(
        """SELECT m.sent + coalesce(c.purged_sent, 0) AS sent, m.failed + coalesce(c.purged_failed, 0) AS failed,
                  m.cancelled + coalesce(c.purged_cancelled, 0) AS cancelled
           FROM (SELECT count(*) FILTER (WHERE status IN ('sent', 'read')) AS sent,
                        count(*) FILTER (WHERE status = 'failed') AS failed,
                        count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                 FROM messages WHERE campaign_id = $1) m
           LEFT JOIN campaigns c ON c.id = $1""",
        campaign["id"])
    total, skipped = int(campaign["total"]), int(campaign["skipped"])
    sent, failed, cancelled = int(counts["sent"]), int(counts["failed"]), int(counts["cancelled"])
    pending = max(0, total - sent - failed - skipped - cancelled)
    if campaign["status"] == CampaignStatus.CANCELLED:
        cancelled, pending = cancelled + pending, 0
    return {"total": total, "sent": sent, "failed": failed, "pending": pending, "skipped": skipped,
            "cancelled": cancelled}


async def transition(pool: asyncpg.Pool, campaign_id: int, action: str) -> dict[str, Any]:
    """start | pause | resume | cancel; 409 naming the status when the action does not apply."""
    allowed, target = TRANSITIONS[action]
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT status, schedule_at > now() AS early FROM campaigns WHERE id = $1 FOR UPDATE",
                                  campaign_id)
        if row is None:
            raise NotFound(f"campaign {campaign_id} not found")
        status = row["status"]
        if status not in allowed:
            raise Conflict(f"cannot {action} a {status} campaign", details={"status": status})
        if action == "resume" and row["early"]:
            target = CampaignStatus.SCHEDULED  # paused before its time: resumed, it waits for its time again
        await conn.execute(
            """UPDATE campaigns SET status = $2, updated_at = now(),
                      started_at = CASE WHEN $2 = 'running' THEN coalesce(started_at, now()) ELSE started_at END,
                      finished_at = CASE WHEN $2 = 'cancelled' THEN now() WHEN $2 = 'running' THEN NULL
                                         ELSE finished_at END,
                      error = CASE WHEN $2 = 'running' THEN NULL ELSE error END
               WHERE id = $1""",
            campaign_id, target)
        if target == CampaignStatus.CANCELLED:
            # Messages not yet claimed never go out; one being sent right now finishes.
            await conn.execute(
                """UPDATE messages SET status = 'cancelled', error = 'campaign cancelled', updated_at = now()
                   WHERE campaign_id = $1 AND status = 'queued'""",
                campaign_id)
        return await get_campaign(conn, campaign_id)


async def start_due(conn: Queryable) -> list[int]:
    """Scheduled campaigns whose time has come become running; returns their ids."""
    rows = await conn.fetch(
        """UPDATE campaigns SET status = 'running', started_at = coalesce(started_at, now()), updated_at = now()
           WHERE status = 'scheduled' AND schedule_at <= now() RETURNING id""")
    return [r["id"] for r in rows]


async def running_ids(conn: Queryable) -> list[int]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM campaigns WHERE status = 'running' ORDER BY id")]


async def status_of(conn: Queryable, campaign_id: int) -> str | None:
    return await conn.fetchval("SELECT status FROM campaigns WHERE id = $1", campaign_id)  # type: ignore[no-any-return]


async def campaign_for_run(conn: Queryable, campaign_id: int) -> dict[str, Any] | None:
    """What a runner needs: the campaign row and its account ids."""
    row = await conn.fetchrow(f"SELECT {CAMPAIGN_COLUMNS}, created_by FROM campaigns WHERE id = $1", campaign_id)
    if row is None:
        return None
    accounts = await conn.fetch(
        "SELECT account_id FROM campaign_accounts WHERE campaign_id = $1 ORDER BY account_id", campaign_id)
    return _campaign(row, None, [r["account_id"] for r in accounts])


def _options(options: Any) -> dict[str, Any]:
    if isinstance(options, str):
        return dict(json.loads(options))
    return dict(options or {})


async def set_held_back(conn: Queryable, campaign_id: int, held_back: Mapping[str, Any] | None) -> None:
    """What holds a running campaign back (every account waits on a limit: which, and until when),
    or None once it moves again."""
    await conn.execute(
        """UPDATE campaigns SET held_back = $2::jsonb, updated_at = now()
           WHERE id = $1 AND held_back IS DISTINCT FROM $2::jsonb""",
        campaign_id, json.dumps(dict(held_back)) if held_back is not None else None)


async def finish(conn: Queryable, campaign_id: int, status: CampaignStatus = CampaignStatus.COMPLETED,
                 error: str | None = None) -> bool:
    """A running campaign ends (completed or failed); False if it was not running any more."""
    result = await conn.execute(
        """UPDATE campaigns SET status = $2, error = $3, finished_at = now(), updated_at = now(), held_back = NULL
           WHERE id = $1 AND status = 'running'""",
        campaign_id, status, error)
    return result.endswith(" 1")


async def complete_if_done(pool: asyncpg.Pool, campaign_id: int) -> bool:
    """A running campaign with nothing left becomes completed; False if work is left or it is not
    running. The campaign row is locked first, as an import of recipients locks it for its whole
    transaction: the check after the lock sees what that import added, so recipients imported while
    the last messages went out are never left pending in a completed campaign."""
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.fetchval("SELECT status FROM campaigns WHERE id = $1 FOR UPDATE", campaign_id)
        if status != CampaignStatus.RUNNING or await unfinished_work(conn, campaign_id):
            return False
        return await finish(conn, campaign_id, CampaignStatus.COMPLETED)


async def unfinished_work(conn: Queryable, campaign_id: int) -> bool:
    """Is anything left: a pending recipient, or a message not yet sent, failed or cancelled?"""
    return bool(await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM campaign_recipients WHERE campaign_id = $1 AND status = 'pending')
               OR EXISTS (SELECT 1 FROM messages WHERE campaign_id = $1 AND status IN ('queued', 'sending'))""",
        campaign_id))


# -- handing recipients to accounts ---------------------------------------------------------------------

async def queued_for(conn: Queryable, campaign_id: int, account_id: int, limit: int,
                     exclude: Sequence[int] = ()) -> list[dict[str, Any]]:
    """The account's campaign messages waiting to be sent (due now), oldest first."""
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS}, random_id, campaign_id, recipient_id FROM messages
            WHERE campaign_id = $1 AND account_id = $2 AND status = 'queued' AND not_before <= now()
              AND NOT (id = ANY($4::bigint[]))
            ORDER BY id LIMIT $3""",
        campaign_id, account_id, limit, list(exclude))
    return [message_dict(r) for r in rows]


async def assign_batch(pool: asyncpg.Pool, campaign: Mapping[str, Any], account_id: int,
                       limit: int) -> tuple[list[dict[str, Any]], int]:
    """Give up to `limit` pending recipients to `account_id` as queued messages: `assign_batches`
    for one account."""
    return (await assign_batches(pool, campaign, [(account_id, limit)]))[0]


async def assign_batches(pool: asyncpg.Pool, campaign: Mapping[str, Any], wants: Sequence[tuple[int, int]],
                         share: float = 1.0) -> list[tuple[list[dict[str, Any]], int]]:
    """Give pending recipients to several accounts at once, as queued messages: to each
    (account_id, limit) of `wants` in turn, the next `limit` recipients in the campaign's order.

    `share` is the part of the campaign's accounts these wants speak for (a member running some of
    them, worker/campaigns.py). With fewer recipients pending than the campaign's accounts would take
    in one refill each (its tail), this takes only that part of them, shared among `wants` by their
    limits: the campaign's other members, and the accounts after these, still get theirs.

    Opted-out recipients are marked skipped instead (counted in their account's share), and one whose
    values make the text invalid gets a failed message. Returns, per entry of `wants`: (the queued
    messages created, oldest first, as `queued_for` returns them; how many of its recipients were
    skipped or failed instead: taken all the same, so more may be pending). Two statements in one
    transaction, however many accounts and recipients: a thousand accounts refilling every few
    seconds must not cost a transaction each."""
    campaign_id = campaign["id"]
    async with pool.acquire() as conn, conn.transaction():
        # Serialised with pause/cancel (FOR UPDATE there): no message is made for a stopped campaign.
        # KEY SHARE, not SHARE: concurrent batches may still update the campaign's counters.
        wanted = sum(limit for _, limit in wants)
        # What every account of the campaign would take (bounded: a count of at most that many rows).
        whole = math.ceil(wanted / share) if share > 0 else wanted
        rows = await conn.fetch(
            """WITH pending AS (SELECT count(*) AS n FROM (
                                   SELECT 1 FROM campaign_recipients
                                   WHERE campaign_id = $1 AND status = 'pending' LIMIT $3) AS p)
               SELECT r.id, r.peer, r.variables, (o.peer_key IS NOT NULL) AS opted_out
               FROM campaign_recipients r LEFT JOIN optouts o ON o.peer_key = r.peer_key
               WHERE r.campaign_id = $1 AND r.status = 'pending'
                 AND EXISTS (SELECT 1 FROM campaigns c WHERE c.id = $1 AND c.status = 'running' FOR KEY SHARE)
               ORDER BY r.id
               LIMIT (SELECT CASE WHEN n >= $3 THEN $2 ELSE least($2, ceil(n * $4::float8)::int) END FROM pending)
               FOR UPDATE OF r SKIP LOCKED""",
            campaign_id, wanted, whole, share)
        if not rows:
            return [([], 0) for _ in wants]
        shares = _shares([limit for _, limit in wants], len(rows))  # each row's entry of `wants`
        skipped: list[int] = []
        set_aside = [0] * len(wants)  # each entry's recipients skipped or failed
        owners, accounts, ids, peers, texts, entities, statuses = [], [], [], [], [], [], []
        errors: list[str | None] = []
        for r, owner in zip(rows, shares, strict=False):
            if r["opted_out"]:
                skipped.append(r["id"])
                set_aside[owner] += 1
                continue
            variables = r["variables"]
            if isinstance(variables, str):
                variables = json.loads(variables)
            owners.append(owner)
            accounts.append(wants[owner][0])
            ids.append(r["id"])
            peers.append(r["peer"])
            try:
                message = compose(campaign["template"], variables, r["peer"], campaign.get("parse_mode"))
            except ContentInvalid as exc:  # this recipient's values made it too long, or empty
                rendered = render(campaign["template"], variables, r["peer"])
                texts.append(rendered[:MAX_TEXT] if rendered.strip() else "-")
                entities.append("[]")
                statuses.append(MessageStatus.FAILED)
                errors.append(exc.message)
                continue
            texts.append(message.text)
            entities.append(json.dumps(message.entities_json(), ensure_ascii=False))
            statuses.append(MessageStatus.QUEUED)
            errors.append(None)
        # The messages, their recipients assigned (or skipped, counted) and the campaign's files
        # with each message, in one statement.
        created = await conn.fetch(
            f"""WITH created AS (
                    INSERT INTO messages (account_id, peer, text, status, error, error_class, campaign_id,
                                          recipient_id, created_by, entities, options)
                    SELECT a, p, t, s, e, CASE WHEN e IS NULL THEN NULL ELSE 'permanent' END, $2, r, $3,
                           n::jsonb, $10::jsonb
                    FROM unnest($1::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[],
                                $9::text[]) AS x(a, r, p, t, s, e, n)
                    ORDER BY r
                    RETURNING {MESSAGE_COLUMNS}, random_id, campaign_id, recipient_id),
                assigned AS (
                    UPDATE campaign_recipients r SET status = 'assigned', message_id = created.id
                    FROM created WHERE r.id = created.recipient_id),
                skipped AS (
                    UPDATE campaign_recipients SET status = 'skipped' WHERE id = ANY($11::bigint[])),
                counted AS (
                    UPDATE campaigns SET skipped = skipped + cardinality($11::bigint[]), updated_at = now()
                    WHERE id = $2 AND cardinality($11::bigint[]) > 0),
                files AS (
                    INSERT INTO message_files (message_id, position, file_id, kind)
                    SELECT created.id, cf.position, cf.file_id, cf.kind
                    FROM created CROSS JOIN campaign_files cf WHERE cf.campaign_id = $2)
                SELECT * FROM created ORDER BY id""",
            accounts, campaign_id, campaign.get("created_by"), ids, peers, texts, statuses, errors, entities,
            json.dumps(_options(campaign.get("options"))), skipped)
    owner_of = dict(zip(ids, owners, strict=True))
    made: list[list[dict[str, Any]]] = [[] for _ in wants]
    for r in created:
        if r["status"] == MessageStatus.QUEUED:
            made[owner_of[r["recipient_id"]]].append(message_dict(r))
        else:
            set_aside[owner_of[r["recipient_id"]]] += 1
    return list(zip(made, set_aside, strict=True))


def _shares(limits: Sequence[int], rows: int) -> list[int]:
    """Which entry of `limits` each of `rows` rows goes to, in order: each its limit when there
    are enough rows; else each a part in proportion to its limit (at least one row each while
    they last), so no account is left without while the first ones fill up."""
    if rows >= sum(limits):
        return [i for i, limit in enumerate(limits) for _ in range(limit)]
    total = sum(limits)
    parts = [max(1, rows * limit // total) if limit else 0 for limit in limits]
    while sum(parts) > rows:  # the "at least one" made too many: the last ones go without
        last = max(i for i, part in enumerate(parts) if part)
        parts[last] -= 1
    for i in itertools.cycle(range(len(limits))):  # the rounding's remainder, one each in turn
        if sum(parts) >= rows:
            break
        if parts[i] < limits[i]:
            parts[i] += 1
    return [i for i, part in enumerate(parts) for _ in range(part)]


async def release_account(conn: Queryable, campaign_id: int, account_id: int) -> int:
    """Hand an account's queued campaign messages back as pending recipients, for the campaign's
    other accounts; returns how many. Only those no attempt may have delivered: a message whose
    outcome was unknown stays with its account, the only one whose re-send Telegram recognises."""
    released = await conn.fetchval(
        """WITH gone AS (
               DELETE FROM messages WHERE campaign_id = $1 AND account_id = $2 AND status = 'queued'
                                      AND NOT delivery_unknown
               RETURNING recipient_id),
           back AS (
               UPDATE campaign_recipients SET status = 'pending', message_id = NULL
               WHERE id IN (SELECT recipient_id FROM gone) RETURNING 1)
           SELECT count(*) FROM back""",
        campaign_id, account_id)
    return int(released)


async def accounts_that_may_send(conn: Queryable, account_ids: Sequence[int]) -> list[int]:
    """Those of the accounts that PostgreSQL shows able to send: logged in (ready, or closed by a
    restart) and not held by PEER_FLOOD. What a campaign runner judges the accounts other hosts run by."""
    rows = await conn.fetch(
        """SELECT id FROM accounts WHERE id = ANY($1::bigint[]) AND auth_state IN ('ready', 'closed')
                                     AND (peer_flood_until IS NULL OR peer_flood_until <= now())
           ORDER BY id""",
        list(account_ids))
    return [int(r["id"]) for r in rows]


async def fail_stranded(conn: Queryable, campaign_id: int, account_id: int, why: str) -> int:
    """Messages an unusable account cannot hand back (an earlier attempt may have been delivered,
    and only this account's re-send would be recognised): failed, outcome unknown."""
    result = await conn.execute(
        """UPDATE messages SET status = 'failed', error_class = 'unknown',
                  error = 'outcome unknown, and the account can no longer re-send it: ' || $3, updated_at = now()
           WHERE campaign_id = $1 AND account_id = $2 AND status = 'queued' AND delivery_unknown""",
        campaign_id, account_id, why)
    return int(result.rsplit(" ", 1)[-1])


async def list_recipients(conn: Queryable, campaign_id: int, *, status: str | None, after_id: int | None,
                          limit: int) -> list[dict[str, Any]]:
    """Recipients in import order, each with its message's status (if it has one yet)."""
    if await conn.fetchval("SELECT 1 FROM campaigns WHERE id = $1", campaign_id) is None:
        raise NotFound(f"campaign {campaign_id} not found")
    rows = await conn.fetch(
        """SELECT r.id, r.peer, r.variables, r.status, r.message_id, m.status AS message_status, m.error
           FROM campaign_recipients r LEFT JOIN messages m ON m.id = r.message_id
           WHERE r.campaign_id = $1 AND ($2::text IS NULL OR r.status = $2) AND ($3::bigint IS NULL OR r.id > $3)
           ORDER BY r.id LIMIT $4""",
        campaign_id, status, after_id, limit)
    items = []
    for row in rows:
        item = dict(row)
        if isinstance(item["variables"], str):
            item["variables"] = json.loads(item["variables"])
        items.append(item)
    return items
