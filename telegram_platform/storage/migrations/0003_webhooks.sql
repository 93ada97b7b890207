-- Outbound webhooks: which events an external system wants, and every delivery's outcome.

CREATE TABLE webhooks (
    id                bigserial PRIMARY KEY,
    url               text NOT NULL,
    -- Event types ('message.status'), prefixes ('message.*') or '*' for every event.
    events            text[] NOT NULL DEFAULT '{*}',
    -- The HMAC-SHA256 signing key, sealed with a key derived from ENCRYPTION_KEY (AES-GCM).
    secret_sealed     bytea NOT NULL,
    description       text NOT NULL DEFAULT '',
    active            boolean NOT NULL DEFAULT true,
    created_by        bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id                bigserial PRIMARY KEY,
    webhook_id        bigint NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    -- SHA-256 of the event as published: every worker child sees every event, one inserts it.
    event_key         bytea NOT NULL,
    event_type        text NOT NULL,
    payload           jsonb NOT NULL,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    response_status   integer,
    error             text,
    next_attempt_at   timestamptz,
    delivered_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (webhook_id, event_key)
);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
