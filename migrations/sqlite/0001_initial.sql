-- Accounts: one per phone number (id = hex SHA-1 of the E.164 number), with the current key.
CREATE TABLE accounts (
    id           TEXT    PRIMARY KEY NOT NULL,
    fingerprint  TEXT    NOT NULL,
    public_key   BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- Verifications: at most one per number (the unique constraint is what makes two concurrent
-- starts for one number create one verification). The number is kept only while the row lives;
-- expired rows are purged.
CREATE TABLE verifications (
    id                  TEXT    PRIMARY KEY NOT NULL,
    phone               TEXT    NOT NULL UNIQUE,
    account             TEXT    NOT NULL,
    challenge           TEXT    NOT NULL,
    force               INTEGER NOT NULL,
    code_hash           BLOB,
    code_length         INTEGER NOT NULL,
    provider            TEXT,
    provider_ref        TEXT,
    sender              TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    sends               INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER NOT NULL,
    next_resend_at      INTEGER NOT NULL,
    verified_at         INTEGER,
    result_fingerprint  TEXT,
    result_key          BLOB
);

CREATE INDEX verifications_expires_at ON verifications (expires_at);
