-- Issue 13: the pumping defence judges distinct numbers and distinct sources per traffic scope
-- (calling code and prefixes of several lengths), not only messages. The traffic counters get
-- the numbers and clients new to each ten-minute bucket; traffic_seen remembers the keyed hashes
-- of the current bucket's (kind 0 a number, 1 a client), so that each counts once there, and is
-- purged as soon as its bucket is past.
ALTER TABLE traffic ADD COLUMN numbers INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traffic ADD COLUMN sources INTEGER NOT NULL DEFAULT 0;

CREATE TABLE traffic_seen (
    scope   TEXT    NOT NULL,
    bucket  INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    item    INTEGER NOT NULL,
    PRIMARY KEY (scope, bucket, kind, item)
);
CREATE INDEX traffic_seen_bucket ON traffic_seen (bucket);

-- A scope's measure: 'call' (missed calls replace texts and voice calls) or 'block'.
ALTER TABLE blocks ADD COLUMN measure TEXT NOT NULL DEFAULT 'block';
