-- Moving to a new device (issue 12): a logged-in account uploads its private key, already
-- encrypted by the client with a passphrase, and a new device fetches it once with the token it
-- was given. The token itself is never stored, only its keyed hash; one upload per account (a new
-- one replaces it); rows go at retrieval, at expiry (the purge), and with the account.
CREATE TABLE key_transfers (
    token_hash   TEXT    PRIMARY KEY NOT NULL,
    account      TEXT    NOT NULL UNIQUE,
    fingerprint  TEXT    NOT NULL,
    private_key  BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX key_transfers_expires_at ON key_transfers (expires_at);
