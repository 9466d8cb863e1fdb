-- Accounts: one per phone number (id = hex SHA-1 of the E.164 number), with the current key.
CREATE TABLE accounts (
    id           TEXT   PRIMARY KEY NOT NULL,
    fingerprint  TEXT   NOT NULL,
    public_key   BYTEA  NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- Verifications: at most one per number (the unique constraint is what makes two concurrent
-- starts for one number create one verification, on every instance). The number is kept only
-- while the row lives; expired rows are purged.
CREATE TABLE verifications (
    id                  TEXT    PRIMARY KEY NOT NULL,
    phone               TEXT    NOT NULL UNIQUE,
    account             TEXT    NOT NULL,
    challenge           TEXT    NOT NULL,
    force               BOOLEAN NOT NULL,
    code_hash           BYTEA,
    code_length         BIGINT  NOT NULL,
    provider            TEXT,
    provider_ref        TEXT,
    sender              TEXT,
    attempts            BIGINT  NOT NULL DEFAULT 0,
    sends               BIGINT  NOT NULL DEFAULT 0,
    created_at          BIGINT  NOT NULL,
    expires_at          BIGINT  NOT NULL,
    next_resend_at      BIGINT  NOT NULL,
    verified_at         BIGINT,
    result_fingerprint  TEXT,
    result_key          BYTEA
);

CREATE INDEX verifications_expires_at ON verifications (expires_at);
