-- The platform's hosts (docs/scaling.md): each worker child of a host writes last_seen every few
-- seconds with PostgreSQL's clock, so one clock judges every host and a host that stopped stays
-- listed (gone) after its Redis keys have expired. draining_since: an operator asked the host to
-- hand its accounts off (state `draining`); `gone` is never stored, it is a last_seen too old.
CREATE TABLE hosts (
    id             text PRIMARY KEY,
    first_seen     timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now(),
    draining_since timestamptz
);

-- The host whose worker took the account's lease last (with owner_token): the durable answer to
-- "which host owns this account", kept when its Redis lease expires with a dead host, so an
-- account whose owner is gone can be told from one nobody ever opened. Cleared when the owner
-- closes the account and lets the lease go.
ALTER TABLE accounts ADD COLUMN owner_host text;
CREATE INDEX accounts_owner_host ON accounts (owner_host) WHERE owner_host IS NOT NULL;
