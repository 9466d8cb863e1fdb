-- Abuse resistance (issue 6). Every counter lives here rather than in process memory, so that the
-- limits hold across instances behind one database.

-- Who started a verification (a keyed hash of the client IP or JID) and the keyed hash of its
-- Idempotency-Key: a repeated start returns the verification instead of sending again. The time
-- of the last message: the wait for a voice or missed-call fallback runs from it.
ALTER TABLE verifications ADD COLUMN client TEXT;
ALTER TABLE verifications ADD COLUMN idempotency_key TEXT;
ALTER TABLE verifications ADD COLUMN last_sent_at INTEGER;
CREATE UNIQUE INDEX verifications_idempotency_key ON verifications (idempotency_key);

-- Rate limits as GCRA buckets: one row per key (action, scope and a keyed hash of the number or
-- IP, or the plain prefix or calling code) with its theoretical arrival time in milliseconds. A row
-- whose time has passed is an empty bucket, and is purged.
CREATE TABLE rate_limits (
    key  TEXT    PRIMARY KEY NOT NULL,
    tat  INTEGER NOT NULL
);
CREATE INDEX rate_limits_tat ON rate_limits (tat);

-- Messages sent and verifications completed per prefix and per calling code, in ten-minute
-- buckets (Unix seconds / 600): the completion ratio behind the SMS-pumping defence.
CREATE TABLE traffic (
    scope      TEXT    NOT NULL,
    bucket     INTEGER NOT NULL,
    sent       INTEGER NOT NULL DEFAULT 0,
    completed  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, bucket)
);

-- Prefixes blocked by the pumping defence, until a time.
CREATE TABLE blocks (
    scope       TEXT    PRIMARY KEY NOT NULL,
    until       INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Messages per UTC day (Unix seconds / 86400) per calling code and in total: the hard daily caps,
-- reserved before a message is sent.
CREATE TABLE daily_sends (
    scope  TEXT    NOT NULL,
    day    INTEGER NOT NULL,
    sent   INTEGER NOT NULL,
    PRIMARY KEY (scope, day)
);

-- Messages per UTC day, provider, calling code and challenge: the spend report.
CREATE TABLE spend (
    day        INTEGER NOT NULL,
    provider   TEXT    NOT NULL,
    country    TEXT    NOT NULL,
    challenge  TEXT    NOT NULL,
    messages   INTEGER NOT NULL,
    PRIMARY KEY (day, provider, country, challenge)
);
