-- Keys an account has retired (issue 13): replaced by a forced re-registration or a rollover.
-- A rollover never returns to one of them, so that an old rollover proof (a newer key certified
-- by an older one) cannot be replayed after the user went back to the older key. Deleted with
-- the account.
CREATE TABLE retired_keys (
    account      TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    retired_at   BIGINT  NOT NULL,
    PRIMARY KEY (account, fingerprint)
);
