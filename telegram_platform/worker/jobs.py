"""Names of the jobs the worker runs, as they appear in RQ's `func` field and in `rq info`."""

SEND_MESSAGE = "telegram_platform.worker.jobs.send_message"


def message_job_id(message_id: int) -> str:
    """One job id per message: re-enqueueing replaces rather than multiplies its job."""
    return f"msg-{message_id}"
