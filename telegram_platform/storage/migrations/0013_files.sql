-- Files clients upload (POST /api/files) and messages carry, de-duplicated by their content's
-- SHA-256. The bytes live in a blob store named by `storage` (PostgreSQL large objects, `pg`: the
-- large object's oid in `blob_ref`), reachable from every host that may own an account. Retention
-- deletes files unused for TP_FILE_RETENTION_DAYS (last_used_at), never one a message still waiting
-- to be sent carries, nor one a campaign that may still send carries.

CREATE TABLE files (
    id            bigserial PRIMARY KEY,
    sha256        text NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size          bigint NOT NULL CHECK (size >= 0),
    mime_type     text NOT NULL,
    file_name     text NOT NULL,
    width         integer,
    height        integer,
    duration      integer,
    storage       text NOT NULL DEFAULT 'pg',
    blob_ref      text NOT NULL,
    created_by    bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_last_used ON files (last_used_at);

-- Telegram's id of a file, per account (a remote id is valid for the account that received it):
-- later sends of the same file by that account reuse it instead of uploading the bytes again.
CREATE TABLE file_remote_ids (
    file_id     bigint NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    remote_id   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (file_id, account_id)
);

-- The files a message carries, in order (one, or an album's 2 to 10), with the kind each is sent as.
CREATE TABLE message_files (
    message_id  bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position    smallint NOT NULL CHECK (position >= 0),
    file_id     bigint NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('photo', 'video', 'document', 'audio', 'voice', 'animation',
                                              'sticker')),
    PRIMARY KEY (message_id, position)
);
CREATE INDEX message_files_file ON message_files (file_id);

-- The files a campaign's message carries, copied to each of its messages (message_files) as they are made.
CREATE TABLE campaign_files (
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    position     smallint NOT NULL CHECK (position >= 0),
    file_id      bigint NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('photo', 'video', 'document', 'audio', 'voice', 'animation',
                                               'sticker')),
    PRIMARY KEY (campaign_id, position)
);
CREATE INDEX campaign_files_file ON campaign_files (file_id);

-- The Telegram message ids of a send beyond the first (an album is one message per item);
-- messages.telegram_message_id keeps the first.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS telegram_message_ids bigint[];

-- An incoming message's attachment, once downloaded through its account (GET /api/incoming/{id}/file):
-- the second download is served from the store.
CREATE TABLE incoming_files (
    incoming_id  bigint PRIMARY KEY REFERENCES incoming_messages (id) ON DELETE CASCADE,
    file_id      bigint NOT NULL REFERENCES files (id) ON DELETE CASCADE
);
