-- Certificate login, key rollover and account removal (issue 7).

-- Events for the XMPP server: a key replaced (forced re-registration or rollover) or an account
-- removed, so that the server can drop the sessions of the old key. One row per event and sink
-- (`webhook`, `xmpp`), written in the transaction that changes the account, deleted once
-- delivered: a crash or an unreachable receiver loses none. `event_id` is shared by the rows of
-- one event, so receivers can drop a duplicate (delivery is at least once).
CREATE TABLE events (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         TEXT    NOT NULL,
    sink             TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    account          TEXT    NOT NULL,
    old_fingerprint  TEXT,
    new_fingerprint  TEXT,
    occurred_at      BIGINT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL
);
CREATE INDEX events_due ON events (sink, next_attempt_at);

-- Nonces of signed requests (account removal), kept until the request's timestamp is too old to
-- be accepted anyway: a replayed request finds its nonce here and is refused.
CREATE TABLE nonces (
    key         TEXT    PRIMARY KEY NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX nonces_expires_at ON nonces (expires_at);
