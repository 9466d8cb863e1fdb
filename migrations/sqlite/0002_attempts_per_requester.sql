-- Code tries are counted per requester as well as per verification. Over XMPP the pending
-- verification is found by the account its key names, so anyone can submit codes for any account:
-- each requesting JID gets its own budget, so that an attacker's wrong guesses cannot lock out the
-- real client, and total_attempts caps all requesters together.
ALTER TABLE verifications ADD COLUMN total_attempts INTEGER NOT NULL DEFAULT 0;

CREATE TABLE verification_attempts (
    verification_id  TEXT    NOT NULL REFERENCES verifications (id) ON DELETE CASCADE,
    requester        TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    PRIMARY KEY (verification_id, requester)
);

CREATE INDEX verifications_account ON verifications (account);
