-- Incoming messages keep Telegram's own date for the message (received_at is when the platform
-- stored it, which a retried store can make later), and are listed per account newest first or
-- read forward from the last id a client saw (GET /api/incoming).

ALTER TABLE incoming_messages ADD COLUMN sent_at timestamptz;
CREATE INDEX incoming_messages_account_id ON incoming_messages (account_id, id);
