-- Campaigns, their recipients, the opt-out list and per-account sending limits; and on every
-- message the random_id that makes a re-send of the same message recognisable to Telegram.

-- MTProto's random_id: chosen once per message, kept for every attempt. Telegram drops a second
-- message with a random_id it already accepted from the same account, so re-sending a message whose
-- outcome is unknown cannot deliver it twice (docs/delivery-guarantees.md).
-- delivery_unknown: some attempt may have reached Telegram (no answer, or the worker died during
-- it); such a message is only ever re-sent with its random_id, from its own account.
ALTER TABLE messages
    ADD COLUMN random_id bigint NOT NULL DEFAULT (floor(random() * 4611686018427387903)::bigint + 1),
    ADD COLUMN delivery_unknown boolean NOT NULL DEFAULT false;

CREATE TABLE campaigns (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL,
    template         text NOT NULL,
    status           text NOT NULL DEFAULT 'draft'
                     CHECK (status IN ('draft', 'scheduled', 'running', 'paused', 'completed', 'cancelled',
                                       'failed')),
    schedule_at      timestamptz,
    -- Recipients imported so far (kept here so progress needs no count of them).
    total            integer NOT NULL DEFAULT 0,
    -- Recipients skipped because they opted out (counted when they come up for sending).
    skipped          integer NOT NULL DEFAULT 0,
    idempotency_key  text,
    created_by       bigint REFERENCES users (id) ON DELETE SET NULL,
    error            text,
    started_at       timestamptz,
    finished_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX campaigns_idempotency ON campaigns (created_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX campaigns_due ON campaigns (schedule_at) WHERE status = 'scheduled';
CREATE INDEX campaigns_running ON campaigns (id) WHERE status = 'running';

CREATE TABLE campaign_accounts (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    account_id   bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    PRIMARY KEY (campaign_id, account_id)
);

-- One row per (campaign, recipient), ever: the peer is normalised into peer_key (usernames are
-- case-insensitive, phones keep only digits) so "@Alice" and "@alice" are one recipient.
-- pending: not yet given a message; assigned: its message exists (message_id); skipped: opted out.
CREATE TABLE campaign_recipients (
    id           bigserial PRIMARY KEY,
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    peer         text NOT NULL,
    peer_key     text NOT NULL,
    variables    jsonb NOT NULL DEFAULT '{}'::jsonb,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'assigned', 'skipped')),
    message_id   bigint REFERENCES messages (id) ON DELETE SET NULL,
    UNIQUE (campaign_id, peer_key)
);
CREATE INDEX campaign_recipients_pending ON campaign_recipients (campaign_id, id) WHERE status = 'pending';

-- A campaign's messages live in the outbox like any other, bound to their recipient: the unique
-- index is the "one send per (campaign, recipient)" rule, enforced by the database.
ALTER TABLE messages
    ADD COLUMN campaign_id   bigint REFERENCES campaigns (id) ON DELETE SET NULL,
    ADD COLUMN recipient_id  bigint REFERENCES campaign_recipients (id) ON DELETE SET NULL;
CREATE UNIQUE INDEX messages_one_per_recipient ON messages (recipient_id) WHERE recipient_id IS NOT NULL;
CREATE INDEX messages_campaign ON messages (campaign_id, status) WHERE campaign_id IS NOT NULL;
CREATE INDEX messages_campaign_queued ON messages (campaign_id, account_id, id)
    WHERE campaign_id IS NOT NULL AND status = 'queued';
-- Sends in the last 24 hours per account (daily limits).
CREATE INDEX messages_account_sent ON messages (account_id, sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX messages_sending ON messages (claimed_at) WHERE status = 'sending';

-- Peers who asked not to be messaged: every campaign skips them.
CREATE TABLE optouts (
    peer_key    text PRIMARY KEY,
    peer        text NOT NULL,
    reason      text,
    created_by  bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Sending limits per account, as the operator set them; an account without a row uses the
-- conservative defaults in storage/limits.py. The campaign engine paces every account to these.
CREATE TABLE account_limits (
    account_id            bigint PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    per_second            double precision NOT NULL CHECK (per_second > 0),
    burst                 integer NOT NULL CHECK (burst >= 1),
    per_chat_seconds      double precision NOT NULL CHECK (per_chat_seconds >= 0),
    per_day               integer NOT NULL CHECK (per_day >= 0),
    warmup_days           integer NOT NULL CHECK (warmup_days >= 0),
    warmup_start_per_day  integer NOT NULL CHECK (warmup_start_per_day >= 0),
    -- The warm-up ramp starts here (NULL: when the account was added).
    warmup_from           timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
