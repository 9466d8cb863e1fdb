//! Persistence behind a small trait, so that the core never sees SQL.
//!
//! Every guarantee that must hold across instances (one pending verification per number, no
//! outrunning the wrong-try counter, an account created once) is a constraint or a conditional
//! update in the database, never an in-process lock. Times are Unix seconds.

mod postgres;
mod sql;
mod sqlite;

use async_trait::async_trait;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use registrar_providers::Challenge;

use crate::registrar::abuse::{Measure, Rate};

/// A verification as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationRecord {
    /// Random id (hex).
    pub id: String,
    /// E.164 number. Kept only while the verification lives: it is purged with it.
    pub phone: String,
    /// Account id (hex SHA-1 of the number).
    pub account: String,
    /// The challenge of the last delivery.
    pub challenge: Challenge,
    /// Whether the client asked to replace an existing account.
    pub force: bool,
    /// Keyed hash of the code; `None` when the provider checks the code.
    pub code_hash: Option<Vec<u8>>,
    /// How many digits the user types.
    pub code_length: u32,
    /// Name of the provider of the last delivery.
    pub provider: Option<String>,
    /// The provider's reference for the last delivery.
    pub provider_ref: Option<String>,
    /// Sender id shown to the client.
    pub sender: Option<String>,
    /// Code submissions so far by the holder (see [`Requester::Holder`]).
    pub attempts: u32,
    /// Code submissions so far by every requester together (the others' are the difference).
    pub total_attempts: u32,
    /// Messages sent so far.
    pub sends: u32,
    /// When it started.
    pub created_at: i64,
    /// When the current code expires.
    pub expires_at: i64,
    /// When a resend is allowed.
    pub next_resend_at: i64,
    /// When it was completed.
    pub verified_at: Option<i64>,
    /// Fingerprint of the key certified on completion.
    pub result_fingerprint: Option<String>,
    /// The certified key returned on completion (public data).
    pub result_key: Option<Vec<u8>>,
    /// The client's language.
    pub locale: Option<String>,
    /// What the last delivery receipt said (`delivered`, `failed`, `pending`).
    pub delivery_state: Option<String>,
    /// Keyed hash of the client that started it (its IP network or JID).
    pub client: Option<String>,
    /// Keyed hash of the start request's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// When the last message went out.
    pub last_sent_at: Option<i64>,
    /// When a correct code was found and its key's certification began.
    pub completing_at: Option<i64>,
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Account id (hex SHA-1 of the number).
    pub id: String,
    /// Fingerprint of the current key.
    pub fingerprint: String,
    /// The current key with our certification.
    pub public_key: Vec<u8>,
    /// First registration.
    pub created_at: i64,
    /// Last (forced) registration.
    pub updated_at: i64,
}

/// A private key waiting for a new device (Kontalk's key transfer).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyTransferRecord {
    /// Keyed hash of the token the new device presents.
    pub token_hash: String,
    /// Account id.
    pub account: String,
    /// Fingerprint of the key uploaded (the account's key at the upload).
    pub fingerprint: String,
    /// The secret key as the client encrypted it (binary OpenPGP).
    pub private_key: Vec<u8>,
    /// Upload time.
    pub created_at: i64,
    /// When it is deleted unretrieved.
    pub expires_at: i64,
}

impl std::fmt::Debug for KeyTransferRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTransferRecord")
            .field("account", &self.account)
            .field("fingerprint", &self.fingerprint)
            .field("private_key_len", &self.private_key.len())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A new code for a verification (a resend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The challenge for this delivery.
    pub challenge: Challenge,
    /// Keyed hash of the new code.
    pub code_hash: Vec<u8>,
    /// Digits of the new code.
    pub code_length: u32,
    /// New expiry.
    pub expires_at: i64,
    /// Next resend.
    pub next_resend_at: i64,
    /// Now: when this message goes out.
    pub sent_at: i64,
}

/// How long traffic counters are kept (the pumping window cannot be longer).
pub const TRAFFIC_RETENTION: i64 = 7 * 86_400;

/// How long the spend report's daily counts are kept.
pub const SPEND_RETENTION: i64 = 400 * 86_400;

/// A rate-limit bucket to take one event from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateBucket {
    /// The bucket (action, scope and value; numbers and IPs as keyed hashes).
    pub key: String,
    /// Its rate.
    pub rate: Rate,
}

