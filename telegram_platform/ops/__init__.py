"""Operating the platform under supervisord: its XML-RPC client, the tp-events listener (restarts with
back-off, memory watchdogs), restarts and rolling reloads, the restart book, API members' readiness,
process snapshots and health status, `tp check` and the production profile's refusals. The
development stack lives in devstack/, the metrics in metrics/."""
