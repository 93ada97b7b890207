-- A user's access tokens carry the token_version they were issued at; a demotion or disabling
-- increments it, and each API process refuses tokens of an older version (api/revocations.py). So a
-- demoted or disabled user loses access at once, not when the token expires.

ALTER TABLE users ADD COLUMN token_version integer NOT NULL DEFAULT 0;
