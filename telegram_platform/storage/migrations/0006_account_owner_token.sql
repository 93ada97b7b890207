-- The fencing token of the Telegram host whose writes of an account's state count. A host that
-- takes an account's lease (Redis) then increments it here, and writes the account's auth and
-- connection state only where it still matches: a host that lost the lease without noticing (paused
-- past the lease's TTL) cannot overwrite what the new owner wrote. Kept in PostgreSQL so that it
-- keeps growing when Redis loses its keys.

ALTER TABLE accounts ADD COLUMN owner_token bigint NOT NULL DEFAULT 0;
