//! The SQL both backends run, as constants: `$n` placeholders, which SQLite and PostgreSQL both
//! accept, and portable statements (`ON CONFLICT`, `RETURNING`). The few that differ between the
//! two are in the backend modules.

/// Every column of `verifications`, in [`VerificationRow`](super::rows::VerificationRow)'s order.
macro_rules! verification_columns {
    () => {
        "id, phone, account, challenge, force, code_hash, code_length, provider, provider_ref, \
         sender, attempts, total_attempts, sends, created_at, expires_at, next_resend_at, \
         verified_at, result_fingerprint, result_key, locale, delivery_state, client, \
         idempotency_key, last_sent_at"
    };
}

pub const VERIFICATION_BY_ID: &str = concat!(
    "SELECT ",
    verification_columns!(),
    " FROM verifications WHERE id = $1"
);
pub const VERIFICATION_BY_ACCOUNT: &str = concat!(
    "SELECT ",
    verification_columns!(),
    " FROM verifications WHERE account = $1"
);
/// The number's verification and the one holding the idempotency key (at most two rows).
pub const VERIFICATIONS_OF_START: &str = concat!(
    "SELECT ",
    verification_columns!(),
    " FROM verifications WHERE phone = $1 OR idempotency_key = $2"
);
pub const INSERT_VERIFICATION: &str = concat!(
    "INSERT INTO verifications (",
    verification_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19, $20, $21, $22, $23, $24)"
);
pub const DELETE_VERIFICATION: &str = "DELETE FROM verifications WHERE id = $1";
pub const ACCOUNT_EXISTS: &str = "SELECT 1 FROM accounts WHERE id = $1";

pub const RENEW_CODE: &str = "UPDATE verifications SET challenge = $3, code_hash = $4, \
     code_length = $5, expires_at = $6, next_resend_at = $7, sends = sends + 1, \
     provider_ref = NULL, delivery_state = NULL, delivery_updated_at = NULL, last_sent_at = $8 \
     WHERE id = $1 AND sends = $2 AND verified_at IS NULL";
pub const RECORD_DELIVERY: &str = "UPDATE verifications SET provider = $2, provider_ref = $3, \
     sender = $4, code_length = $5, code_hash = CASE WHEN $6 THEN $7 ELSE code_hash END \
     WHERE id = $1";
pub const ALLOW_RESEND: &str = "UPDATE verifications SET next_resend_at = $2 WHERE id = $1";
pub const RECORD_RECEIPT: &str = "UPDATE verifications SET delivery_state = $3, \
     delivery_updated_at = $4 WHERE provider = $1 AND provider_ref = $2";

pub const TAKE_HOLDER_ATTEMPT: &str = "UPDATE verifications \
     SET attempts = attempts + 1, total_attempts = total_attempts + 1 \
     WHERE id = $1 AND attempts < $2 AND verified_at IS NULL AND expires_at > $3 \
     RETURNING attempts";
/// The others' tries are the total less the holder's.
pub const TAKE_OTHERS_ATTEMPT: &str = "UPDATE verifications \
     SET total_attempts = total_attempts + 1 \
     WHERE id = $1 AND total_attempts - attempts < $2 AND verified_at IS NULL AND expires_at > $3";
pub const TAKE_PEER_ATTEMPT: &str = "INSERT INTO verification_attempts \
     (verification_id, requester, attempts) VALUES ($1, $2, 1) \
     ON CONFLICT (verification_id, requester) DO UPDATE \
     SET attempts = verification_attempts.attempts + 1 \
     WHERE verification_attempts.attempts < $3 RETURNING attempts";
pub const MARK_VERIFIED: &str = "UPDATE verifications SET verified_at = $2, \
     result_fingerprint = $3, result_key = $4 \
     WHERE id = $1 AND verified_at IS NULL AND expires_at > $2";
pub const PENDING: &str =
    "SELECT 1 FROM verifications WHERE id = $1 AND verified_at IS NULL AND expires_at > $2";
pub const UPSERT_ACCOUNT: &str = "INSERT INTO accounts \
     (id, fingerprint, public_key, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
     ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint, \
     public_key = excluded.public_key, updated_at = excluded.updated_at";

pub const TAT: &str = "SELECT tat FROM rate_limits WHERE key = $1";
pub const RESERVE_DAILY: &str = "INSERT INTO daily_sends (scope, day, sent) VALUES ($1, $2, 1) \
     ON CONFLICT (scope, day) DO UPDATE SET sent = daily_sends.sent + 1 \
     WHERE daily_sends.sent < $3";
