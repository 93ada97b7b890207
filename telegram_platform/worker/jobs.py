"""Names of the jobs the worker runs, as they appear in RQ's `func` field and in `rq info`."""

SEND_MESSAGE = "telegram_platform.worker.jobs.send_message"
# One job per running campaign (not one per message): it paces all of the campaign's accounts.
RUN_CAMPAIGN = "telegram_platform.worker.jobs.run_campaign"


def message_job_id(message_id: int) -> str:
    """One job id per message: re-enqueueing replaces rather than multiplies its job."""
    return f"msg-{message_id}"


def campaign_job_id(campaign_id: int) -> str:
    """One job id per campaign: starting, resuming and reconciling never make a second one."""
    return f"campaign-{campaign_id}"
