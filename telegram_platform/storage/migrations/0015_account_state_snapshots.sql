-- Each account's local Telegram state (TDLib's binlog, the emulator backend's login file) kept here
-- as a sealed snapshot, so that whichever host owns the account next opens it without a new login
-- and without a shared disk (worker/tdstate.py, docs/scaling.md "Portable TDLib state").
--
-- `sealed` is AES-GCM under a key derived per account from ENCRYPTION_KEY, which the database never
-- sees. `generation` grows with every snapshot and never goes back, not even when the snapshot is
-- discarded (a logout: `sealed` NULL), so a host's older copy is always recognised as older.
-- `owner_token` is the accounts.owner_token of the owner that wrote it; a write carries that token
-- and is refused unless it is still the account's (storage/snapshots.py). Removing the account
-- removes its snapshot.
CREATE TABLE account_snapshots (
    account_id bigint PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    generation bigint NOT NULL CHECK (generation > 0),
    owner_token bigint NOT NULL,
    backend text NOT NULL,
    sealed bytea,
    sha256 bytea CHECK (sha256 IS NULL OR length(sha256) = 32),
    size_bytes integer NOT NULL DEFAULT 0,
    taken_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((sealed IS NULL) = (sha256 IS NULL))
);
