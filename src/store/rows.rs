//! Rows as the database returns them (`#[derive(FromRow)]`, in SQL's own types), their
//! conversion into the core's records, and the mapping of database errors.

use chrono::DateTime;
use registrar_providers::{Challenge, DeliveryState};

use crate::phone::{AccountId, PhoneNumber};
use crate::registrar::VerificationId;
use crate::registrar::abuse::Measure;
use crate::registrar::ports::{
    AccountRecord, BlockRecord, EventKind, EventRecord, KeyTransferRecord, SpendRecord, StoreError,
    Time, Traffic, VerificationRecord,
};

/// Unix seconds as a time.
pub(super) fn time(secs: i64) -> Time {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<chrono::Utc>::MAX_UTC)
}

fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Database(format!("unreadable {what} {value:?} in the database"))
}

fn challenge(s: &str) -> Result<Challenge, StoreError> {
    s.parse().map_err(|_| corrupt("challenge", s))
}

/// The stored name of a delivery state.
fn delivery_state(s: &str) -> Result<DeliveryState, StoreError> {
    [
        DeliveryState::Delivered,
        DeliveryState::Failed,
        DeliveryState::Pending,
    ]
    .into_iter()
    .find(|d| d.as_str() == s)
    .ok_or_else(|| corrupt("delivery state", s))
}

#[derive(sqlx::FromRow)]
pub(super) struct VerificationRow {
    id: String,
    phone: String,
    account: String,
    challenge: String,
    force: bool,
    code_hash: Option<Vec<u8>>,
    code_length: i64,
    provider: Option<String>,
    provider_ref: Option<String>,
    sender: Option<String>,
    attempts: i64,
    total_attempts: i64,
    sends: i64,
    created_at: i64,
    expires_at: i64,
    next_resend_at: i64,
    verified_at: Option<i64>,
    result_fingerprint: Option<String>,
    result_key: Option<Vec<u8>>,
    locale: Option<String>,
    delivery_state: Option<String>,
    client: Option<String>,
    idempotency_key: Option<String>,
    last_sent_at: Option<i64>,
}

impl TryFrom<VerificationRow> for VerificationRecord {
    type Error = StoreError;

