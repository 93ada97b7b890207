-- An account's proxy password and MTProto secret are write-only: the readable `proxy` keeps only
-- whether each was given (has_password, has_secret), and the values are stored sealed with a key
-- derived from ENCRYPTION_KEY (storage/accounts.py), which the database never sees.
--
-- SQL cannot seal without that key, so values stored in clear before are moved here into
-- `proxy_credentials_clear`, out of everything a route reads; the first process that holds the
-- key (`tp migrate`, the API at its start, the worker opening the account's session) seals them
-- and empties that column (`seal_clear_proxy_credentials`).
ALTER TABLE accounts ADD COLUMN proxy_credentials_sealed bytea;
ALTER TABLE accounts ADD COLUMN proxy_credentials_clear jsonb;
UPDATE accounts
   SET proxy_credentials_clear = nullif(jsonb_strip_nulls(jsonb_build_object(
           'password', nullif(proxy->>'password', ''), 'secret', nullif(proxy->>'secret', ''))), '{}'::jsonb),
       proxy = (proxy - 'password' - 'secret')
               || jsonb_build_object('has_password', coalesce(proxy->>'password', '') <> '',
                                     'has_secret', coalesce(proxy->>'secret', '') <> '')
 WHERE proxy IS NOT NULL AND jsonb_typeof(proxy) = 'object';
