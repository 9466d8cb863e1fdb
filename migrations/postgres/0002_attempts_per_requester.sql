-- Code tries per requester as well as per verification (see the SQLite migration of the same
-- number for why).
ALTER TABLE verifications ADD COLUMN total_attempts BIGINT NOT NULL DEFAULT 0;

CREATE TABLE verification_attempts (
    verification_id  TEXT   NOT NULL REFERENCES verifications (id) ON DELETE CASCADE,
    requester        TEXT   NOT NULL,
    attempts         BIGINT NOT NULL,
    PRIMARY KEY (verification_id, requester)
);

CREATE INDEX verifications_account ON verifications (account);
