//! Verifications and the steps that change them: start and resend plans, delivery results,
//! code tries and completions.

use async_trait::async_trait;
use registrar_providers::{Challenge, DeliveryState};

use super::accounts::Notice;
use super::limits::{MeasureChange, RateBucket, SentRecord};
use super::{StoreError, Time};
use crate::phone::{AccountId, PhoneNumber};
use crate::registrar::VerificationId;

/// A verification as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationRecord {
    /// Its id.
    pub id: VerificationId,
    /// The number. Kept only while the verification lives: it is purged with it.
    pub phone: PhoneNumber,
    /// The account it registers.
    pub account: AccountId,
    /// The challenge of the last delivery.
    pub challenge: Challenge,
    /// Whether it replaces an existing account's key.
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
    pub created_at: Time,
    /// When the current code expires.
    pub expires_at: Time,
    /// When a resend is allowed.
    pub next_resend_at: Time,
    /// When it was completed.
    pub verified_at: Option<Time>,
    /// Fingerprint of the key certified on completion.
    pub result_fingerprint: Option<String>,
    /// The certified key returned on completion (public data).
    pub result_key: Option<Vec<u8>>,
    /// The client's language.
    pub locale: Option<String>,
    /// What the last delivery receipt said.
    pub delivery_state: Option<DeliveryState>,
    /// Keyed hash of the client that started it (its IP network or JID).
    pub client: Option<String>,
    /// Keyed hash of the start request's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// When the last message went out.
    pub last_sent_at: Option<Time>,
}

/// What a start reads before it decides (no transaction: the plan's conditions settle races).
#[derive(Debug, Clone)]
pub struct StartQuery<'a> {
    /// The number.
    pub phone: &'a PhoneNumber,
    /// Its account.
    pub account: &'a AccountId,
    /// The keyed hash of the request's `Idempotency-Key`.
    pub idempotency_key: Option<&'a str>,
}

/// What a start found.
#[derive(Debug, Clone, Default)]
pub struct StartFacts {
    /// The number's verification, live or not (at most one exists).
    pub by_phone: Option<VerificationRecord>,
    /// The verification started with the same idempotency key, live or not.
    pub by_idempotency_key: Option<VerificationRecord>,
    /// Whether the number has an account.
    pub registered: bool,
}

/// A step's changes, applied by [`Verifications::apply`] in one transaction: `charge` first, all
/// or none (refused: nothing at all is written); then `measures`; then `write`, which either
/// happens whole or, when a cap or a concurrent request stops it, not at all while the charges and
/// measures stay (a refused request still costs its budget).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Now.
    pub now: Time,
    /// Rate-limit buckets to take one event from.
    pub charge: Vec<RateBucket>,
    /// Pumping measures to put on traffic scopes.
    pub measures: Vec<MeasureChange>,
    /// The step's own change.
    pub write: Write,
}

/// The change a [`Plan`] makes after its charges.
// Built once per request and passed by reference: boxing the large variant would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Write {
    /// None: the request is refused after paying for it.
    Nothing,
    /// A new verification.
    Create(NewVerification),
    /// A new code for a verification.
    Renew(Renew),
}

/// A new verification and what it takes.
#[derive(Debug, Clone)]
pub struct NewVerification {
    /// The row.
    pub record: VerificationRecord,
    /// The number's earlier verification, deleted with the insert: gone already means another
    /// request replaced it first ([`Applied::Conflict`]).
    pub replaces: Option<VerificationId>,
    /// An expired verification holding the same idempotency key, deleted to free it.
    pub frees: Option<VerificationId>,
    /// Daily caps: one message reserved under each `(scope, cap)` of UTC day `day`, never passing
    /// a cap.
    pub caps: Vec<(String, u32)>,
    /// The UTC day (Unix days).
    pub day: i64,
    /// Buckets taken as they are (they admitted one event when read, and the number's row
    /// settles concurrent starts of the number).
    pub take: Vec<RateBucket>,
}

/// A new code for verification `id`.
#[derive(Debug, Clone)]
pub struct Renew {
    /// The verification.
    pub id: VerificationId,
    /// Messages sent so far as read: of two concurrent resends, one renews.
    pub sends: u32,
    /// The new code.
    pub renewal: Renewal,
    /// Daily caps, as for a new verification.
    pub caps: Vec<(String, u32)>,
    /// The UTC day (Unix days).
    pub day: i64,
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
    pub expires_at: Time,
    /// Next resend.
    pub next_resend_at: Time,
    /// Now: when this message goes out.
    pub sent_at: Time,
}

