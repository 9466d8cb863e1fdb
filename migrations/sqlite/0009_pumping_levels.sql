-- Issue 13: the pumping defence judges distinct numbers and distinct sources per traffic scope
-- (calling code and prefixes of several lengths), not only messages: one row per scope, ten-
-- minute bucket, kind (0 number, 1 source) and keyed hash, counted distinct over the window.
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
