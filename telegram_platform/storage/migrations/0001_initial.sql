-- Users of the API, their refresh tokens, Telegram accounts and the message outbox.

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Refresh tokens are opaque ids checked here, so they can be revoked one by one.
CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE accounts (
    id                bigserial PRIMARY KEY,
    phone             text NOT NULL UNIQUE,
    auth_state        text NOT NULL DEFAULT 'wait_phone',
    connection_state  text,
    proxy             jsonb,
    telegram_user_id  bigint,
    -- A 429 "retry after N" pauses the account until then; PEER_FLOOD stops cold sends.
    paused_until      timestamptz,
    peer_flood_until  timestamptz,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The outbox: PostgreSQL is the record of truth for every message; Redis only carries work.
CREATE TABLE messages (
    id                   bigserial PRIMARY KEY,
    account_id           bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    peer                 text NOT NULL,
    text                 text NOT NULL,
    status               text NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'cancelled')),
    attempts             integer NOT NULL DEFAULT 0,
    error                text,
    error_class          text,
    telegram_message_id  bigint,
    idempotency_key      text,
    created_by           bigint REFERENCES users (id) ON DELETE SET NULL,
    -- Not to be sent before this moment (retries, flood waits).
    not_before           timestamptz NOT NULL DEFAULT now(),
    -- Who claimed the send, and when: a claim is what makes a duplicated job harmless.
    claimed_by           text,
    claimed_at           timestamptz,
    sent_at              timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX messages_idempotency ON messages (created_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_due ON messages (not_before) WHERE status IN ('queued', 'sending');
CREATE INDEX messages_account ON messages (account_id, id);
CREATE INDEX messages_status ON messages (status, id);

-- Messages received by the accounts, as the update processor stores them.
CREATE TABLE incoming_messages (
    id                   bigserial PRIMARY KEY,
    account_id           bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    chat_id              bigint NOT NULL,
    telegram_message_id  bigint NOT NULL,
    sender               text NOT NULL,
    text                 text NOT NULL,
    received_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, chat_id, telegram_message_id)
);
