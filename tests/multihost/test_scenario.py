"""Issue 28's check, run as it is written (tests/multihost/scenario.py): three hosts in network
namespaces on shared PostgreSQL and a Redis with three Sentinels; 9 accounts logged in through the
emulator and spread over the hosts; a 5,000-recipient campaign over them; one host killed (kill -9 of
its whole process tree) mid-way, later the Redis master killed (Sentinel fails over), and a second
host cut off the network for 20 s, then restored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from multihost.rig import Rig, unavailable
from multihost.scenario import PASSWORD, USERNAME, Plan, Scenario, judge

pytestmark = [pytest.mark.multihost, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


@pytest.fixture
def rig() -> Iterator[Rig]:
    """Three hosts, a Redis master with two replicas and three sentinels, and an admin user."""
    with Rig(3, sentinels=3, admin=(USERNAME, PASSWORD)) as rig:
        yield rig


def test_issue_28_scenario(rig: Rig) -> None:
    """The campaign completes through a host's death, a Redis failover and a host cut off for 20 s;
    Telegram received every recipient's message exactly once; no account logged in again; `tp hosts`
    shows the dead host gone and its accounts owned by the others."""
    plan = Plan()
    outcome = Scenario(rig, plan, say=print).run()
    verdicts = judge(outcome, plan, list(rig.hosts))
    assert len(verdicts) == 6
    failed = [f"{v.claim}: {v.detail}" for v in verdicts if not v.ok]
    assert not failed, "\n".join(failed)
    print(f"issue 28 scenario: {plan.recipients} recipients in {outcome.sent_seconds:.1f} s; Sentinel failed "
          f"over in {outcome.failover_seconds:.1f} s")
