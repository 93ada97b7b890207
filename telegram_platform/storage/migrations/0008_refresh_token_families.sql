-- Refresh tokens are kept as the SHA-256 of the token, never the token: a copy of this table opens
-- no session. Each carries its family, every token descended from one login, so that a spent token
-- presented again (stolen, or the victim's copy after the thief used it) revokes them all.
--
-- Until now the token was the row's id (its text form). Those tokens keep working: each is hashed
-- here as the client holds it, the row gets a new id, and each is a family of its own.
ALTER TABLE refresh_tokens ADD COLUMN token_hash bytea;
ALTER TABLE refresh_tokens ADD COLUMN family_id uuid;
UPDATE refresh_tokens
   SET token_hash = sha256(convert_to(id::text, 'UTF8')), family_id = gen_random_uuid(), id = gen_random_uuid();
ALTER TABLE refresh_tokens ALTER COLUMN token_hash SET NOT NULL;
ALTER TABLE refresh_tokens ALTER COLUMN family_id SET NOT NULL;
CREATE UNIQUE INDEX refresh_tokens_hash ON refresh_tokens (token_hash);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id) WHERE revoked_at IS NULL;