/// A measure of the pumping defence on a traffic scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    /// Where (`prefix:<digits>`, `country:<code>`).
    pub scope: String,
    /// What.
    pub measure: Measure,
    /// Until when.
    pub until: i64,
    /// Why.
    pub reason: String,
    /// Since when (kept while the same measure is extended).
    pub created_at: i64,
}

/// A message that went out, for the traffic and spend counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    /// Traffic scopes to count it under (`prefix:<digits>`, `country:<code>`).
    pub scopes: Vec<String>,
    /// Its ten-minute bucket.
    pub bucket: i64,
    /// Its UTC day.
    pub day: i64,
    /// The provider.
    pub provider: String,
    /// The calling code.
    pub country: String,
    /// The challenge.
    pub challenge: Challenge,
    /// A keyed hash of the number, counted distinct per scope.
    pub number: i64,
    /// A keyed hash of the client that asked, counted distinct per scope.
    pub source: Option<i64>,
}

/// One traffic scope's counters over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Messages sent.
    pub sent: u64,
    /// Verifications completed (counted in the bucket of their start).
    pub completed: u64,
    /// Distinct numbers messaged (within each ten-minute bucket, summed over the window).
    pub numbers: u64,
    /// Distinct clients that asked for them (likewise).
    pub sources: u64,
}

/// Messages of one day, provider, calling code and challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRecord {
    /// UTC day (Unix days).
    pub day: i64,
    /// Provider.
    pub provider: String,
    /// Calling code.
    pub country: String,
    /// Challenge.
    pub challenge: Challenge,
    /// Messages.
    pub messages: u64,
}

/// What the provider reported for a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// Provider name.
    pub provider: String,
    /// Provider reference.
    pub provider_ref: Option<String>,
    /// Sender id for the client.
    pub sender: String,
    /// A replacement code hash when the provider chose or checks the code (`Some(None)`: the
    /// provider checks it).
    pub code_hash: Option<Option<Vec<u8>>>,
    /// Digits of the code the user types.
    pub code_length: u32,
}

/// Who submits a code, for counting tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester<'a> {
    /// The verification's holder: the client holding its id (HTTP), or the client that started
    /// it (the same address before login, the same JID on the component).
    Holder,
    /// Another party, by a pseudonym (an XMPP JID's or an address's keyed hash).
    Peer(&'a str),
}

/// Caps on code tries of one verification. The holder's and the others' budgets are separate,
/// so that nobody else's wrong guesses can use up the holder's tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TryLimits {
    /// Tries of the holder.
    pub holder: u32,
    /// Tries of everyone else together.
    pub others: u32,
    /// Tries of each other requester.
    pub per_peer: u32,
}

/// The completion of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Fingerprint of the certified key.
    pub fingerprint: String,
    /// The certified key.
    pub public_key: Vec<u8>,
    /// Whether an existing account may be replaced.
    pub replace_account: bool,
    /// Now.
    pub now: i64,
    /// The event to record when an account's key is replaced.
    pub notice: Notice,
}

/// An event to record with an account change, for each configured sink (none: no event). The
/// store fills in the fingerprints from the rows it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notice {
    /// Shared by the event's rows (one per sink).
    pub event_id: String,
    /// The sinks to deliver to (`webhook`, `xmpp`).
    pub sinks: Vec<String>,
}

/// What happened to an account, for the XMPP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A forced re-registration replaced the key.
    KeyReplaced,
    /// The owner replaced the key with one signed by the old key.
    KeyRolledOver,
    /// The account was removed.
    AccountRemoved,
    /// Somebody started a forced re-registration of the account's number (the key works on
    /// until a code is entered): its owner is told.
    ReregistrationStarted,
}

impl EventKind {
    /// The stable name in events and rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyReplaced => "key-replaced",
            Self::KeyRolledOver => "key-rolled-over",
            Self::AccountRemoved => "account-removed",
            Self::ReregistrationStarted => "reregistration-started",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::KeyReplaced,
            Self::KeyRolledOver,
            Self::AccountRemoved,
            Self::ReregistrationStarted,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// An undelivered event, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Row id (per sink).
    pub id: i64,
    /// The event's id, the same for every sink.
    pub event_id: String,
    /// What happened.
    pub kind: EventKind,
    /// The account.
    pub account: String,
    /// The key that stops working.
    pub old_fingerprint: Option<String>,
    /// The key that replaces it (none for a removal).
    pub new_fingerprint: Option<String>,
    /// When it happened.
    pub occurred_at: i64,
    /// Failed deliveries so far.
    pub attempts: u32,
}