/// How a [`Plan`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// All of it.
    Done,
    /// Nothing: bucket `charge[bucket]` is empty until `retry_at` (the latest of those refusing).
    RateLimited {
        /// Index into the plan's `charge`.
        bucket: usize,
        /// When it will admit one event again.
        retry_at: Time,
    },
    /// The charges and measures only: cap `caps[cap]` is reached.
    CapReached {
        /// Index into the write's `caps`.
        cap: usize,
    },
    /// The charges and measures only: another request changed the verification first (holds the
    /// number or the idempotency key, replaced or renewed it, completed it).
    Conflict,
}

/// What the provider reported for a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
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

/// The result of a delivery, recorded in one write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// It went out.
    Sent {
        /// What the provider said.
        delivery: Delivery,
        /// The traffic and spend counters to count it under (none for a test number).
        counted: Option<SentRecord>,
        /// For a forced re-registration: the event telling the owner of the account, recorded
        /// if the account still exists.
        owner: Option<(AccountId, Notice)>,
        /// Now.
        now: Time,
    },
    /// Nothing reached the user: the reservation under the daily caps is given back with it.
    Failed {
        /// A start's verification is deleted (the client may start again at once); a resend's
        /// stays, its resend allowed from now.
        delete: bool,
        /// The cap scopes reserved.
        caps: Vec<String>,
        /// Their UTC day.
        day: i64,
        /// Now.
        now: Time,
    },
}

/// Who submits a code, for counting tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// The verification's holder: the client holding its id (HTTP), or the client that started
    /// it (the same address before login, the same JID on the component).
    Holder,
    /// Another party, by a pseudonym (an XMPP JID's or an address's keyed hash).
    Peer(String),
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

/// The completion of a verification with a correct code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The verification.
    pub id: VerificationId,
    /// Its account.
    pub account: AccountId,
    /// The try to spend with it, within these budgets (`None`: spent already, when a provider
    /// checked the code).
    pub attempt: Option<(Requester, TryLimits)>,
    /// Fingerprint of the certified key.
    pub fingerprint: String,
    /// The certified key.
    pub public_key: Vec<u8>,
    /// Whether an existing account may be replaced.
    pub replace_account: bool,
    /// Now.
    pub now: Time,
    /// The event to record when an account's key is replaced.
    pub notice: Notice,
    /// Traffic scopes to count the completion under, in ten-minute bucket `.1` (that of the
    /// start); none for a test number.
    pub counted: Option<(Vec<String>, i64)>,
}

/// How a completion went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    /// Verification completed, account stored.
    Done,
    /// Another request completed (or removed) the verification first, or it expired.
    NotPending,
    /// The requester has no try left.
    NoTryLeft,
    /// The account exists and the verification was not forced.
    AccountExists,
}

/// Verifications.
#[async_trait]
pub trait Verifications: Send + Sync {
    /// The verification `id`, live or not.
    async fn verification(
        &self,
        id: &VerificationId,
    ) -> Result<Option<VerificationRecord>, StoreError>;

    /// The verification for `account`, live or not (at most one: one per number).
    async fn verification_by_account(
        &self,
        account: &AccountId,
    ) -> Result<Option<VerificationRecord>, StoreError>;

    /// What a start needs to decide.
    async fn start_facts(&self, q: &StartQuery<'_>) -> Result<StartFacts, StoreError>;

    /// Applies a start's or a resend's plan in one transaction.
    async fn apply(&self, plan: &Plan) -> Result<Applied, StoreError>;

    /// Records the result of the last delivery of `id` in one write; whether an owner's event
    /// was recorded.
    async fn record_delivery(
        &self,
        id: &VerificationId,
        outcome: &DeliveryOutcome,
    ) -> Result<bool, StoreError>;

    /// Spends one code try of `requester` if its budget is not used up (the holder's, or both
    /// the others' together and this peer's) and the verification is pending and live at `now`:
    /// the tries `requester` has spent, or `None`.
    async fn take_attempt(
        &self,
        id: &VerificationId,
        requester: &Requester,
        limits: TryLimits,
        now: Time,
    ) -> Result<Option<u32>, StoreError>;

    /// Spends the completion's try, marks the verification completed, stores the account, records
    /// the event and counts the completion, in one transaction.
    async fn complete(&self, c: &Completion) -> Result<CompleteOutcome, StoreError>;

    /// Deletes verification `id`; whether it existed.
    async fn delete_verification(&self, id: &VerificationId) -> Result<bool, StoreError>;

    /// Records a delivery receipt for the verification whose last delivery went through
    /// `provider` with reference `provider_ref`; whether one was found.
    async fn record_receipt(
        &self,
        provider: &str,
        provider_ref: &str,
        state: DeliveryState,
        now: Time,
    ) -> Result<bool, StoreError>;
}
