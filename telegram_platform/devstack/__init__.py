"""The development stack: embedded PostgreSQL and Redis, service users, generated secrets, and the
supervisord programs scripts/run writes for them; throwaway servers for the tests.

Never imported by the platform's programs (tp-api, tp-worker, tp, the listener): only by scripts/run
(`python -m telegram_platform.devstack ...`), the test harness and the benchmarks. Importing it has
no side effects.
"""