/// A key rollover: the account's key `old` is replaced by `new`, if it still is `old`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// Fingerprint of the key being replaced.
    pub old_fingerprint: String,
    /// Fingerprint of the new key.
    pub new_fingerprint: String,
    /// The new key with our certification.
    pub public_key: Vec<u8>,
    /// Now.
    pub now: i64,
    /// The event to record.
    pub notice: Notice,
}

/// How a completion went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    /// Verification completed, account stored.
    Done,
    /// Another request completed (or removed) the verification first.
    NotPending,
    /// The account exists and the verification was not forced.
    AccountExists,
}

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness constraint refused the write (another request won a race).
    #[error("conflicting write")]
    Conflict,
    /// The database cannot be reached (no connection within the pool's timeout, a broken
    /// connection, the server shutting down): try again later.
    #[error("database unreachable: {0}")]
    Unavailable(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(String),
}

/// What the core needs from persistence.
#[async_trait]
pub trait Store: Send + Sync {
    /// The account `id`.
    async fn account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;

    /// The verification `id`, live or not.
    async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError>;

    /// The verification of `phone`, live or not (at most one exists).
    async fn verification_by_phone(
        &self,
        phone: &str,
    ) -> Result<Option<VerificationRecord>, StoreError>;

    /// Inserts `v`, first deleting verification `replaces` if given, in one transaction.
    /// [`StoreError::Conflict`] when another verification holds the number or `replaces` was
    /// already gone (another request replaced it first).
    async fn create_verification(
        &self,
        v: &VerificationRecord,
        replaces: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Deletes verification `id`; whether it existed.
    async fn delete_verification(&self, id: &str) -> Result<bool, StoreError>;

    /// The live or expired verification for account `account` (at most one: one per number).
    async fn verification_by_account(
        &self,
        account: &str,
    ) -> Result<Option<VerificationRecord>, StoreError>;

    /// Spends one code try of `requester` if its budget is not used up (the holder's, or both
    /// the others' together and this peer's) and the verification is pending and live at `now`:
    /// the tries `requester` has spent, or `None`. The counters move in one transaction, so that
    /// parallel guesses cannot outrun them.
    async fn take_attempt(
        &self,
        id: &str,
        requester: Requester<'_>,
        limits: TryLimits,
        now: i64,
    ) -> Result<Option<u32>, StoreError>;

    /// Records what the provider reported for the last delivery.
    async fn record_delivery(&self, id: &str, d: &DeliveryRecord) -> Result<(), StoreError>;

    /// Stores a new code if the verification is still pending and `sends` messages were sent
    /// (so that of two concurrent resends one wins); whether it did.
    async fn renew_code(&self, id: &str, sends: u32, r: &Renewal) -> Result<bool, StoreError>;

    /// Allows a resend from `at` on (after a failed delivery).
    async fn allow_resend(&self, id: &str, at: i64) -> Result<(), StoreError>;

    /// Marks the verification completed and stores the account, in one transaction.
    async fn complete(
        &self,
        id: &str,
        account: &str,
        c: &Completion,
    ) -> Result<CompleteOutcome, StoreError>;

    /// Records a delivery receipt for the verification whose last delivery went through
    /// `provider` with reference `provider_ref`; whether one was found.
    async fn record_receipt(
        &self,
        provider: &str,
        provider_ref: &str,
        state: &str,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// Deletes verifications that expired before `now` (how many), and counters that no
    /// window or report needs any more.
    async fn purge_expired(&self, now: i64) -> Result<u64, StoreError>;

    /// Takes one event from every bucket at `now_ms` (milliseconds), all or none, in one
    /// transaction: `None` when taken, else the refusing bucket with the latest time a retry
    /// can succeed (ms).
    async fn take_rates(
        &self,
        buckets: &[RateBucket],
        now_ms: i64,
    ) -> Result<Option<(usize, i64)>, StoreError>;

    /// The verification started with the (hashed) idempotency key `key`.
    async fn verification_by_idempotency_key(
        &self,
        key: &str,
    ) -> Result<Option<VerificationRecord>, StoreError>;

    /// The measures in force at `now` on any of `scopes`.
    async fn measures(&self, scopes: &[String], now: i64) -> Result<Vec<BlockRecord>, StoreError>;

    /// Puts `measure` on `scope` until `until`; its `created_at` is kept when the scope already
    /// had this measure (an extension), else set to `now`.
    async fn set_measure(
        &self,
        scope: &str,
        measure: Measure,
        until: i64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Lifts the measure on `scope`; whether there was one.
    async fn remove_block(&self, scope: &str) -> Result<bool, StoreError>;

    /// The measures in force at `now`.
    async fn blocks(&self, now: i64) -> Result<Vec<BlockRecord>, StoreError>;

    /// The counters of each of `scopes` (in that order) from ten-minute bucket `since_bucket`
    /// on.
    async fn traffic(
        &self,
        scopes: &[String],
        since_bucket: i64,
    ) -> Result<Vec<Traffic>, StoreError>;

    /// Reserves one message of UTC day `day` under every `(scope, cap)`, all or none, never
    /// passing a cap: `None` when reserved, else the index of the cap that is reached.
    async fn reserve_daily(
        &self,
        caps: &[(String, u32)],
        day: i64,
    ) -> Result<Option<usize>, StoreError>;

    /// Gives back reservations of a message that did not go out.
    async fn release_daily(&self, scopes: &[String], day: i64) -> Result<(), StoreError>;

    /// Messages reserved on UTC day `day`, per scope.
    async fn daily_sends(&self, day: i64) -> Result<Vec<(String, u64)>, StoreError>;

    /// Counts a message that went out.
    async fn record_sent(&self, s: &SentRecord) -> Result<(), StoreError>;

    /// Counts a completed verification under `scopes` in bucket `bucket`.
    async fn record_completed(&self, scopes: &[String], bucket: i64) -> Result<(), StoreError>;

    /// The spend counters from UTC day `since_day` on.
    async fn spend(&self, since_day: i64) -> Result<Vec<SpendRecord>, StoreError>;

    /// Replaces the account's key if it still is `c.old_fingerprint`, recording the event in the
    /// same transaction; whether it did.
    async fn replace_key(&self, account: &str, c: &KeyChange) -> Result<bool, StoreError>;

    /// Records that a forced re-registration of `account` started, for its key's owner, if the
    /// account exists (with its current key as the old fingerprint); whether it did.
    async fn reregistration_started(
        &self,
        account: &str,
        now: i64,
        notice: &Notice,
    ) -> Result<bool, StoreError>;

    /// Deletes the account if its key still is `fingerprint` (and its verifications and key
    /// transfer), recording
    /// the event in the same transaction; whether it did.
    async fn remove_account(
        &self,
        account: &str,
        fingerprint: &str,
        now: i64,
        notice: &Notice,
    ) -> Result<bool, StoreError>;

    /// Marks that a correct code was found for verification `id` (its key is being certified).
    async fn mark_completing(&self, id: &str, now: i64) -> Result<(), StoreError>;

    /// Whether `account` has retired the key `fingerprint` (replaced it by a forced
    /// re-registration or a rollover).
    async fn is_retired_key(&self, account: &str, fingerprint: &str) -> Result<bool, StoreError>;

    /// Stores a key transfer, replacing any earlier one of the same account.
    async fn put_key_transfer(&self, t: &KeyTransferRecord) -> Result<(), StoreError>;

    /// Deletes and returns the key transfer of `token_hash` (at most once, whoever asks), if
    /// it has not expired at `now`.
    async fn take_key_transfer(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<Option<KeyTransferRecord>, StoreError>;

    /// Records a nonce until `expires_at`; false when it was already recorded (a replay).
    async fn use_nonce(&self, key: &str, expires_at: i64) -> Result<bool, StoreError>;

    /// Claims up to `limit` undelivered events for `sink` that are due at `now`: each is held
    /// until `lease_until` (when it is tried again unless marked delivered), so that instances
    /// sharing the database do not deliver it at the same time.
    async fn claim_events(
        &self,
        sink: &str,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Deletes a delivered event row.
    async fn event_delivered(&self, id: i64) -> Result<(), StoreError>;

    /// Counts a failed delivery and sets the next try.
    async fn event_failed(&self, id: i64, next_attempt_at: i64) -> Result<(), StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;

    /// The newest migration applied.
    async fn schema_version(&self) -> Result<i64, StoreError>;
}