pub const RELEASE_DAILY: &str =
    "UPDATE daily_sends SET sent = sent - 1 WHERE scope = $1 AND day = $2 AND sent > 0";
pub const SET_MEASURE: &str = "INSERT INTO blocks (scope, measure, until, reason, created_at) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (scope) DO UPDATE SET until = excluded.until, reason = excluded.reason, \
     created_at = CASE WHEN blocks.measure = excluded.measure AND blocks.until > $5 \
     THEN blocks.created_at ELSE excluded.created_at END, measure = excluded.measure";
pub const COUNT_SPEND: &str = "INSERT INTO spend (day, provider, country, challenge, messages) \
     VALUES ($1, $2, $3, $4, 1) ON CONFLICT (day, provider, country, challenge) \
     DO UPDATE SET messages = spend.messages + 1";
pub const REMOVE_BLOCK: &str = "DELETE FROM blocks WHERE scope = $1";
pub const BLOCKS: &str = "SELECT scope, measure, until, reason, created_at FROM blocks \
     WHERE until > $1 ORDER BY scope";
pub const DAILY_SENDS: &str = "SELECT scope, sent FROM daily_sends WHERE day = $1 ORDER BY scope";
pub const SPEND: &str = "SELECT day, provider, country, challenge, messages FROM spend \
     WHERE day >= $1 ORDER BY day, provider, country, challenge";

pub const ACCOUNT: &str =
    "SELECT id, fingerprint, public_key, created_at, updated_at FROM accounts WHERE id = $1";
pub const INSERT_EVENT: &str = "INSERT INTO events (event_id, sink, kind, account, \
     old_fingerprint, new_fingerprint, occurred_at, next_attempt_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7)";
/// An event about the account's current key, if the account exists.
pub const INSERT_EVENT_OF_ACCOUNT: &str = "INSERT INTO events (event_id, sink, kind, account, \
     old_fingerprint, new_fingerprint, occurred_at, next_attempt_at) \
     SELECT $1, $2, $3, id, fingerprint, NULL, $5, $5 FROM accounts WHERE id = $4";
pub const DELETE_KEY_TRANSFER_OF: &str = "DELETE FROM key_transfers WHERE account = $1";
pub const RETIRE_KEY: &str = "INSERT INTO retired_keys (account, fingerprint, retired_at) \
     VALUES ($1, $2, $3) \
     ON CONFLICT (account, fingerprint) DO UPDATE SET retired_at = excluded.retired_at";
pub const REPLACE_KEY: &str = "UPDATE accounts SET fingerprint = $3, public_key = $4, \
     updated_at = $5 WHERE id = $1 AND fingerprint = $2";
pub const DELETE_ACCOUNT: &str = "DELETE FROM accounts WHERE id = $1 AND fingerprint = $2";
/// What goes with a removed account.
pub const DELETE_OF_ACCOUNT: [&str; 3] = [
    "DELETE FROM verifications WHERE account = $1",
    "DELETE FROM key_transfers WHERE account = $1",
    "DELETE FROM retired_keys WHERE account = $1",
];
pub const IS_RETIRED: &str = "SELECT 1 FROM retired_keys WHERE account = $1 AND fingerprint = $2";
/// One statement, so that concurrent uploads of one account replace each other instead of
/// meeting at the unique constraint.
pub const PUT_KEY_TRANSFER: &str = "INSERT INTO key_transfers (token_hash, account, \
     fingerprint, private_key, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (account) DO UPDATE SET token_hash = excluded.token_hash, \
     fingerprint = excluded.fingerprint, private_key = excluded.private_key, \
     created_at = excluded.created_at, expires_at = excluded.expires_at";
/// One statement: of two requests with the same token, one gets the row.
pub const TAKE_KEY_TRANSFER: &str = "DELETE FROM key_transfers WHERE token_hash = $1 \
     RETURNING token_hash, account, fingerprint, private_key, created_at, expires_at";
pub const USE_NONCE: &str =
    "INSERT INTO nonces (key, expires_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
pub const DUE_EVENTS: &str = "SELECT id, event_id, kind, account, old_fingerprint, \
     new_fingerprint, occurred_at, attempts, next_attempt_at FROM events \
     WHERE sink = $1 AND next_attempt_at <= $2 ORDER BY id LIMIT $3";
