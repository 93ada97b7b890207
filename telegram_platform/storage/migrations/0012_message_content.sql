-- Messages whole (issue 25, the text side). A message carries its parsed text's entities (the Bot
-- API's JSON, UTF-16 offsets), its send options and the Telegram id of the message it replies to,
-- with the platform's own reference to that message (a sent message or an incoming one).
--
-- Forwards, edits and deletions go through the outbox as rows of their own: `action` says which,
-- `target_id` names the message acted on. Such a row is claimed and settled like a send, so each
-- has its idempotency key, its single effect and its events; the Telegram ids it acted on (or, for a
-- forward, made) are `telegram_message_ids`.
--
-- Read receipts move sent messages to `read`.

ALTER TABLE messages
    ADD COLUMN entities jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN options jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN reply_to bigint,
    ADD COLUMN reply_to_message_id bigint REFERENCES messages (id) ON DELETE SET NULL,
    ADD COLUMN reply_to_incoming_id bigint REFERENCES incoming_messages (id) ON DELETE SET NULL,
    ADD COLUMN action text NOT NULL DEFAULT 'send' CHECK (action IN ('send', 'forward', 'edit', 'delete')),
    ADD COLUMN target_id bigint REFERENCES messages (id) ON DELETE SET NULL,
    ADD COLUMN telegram_message_ids bigint[],
    ADD COLUMN chat_id bigint,
    ADD COLUMN edited_at timestamptz,
    ADD COLUMN deleted_at timestamptz,
    ADD COLUMN read_at timestamptz;
CREATE INDEX messages_target ON messages (target_id) WHERE target_id IS NOT NULL;
-- Read receipts name a chat and the last message read in it.
CREATE INDEX messages_chat ON messages (account_id, chat_id, telegram_message_id) WHERE chat_id IS NOT NULL;

ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('queued', 'sending', 'sent', 'read', 'failed', 'cancelled'));

-- Incoming messages whole: entities, the message replied to, who a forward came from, the kind of
-- message (text here; the media kinds and their metadata in `media`), later edits and deletions, and
-- when the account read it.
ALTER TABLE incoming_messages
    ADD COLUMN entities jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN reply_to bigint,
    ADD COLUMN forward_from jsonb,
    ADD COLUMN kind text NOT NULL DEFAULT 'text',
    ADD COLUMN media jsonb,
    ADD COLUMN edited_at timestamptz,
    ADD COLUMN deleted_at timestamptz,
    -- When the account marked it read at Telegram (POST /api/incoming/{id}/read).
    ADD COLUMN read_at timestamptz;

-- Campaigns carry formatted messages: the template's parse mode (its variables' values are escaped
-- for it before parsing) and the send options; and, while every account of a running campaign waits
-- on a limit, what holds it back ({"limit", "detail", "account_id", "resumes_at"}).
ALTER TABLE campaigns
    ADD COLUMN parse_mode text CHECK (parse_mode IN ('markdown', 'html')),
    ADD COLUMN options jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN held_back jsonb;
