//! Rate-limit buckets, pumping measures, traffic and spend counters, daily caps.

use async_trait::async_trait;
use registrar_providers::Challenge;

use super::{StoreError, Time};
use crate::registrar::abuse::{Measure, Rate};

/// How long traffic counters are kept (the pumping window cannot be longer).
pub const TRAFFIC_RETENTION: i64 = 7 * 86_400;

/// How long the spend report's daily counts are kept.
pub const SPEND_RETENTION: i64 = 400 * 86_400;

/// A rate-limit bucket (the generic cell rate algorithm): each event moves the bucket's
/// theoretical arrival time (`tat`, milliseconds) `interval_ms` past the later of itself and
/// now; an event is admitted while the new `tat` is at most `burst_ms` ahead of now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateBucket {
    /// The bucket (action, scope and value; numbers and IPs as keyed hashes).
    pub key: String,
    /// Milliseconds one event costs.
    pub interval_ms: i64,
    /// How far ahead of now the arrival time may run (a full burst).
    pub burst_ms: i64,
}

impl RateBucket {
    /// The bucket `key` limited to `rate`.
    pub fn new(key: String, rate: Rate) -> Self {
        let interval_ms = rate.interval_ms();
        Self {
            key,
            interval_ms,
            burst_ms: interval_ms.saturating_mul(i64::from(rate.count.max(1))),
        }
    }

    /// GCRA: one event at `now_ms` (ms) on a bucket whose theoretical arrival time is `tat` (ms;
    /// 0 for a new bucket): the new `tat` when it is admitted, or when one will be.
    pub fn admit(&self, tat: i64, now_ms: i64) -> Result<i64, i64> {
        let next = tat.max(now_ms).saturating_add(self.interval_ms);
        if next - now_ms <= self.burst_ms {
            Ok(next)
        } else {
            Err(next - self.burst_ms)
        }
    }
}

/// A measure of the pumping defence on a traffic scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    /// Where (`prefix:<digits>`, `country:<code>`).
    pub scope: String,
    /// What.
    pub measure: Measure,
    /// Until when.
    pub until: Time,
    /// Why.
    pub reason: String,
    /// Since when (kept while the same measure is extended).
    pub created_at: Time,
}

/// A pumping measure to put on a scope: its `created_at` is kept when the scope already has this
/// measure (an extension), else set to now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasureChange {
    /// Where.
    pub scope: String,
    /// What.
    pub measure: Measure,
    /// Until when.
    pub until: Time,
    /// Why.
    pub reason: String,
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

/// Limits and counters.
#[async_trait]
pub trait Limits: Send + Sync {
    /// Takes one event from every bucket at `now`, all or none, in one transaction: `None` when
    /// taken, else the refusing bucket with the latest time a retry can succeed.
    async fn take_rates(
        &self,
        buckets: &[RateBucket],
        now: Time,
    ) -> Result<Option<(usize, Time)>, StoreError>;

    /// Whether `bucket` would admit one event at `now` (nothing is taken).
    async fn rate_free(&self, bucket: &RateBucket, now: Time) -> Result<bool, StoreError>;

    /// The measures in force at `now` on any of `scopes`, and the counters of each of `scopes`
    /// (in that order) from ten-minute bucket `since_bucket` on.
    async fn pumping_facts(
        &self,
        scopes: &[String],
        since_bucket: i64,
        now: Time,
    ) -> Result<(Vec<BlockRecord>, Vec<Traffic>), StoreError>;

    /// Lifts the measure on `scope`; whether there was one.
    async fn remove_block(&self, scope: &str) -> Result<bool, StoreError>;

    /// The measures in force at `now`.
    async fn blocks(&self, now: Time) -> Result<Vec<BlockRecord>, StoreError>;

    /// Messages reserved on UTC day `day`, per scope.
    async fn daily_sends(&self, day: i64) -> Result<Vec<(String, u64)>, StoreError>;

    /// The spend counters from UTC day `since_day` on.
    async fn spend(&self, since_day: i64) -> Result<Vec<SpendRecord>, StoreError>;
}