/// Taken only if no other instance took it since the read.
pub const CLAIM_EVENT: &str =
    "UPDATE events SET next_attempt_at = $3 WHERE id = $1 AND next_attempt_at = $2";
pub const EVENT_DELIVERED: &str = "DELETE FROM events WHERE id = $1";
pub const EVENT_FAILED: &str =
    "UPDATE events SET attempts = attempts + 1, next_attempt_at = $2 WHERE id = $1";

pub const PURGE_VERIFICATIONS: &str = "DELETE FROM verifications WHERE expires_at <= $1";
/// Empty rate buckets, and counters older than any window or report needs, each with the time
/// (or bucket, or day) before which rows go.
pub const PURGE: [&str; 8] = [
    "DELETE FROM rate_limits WHERE tat < $1",
    "DELETE FROM blocks WHERE until < $1",
    "DELETE FROM traffic WHERE bucket < $1",
    "DELETE FROM traffic_seen WHERE bucket < $1",
    "DELETE FROM daily_sends WHERE day < $1",
    "DELETE FROM spend WHERE day < $1",
    "DELETE FROM nonces WHERE expires_at < $1",
    "DELETE FROM key_transfers WHERE expires_at <= $1",
];
pub const SCHEMA_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations";

/// `traffic_seen.kind` of a number's hash.
pub const SEEN_NUMBER: i32 = 0;
/// `traffic_seen.kind` of a client's hash.
pub const SEEN_SOURCE: i32 = 1;

/// The measures on a list of scopes, from `$2` on.
pub fn measures_on(scopes: usize) -> String {
    format!(
        "SELECT scope, measure, until, reason, created_at FROM blocks \
         WHERE until > $1 AND scope IN ({})",
        placeholders(2, scopes)
    )
}

/// The traffic sums of a list of scopes, from `$2` on.
pub fn traffic_of(scopes: usize) -> String {
    format!(
        "SELECT scope, CAST(COALESCE(SUM(sent), 0) AS BIGINT) AS sent, \
         CAST(COALESCE(SUM(completed), 0) AS BIGINT) AS completed, \
         CAST(COALESCE(SUM(numbers), 0) AS BIGINT) AS numbers, \
         CAST(COALESCE(SUM(sources), 0) AS BIGINT) AS sources \
         FROM traffic WHERE bucket >= $1 AND scope IN ({}) GROUP BY scope",
        placeholders(2, scopes)
    )
}

/// `n` rows of `traffic_seen` (scope, bucket, kind, item) inserted unless there, returning the
/// scope and kind of those that are new.
pub fn seen(n: usize) -> String {
    format!(
        "INSERT INTO traffic_seen (scope, bucket, kind, item) VALUES {} ON CONFLICT DO NOTHING \
         RETURNING scope, kind",
        rows(n, 4)
    )
}

/// One message counted under `n` scopes (scope, bucket, new numbers, new sources).
pub fn count_sent(n: usize) -> String {
    format!(
        "INSERT INTO traffic (scope, bucket, numbers, sources, sent, completed) VALUES {} \
         ON CONFLICT (scope, bucket) DO UPDATE SET sent = traffic.sent + 1, \
         numbers = traffic.numbers + excluded.numbers, \
         sources = traffic.sources + excluded.sources",
        rows_with(n, 4, ", 1, 0")
    )
}

/// One completion counted under `n` scopes (scope, bucket).
pub fn count_completed(n: usize) -> String {
    format!(
        "INSERT INTO traffic (scope, bucket, sent, completed) VALUES {} \
         ON CONFLICT (scope, bucket) DO UPDATE SET completed = traffic.completed + 1",
        rows_with(n, 2, ", 0, 1")
    )
}

/// `($1, .., $width), ($width+1, ..), ...`: `n` rows of numbered placeholders.
fn rows(n: usize, width: usize) -> String {
    rows_with(n, width, "")
}

/// [`rows`] with `tail` (constants) after each row's placeholders.
fn rows_with(n: usize, width: usize, tail: &str) -> String {
    (0..n)
        .map(|r| format!("({}{tail})", placeholders(r * width + 1, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first, $first+1, ...`: `n` numbered placeholders for an `IN (...)` list.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_lists_number_their_placeholders_in_order() {
        assert_eq!(rows(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(rows_with(2, 1, ", 0"), "($1, 0), ($2, 0)");
        assert!(count_sent(3).contains("($9, $10, $11, $12, 1, 0) ON CONFLICT"));
        assert!(measures_on(2).ends_with("IN ($2, $3)"));
    }
}
