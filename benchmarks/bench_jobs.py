"""The no-op job every queue benchmark runs: RQ's workers import it by name (`bench_jobs.noop`)."""


def noop() -> None:
    """Do nothing: the benchmark measures the queue, not the job."""
