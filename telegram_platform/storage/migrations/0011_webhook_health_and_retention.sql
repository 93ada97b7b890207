-- Webhook health: a circuit breaker per webhook (worker/webhooks.py), and the indexes and counters
-- the retention purge (worker/retention.py) needs to delete finished rows in small batches.

-- closed: delivering. open: paused after failing for long; its deliveries stay pending, held.
-- half_open: the cool-down is over; one probe delivery (probe_delivery_id) is tried.
-- paused_until: when an open breaker is probed next, or a half-open one's probe is given up as lost.
-- release_held: the breaker closed; the held deliveries are to be enqueued again.
ALTER TABLE webhooks
    ADD COLUMN breaker_state         text NOT NULL DEFAULT 'closed'
                                     CHECK (breaker_state IN ('closed', 'open', 'half_open')),
    ADD COLUMN consecutive_failures  integer NOT NULL DEFAULT 0,
    ADD COLUMN failing_since         timestamptz,
    ADD COLUMN paused_at             timestamptz,
    ADD COLUMN paused_until          timestamptz,
    ADD COLUMN probe_delivery_id     bigint,
    ADD COLUMN release_held          boolean NOT NULL DEFAULT false;

-- A webhook's pending deliveries, oldest first: the probe, and the release of held deliveries.
CREATE INDEX webhook_deliveries_pending_by_webhook ON webhook_deliveries (webhook_id, id) WHERE status = 'pending';
-- Finished deliveries by age.
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (created_at) WHERE status <> 'pending';
-- Incoming messages by age.
CREATE INDEX incoming_messages_received ON incoming_messages (received_at);
-- Settled messages by age.
CREATE INDEX messages_settled ON messages (updated_at) WHERE status IN ('sent', 'failed', 'cancelled');
-- Deleting a message sets its recipient's message_id to NULL (ON DELETE SET NULL): without this
-- index, each deleted message would scan every campaign recipient.
CREATE INDEX campaign_recipients_message ON campaign_recipients (message_id) WHERE message_id IS NOT NULL;
-- Refresh tokens by expiry and by the time they were spent (whether a family still has a live
-- token is answered by refresh_tokens_family, migration 0008).
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_spent ON refresh_tokens (revoked_at) WHERE revoked_at IS NOT NULL;

-- A campaign's progress counts its messages; those the purge deleted are counted here instead.
ALTER TABLE campaigns
    ADD COLUMN purged_sent       integer NOT NULL DEFAULT 0,
    ADD COLUMN purged_failed     integer NOT NULL DEFAULT 0,
    ADD COLUMN purged_cancelled  integer NOT NULL DEFAULT 0;
