"""The status enums: the database's CHECK constraints, the API's schemas and the enums name the same
states, the queue's job statuses are RQ's, and a member travels as its plain string."""

from __future__ import annotations

import ast
import json
import re
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import get_args

import asyncpg
import msgspec
import pytest
import rq.job

from telegram_platform import events, states
from telegram_platform.api.schemas import accounts as account_schemas
from telegram_platform.api.schemas import campaigns as campaign_schemas
from telegram_platform.api.schemas import hosts as host_schemas
from telegram_platform.api.schemas import messages as message_schemas
from telegram_platform.api.schemas import webhooks as webhook_schemas
from telegram_platform.queue import job_status
from telegram_platform.queue.job_status import JobStatus
from telegram_platform.states import (
    CampaignStatus,
    HostState,
    MessageStatus,
    RecipientStatus,
    WebhookBreakerState,
    WebhookDeliveryStatus,
)
from telegram_platform.telegram.base import AuthState

# table -> the enum of its `status` column
STATUS_COLUMNS: dict[str, type[StrEnum]] = {
    "messages": MessageStatus,
    "campaigns": CampaignStatus,
    "campaign_recipients": RecipientStatus,
    "webhook_deliveries": WebhookDeliveryStatus,
}


async def _checked_statuses(conn: asyncpg.Connection, table: str, column: str = "status") -> set[str]:
    """The values the CHECK constraint on `table.column` allows, as the migrated database has it."""
    definitions = [r["def"] for r in await conn.fetch(
        """SELECT pg_get_constraintdef(c.oid) AS def FROM pg_constraint c
           WHERE c.conrelid = $1::regclass AND c.contype = 'c'""", table)]
    (status_check,) = [d for d in definitions if re.search(rf"\b{column}\b", d)]
    return set(re.findall(r"'([^']*)'", status_check))


async def test_enums_are_the_databases_check_constraints(db: asyncpg.Pool) -> None:
    """Each status enum has exactly the values its table's CHECK constraint allows."""
    async with db.acquire() as conn:
        for table, enum in STATUS_COLUMNS.items():
            assert {m.value for m in enum} == await _checked_statuses(conn, table), table
        assert {m.value for m in WebhookBreakerState} == await _checked_statuses(conn, "webhooks", "breaker_state")


def test_api_schemas_name_the_same_statuses() -> None:
    """The API's Literal status and state types (kept for the OpenAPI document) list the enums' values, in order."""
    assert get_args(message_schemas.MessageStatus) == tuple(MessageStatus)
    assert get_args(campaign_schemas.CampaignStatus) == tuple(CampaignStatus)
    assert get_args(campaign_schemas.RecipientStatus) == tuple(RecipientStatus)
    assert get_args(webhook_schemas.DeliveryStatus) == tuple(WebhookDeliveryStatus)
    assert get_args(webhook_schemas.BreakerState) == tuple(WebhookBreakerState)
    assert get_args(account_schemas.AuthStateName) == tuple(AuthState)
    assert get_args(host_schemas.HostStateName) == tuple(HostState)


def test_groups_partition_the_message_statuses() -> None:
    """Every message status is either pending or final, never both."""
    assert set(MessageStatus) == MessageStatus.PENDING | MessageStatus.FINAL
    assert not MessageStatus.PENDING & MessageStatus.FINAL


def test_a_member_encodes_as_its_plain_string() -> None:
    """An event payload (json) and an API response (msgspec) carry the value, not the enum's name."""
    event = json.loads(events.encode_event("message.status", {"status": MessageStatus.SENT}))
    assert event["data"] == {"status": "sent"}
    assert msgspec.json.encode({"status": CampaignStatus.RUNNING}) == b'{"status":"running"}'
    assert {"sent": True}[MessageStatus.SENT] and "sent" in MessageStatus.FINAL  # equal, and hashed alike


def test_job_statuses_are_rqs() -> None:
    """The queue's job statuses are RQ's own values, so RQ's tools read the job hashes this queue writes."""
    assert {m.value for m in JobStatus} <= {m.value for m in rq.job.JobStatus}


@pytest.mark.parametrize("module", [states, job_status], ids=lambda m: m.__name__)
def test_status_modules_are_leaves(module: ModuleType) -> None:
    """The status modules import nothing from the package, so every layer may import them."""
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    named = [name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
             for name in [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
             if name.startswith("telegram_platform")]
    assert relative == [] and named == []
