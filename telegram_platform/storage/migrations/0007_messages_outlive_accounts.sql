-- A removed account's messages stay, with account_id NULL: the record of what was sent, and the
-- progress of the campaigns it sent for, do not change when an account goes. Before the account's
-- row is deleted, its messages that could still go out are handed to its campaigns' other accounts
-- or cancelled (storage/accounts.py, delete_account), so no queued message is left without one.

ALTER TABLE messages ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE messages DROP CONSTRAINT messages_account_id_fkey;
ALTER TABLE messages ADD CONSTRAINT messages_account_id_fkey
    FOREIGN KEY (account_id) REFERENCES accounts (id) ON DELETE SET NULL;