    fn try_from(r: VerificationRow) -> Result<Self, StoreError> {
        Ok(Self {
            phone: PhoneNumber::from_stored(&r.phone).ok_or_else(|| corrupt("number", "…"))?,
            id: VerificationId::from_stored(&r.id),
            account: AccountId::for_stored(&r.account),
            challenge: challenge(&r.challenge)?,
            force: r.force,
            code_hash: r.code_hash,
            code_length: count(r.code_length),
            provider: r.provider,
            provider_ref: r.provider_ref,
            sender: r.sender,
            attempts: count(r.attempts),
            total_attempts: count(r.total_attempts),
            sends: count(r.sends),
            created_at: time(r.created_at),
            expires_at: time(r.expires_at),
            next_resend_at: time(r.next_resend_at),
            verified_at: r.verified_at.map(time),
            result_fingerprint: r.result_fingerprint,
            result_key: r.result_key,
            locale: r.locale,
            delivery_state: r
                .delivery_state
                .as_deref()
                .map(delivery_state)
                .transpose()?,
            client: r.client,
            idempotency_key: r.idempotency_key,
            last_sent_at: r.last_sent_at.map(time),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AccountRow {
    id: String,
    fingerprint: String,
    public_key: Vec<u8>,
    created_at: i64,
    updated_at: i64,
}

impl From<AccountRow> for AccountRecord {
    fn from(r: AccountRow) -> Self {
        Self {
            id: AccountId::for_stored(&r.id),
            fingerprint: r.fingerprint,
            public_key: r.public_key,
            created_at: time(r.created_at),
            updated_at: time(r.updated_at),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct KeyTransferRow {
    token_hash: String,
    account: String,
    fingerprint: String,
    private_key: Vec<u8>,
    created_at: i64,
    expires_at: i64,
}

impl From<KeyTransferRow> for KeyTransferRecord {
    fn from(r: KeyTransferRow) -> Self {
        Self {
            token_hash: r.token_hash,
            account: AccountId::for_stored(&r.account),
            fingerprint: r.fingerprint,
            private_key: r.private_key,
            created_at: time(r.created_at),
            expires_at: time(r.expires_at),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct BlockRow {
    scope: String,
    measure: String,
    until: i64,
    reason: String,
    created_at: i64,
}

impl From<BlockRow> for BlockRecord {
    fn from(r: BlockRow) -> Self {
        Self {
            scope: r.scope,
            measure: Measure::from_stored(&r.measure),
            until: time(r.until),
            reason: r.reason,
            created_at: time(r.created_at),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct TrafficRow {
    pub scope: String,
    sent: i64,
    completed: i64,
    numbers: i64,
    sources: i64,
}

impl From<&TrafficRow> for Traffic {
    fn from(r: &TrafficRow) -> Self {
        let n = |v: i64| v.max(0).unsigned_abs();
        Self {
            sent: n(r.sent),
            completed: n(r.completed),
            numbers: n(r.numbers),
            sources: n(r.sources),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct SpendRow {
    day: i64,
    provider: String,
    country: String,
    challenge: String,
    messages: i64,
}

impl TryFrom<SpendRow> for SpendRecord {
    type Error = StoreError;

    fn try_from(r: SpendRow) -> Result<Self, StoreError> {
        Ok(Self {
            day: r.day,
            challenge: challenge(&r.challenge)?,
            provider: r.provider,
            country: r.country,
            messages: r.messages.max(0).unsigned_abs(),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    pub id: i64,
    event_id: String,
    kind: String,
    account: String,
    old_fingerprint: Option<String>,
    new_fingerprint: Option<String>,
    occurred_at: i64,
    attempts: i32,
    pub next_attempt_at: i64,
}

impl TryFrom<EventRow> for EventRecord {
    type Error = StoreError;

    fn try_from(r: EventRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.id,
            kind: EventKind::parse(&r.kind).ok_or_else(|| corrupt("event kind", &r.kind))?,
            event_id: r.event_id,
            account: AccountId::for_stored(&r.account),
            old_fingerprint: r.old_fingerprint,
            new_fingerprint: r.new_fingerprint,
            occurred_at: time(r.occurred_at),
            attempts: count(i64::from(r.attempts)),
        })
    }
}

/// The unique constraints a race between requests can meet, by their names in PostgreSQL and
/// their columns in SQLite's messages: these are conflicts, any other one is a bug.
const RACES: [(&str, &str); 4] = [
    ("verifications_pkey", "verifications.id"),
    ("verifications_phone_key", "verifications.phone"),
    (
        "verifications_idempotency_key",
        "verifications.idempotency_key",
    ),
    ("accounts_pkey", "accounts.id"),
];

/// A database error as the core sees it.
pub(super) fn db(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            let known = RACES.iter().any(|(name, columns)| {
                d.constraint() == Some(name) || d.message().ends_with(columns)
            });
            if known {
                StoreError::Conflict
            } else {
                StoreError::Database(e.to_string())
            }
        }
        // PostgreSQL's connection exceptions (class 08) and operator interventions (57P:
        // shutdown, crash, cannot connect now), SQLite's "busy" beyond the busy timeout.
        sqlx::Error::Database(d)
            if d.code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P"))
                || d.code().as_deref() == Some("5") =>
        {
            StoreError::Unavailable(e.to_string())
        }
        // Protocol: a server that hangs up in the middle of the handshake or a reply.
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Database(e.to_string()),
    }
}

/// A migration failure, with the case of a database newer than this binary spelled out.
pub(super) fn migration_error(e: sqlx::migrate::MigrateError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Database(format!(
            "the database schema (migration {v}) is newer than this binary: upgrade \
             kontalk-registrar, or point it at another database"
        )),
        e => StoreError::Database(format!("migration failed: {e}")),
    }
}
