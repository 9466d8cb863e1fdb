//! What the core needs from persistence: small traits by concern, in the core's own types.
//!
//! The core decides, the store applies. A step that changes state (a start, a resend, a
//! completion, a delivery result) hands the store one plan, which it applies in **one**
//! transaction, all of it or, where the plan says so, the charges and nothing else; nothing is
//! ever given back by hand after a failure. Every guarantee that must hold across instances (one
//! pending verification per number, no outrunning the try counters or the rate limits, an
//! account created once) is a constraint or a conditional write in the store, never a lock in one
//! process, so the adapters (`crate::store` for SQLite and PostgreSQL, [`memory`] for tests)
//! implement the same conditions.

mod accounts;
mod limits;
pub mod memory;
mod verifications;

pub use accounts::{
    AccountRecord, Accounts, EventKind, EventRecord, KeyChange, KeyTransferRecord, Notice,
};
pub use limits::{
    BlockRecord, Limits, MeasureChange, RateBucket, SPEND_RETENTION, SentRecord, SpendRecord,
    TRAFFIC_RETENTION, Traffic,
};
pub use verifications::{
    Applied, CompleteOutcome, Completion, Delivery, DeliveryOutcome, NewVerification, Plan, Renew,
    Renewal, Requester, StartFacts, StartQuery, TryLimits, VerificationRecord, Verifications,
    Write,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// A point in time as the store keeps it (whole seconds, except rate-limit times).
pub type Time = DateTime<Utc>;

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
    /// The database failed, or holds what this binary cannot read.
    #[error("database: {0}")]
    Database(String),
}

/// Housekeeping and health.
#[async_trait]
pub trait Maintenance: Send + Sync {
    /// Deletes verifications that expired before `now` (how many), and counters that no window
    /// or report needs any more.
    async fn purge_expired(&self, now: Time) -> Result<u64, StoreError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// `sqlite`, `postgres` or `memory`.
    fn kind(&self) -> &'static str;

    /// The newest migration applied.
    async fn schema_version(&self) -> Result<i64, StoreError>;
}

/// Everything the core needs, in one object.
pub trait Store: Verifications + Accounts + Limits + Maintenance {}

impl<T: Verifications + Accounts + Limits + Maintenance> Store for T {}
