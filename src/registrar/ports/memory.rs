//! The ports in memory, for unit tests of the core: one lock around plain maps, with the same
//! conditions as the SQL adapters (a plan applies whole or not at all, a unique number, budgets
//! checked and spent together).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use registrar_providers::DeliveryState;

use super::*;
use crate::phone::AccountId;
use crate::registrar::VerificationId;
use crate::registrar::abuse;

/// Everything stored.
#[derive(Debug, Default, Clone)]
struct State {
    verifications: HashMap<String, VerificationRecord>,
    peer_attempts: HashMap<(String, String), u32>,
    accounts: HashMap<String, AccountRecord>,
    retired: HashSet<(String, String)>,
    transfers: HashMap<String, KeyTransferRecord>,
    nonces: HashMap<String, Time>,
    events: BTreeMap<i64, (String, EventRecord, Time)>,
    next_event: i64,
    rates: HashMap<String, i64>,
    blocks: BTreeMap<String, BlockRecord>,
    traffic: HashMap<(String, i64), Traffic>,
    seen: HashSet<(String, i64, u8, i64)>,
    daily: BTreeMap<(String, i64), u64>,
    spend: BTreeMap<(i64, String, String, String), SpendRecord>,
}

/// An in-memory store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages reserved under daily cap `scope` on UTC day `day`.
    pub fn reserved(&self, scope: &str, day: i64) -> u64 {
        self.lock()
            .daily
            .get(&(scope.to_owned(), day))
            .copied()
            .unwrap_or(0)
    }

    /// The counters of traffic scope `scope` in ten-minute bucket `bucket`.
    pub fn traffic_in(&self, scope: &str, bucket: i64) -> Traffic {
        self.lock()
            .traffic
            .get(&(scope.to_owned(), bucket))
            .copied()
            .unwrap_or_default()
    }

    /// The tat of rate bucket `key`, if it was ever taken from.
    pub fn rate(&self, key: &str) -> Option<i64> {
        self.lock().rates.get(key).copied()
    }

    /// Undelivered events (all sinks).
    pub fn events(&self) -> Vec<EventRecord> {
        self.lock()
            .events
            .values()
            .map(|(_, e, _)| e.clone())
            .collect()
    }
}

impl State {
    fn take_rates(&mut self, buckets: &[RateBucket], now_ms: i64) -> Option<(usize, i64)> {
        let mut next = Vec::with_capacity(buckets.len());
        let mut refused: Option<(usize, i64)> = None;
        for (i, b) in buckets.iter().enumerate() {
            match b.admit(self.rates.get(&b.key).copied().unwrap_or(0), now_ms) {
                Ok(t) => next.push(t),
                Err(at) => {
                    if refused.is_none_or(|(_, latest)| at > latest) {
                        refused = Some((i, at));
                    }
                }
            }
        }
        if refused.is_none() {
            for (b, t) in buckets.iter().zip(next) {
                self.rates.insert(b.key.clone(), t);
            }
        }
        refused
    }

    fn reserve(&mut self, caps: &[(String, u32)], day: i64) -> Option<usize> {
        for (i, (scope, cap)) in caps.iter().enumerate() {
            if self.daily.get(&(scope.clone(), day)).copied().unwrap_or(0) >= u64::from(*cap) {
                return Some(i);
            }
        }
        for (scope, _) in caps {
            *self.daily.entry((scope.clone(), day)).or_default() += 1;
        }
        None
    }

    fn create(&mut self, n: &NewVerification, now_ms: i64) -> Applied {
        let v = &n.record;
        if let Some(old) = &n.replaces
            && self.verifications.remove(old.as_str()).is_none()
        {
            return Applied::Conflict;
        }
        if let Some(expired) = &n.frees {
            self.verifications.remove(expired.as_str());
        }
        let taken = self.verifications.values().any(|o| {
            o.id == v.id
                || o.phone == v.phone
                || (v.idempotency_key.is_some() && o.idempotency_key == v.idempotency_key)
        });
        if taken {
            return Applied::Conflict;
        }
        if let Some(cap) = self.reserve(&n.caps, n.day) {
            return Applied::CapReached { cap };
        }
        for b in &n.take {
            let tat = self.rates.get(&b.key).copied().unwrap_or(0);
            self.rates
                .insert(b.key.clone(), tat.max(now_ms) + b.interval_ms);
        }
        self.verifications
            .insert(v.id.as_str().to_owned(), v.clone());
        Applied::Done
    }

    fn renew(&mut self, r: &Renew) -> Applied {
        let pending = self
            .verifications
            .get(r.id.as_str())
            .is_some_and(|v| v.sends == r.sends && v.verified_at.is_none());
        if !pending {
            return Applied::Conflict;
        }
        if let Some(cap) = self.reserve(&r.caps, r.day) {
            return Applied::CapReached { cap };
        }
        if let Some(v) = self.verifications.get_mut(r.id.as_str()) {
            let n = &r.renewal;
            v.challenge = n.challenge;
            v.code_hash = Some(n.code_hash.clone());
            v.code_length = n.code_length;
            v.expires_at = n.expires_at;
            v.next_resend_at = n.next_resend_at;
            v.sends += 1;
            v.provider_ref = None;
            v.delivery_state = None;
            v.last_sent_at = Some(n.sent_at);
        }
        Applied::Done
    }

    fn take_attempt(
        &mut self,
        id: &VerificationId,
        requester: &Requester,
        limits: TryLimits,
        now: Time,
    ) -> Option<u32> {
        let v = self.verifications.get_mut(id.as_str())?;
        if v.verified_at.is_some() || v.expires_at <= now {
            return None;
        }
        match requester {
            Requester::Holder => {
                if v.attempts >= limits.holder {
                    return None;
                }
                v.attempts += 1;
                v.total_attempts += 1;
                Some(v.attempts)
            }
            Requester::Peer(who) => {
                let key = (id.as_str().to_owned(), who.clone());
                let mine = self.peer_attempts.get(&key).copied().unwrap_or(0);
                if v.total_attempts - v.attempts >= limits.others || mine >= limits.per_peer {
                    return None;
                }
                v.total_attempts += 1;
                self.peer_attempts.insert(key, mine + 1);
                Some(mine + 1)
            }
        }
    }

    fn event(&mut self, sink: &str, e: EventRecord) {
        self.next_event += 1;
        let id = self.next_event;
        let due = e.occurred_at;
        self.events
            .insert(id, (sink.to_owned(), EventRecord { id, ..e }, due));
    }

    fn events(
        &mut self,
        notice: &Notice,
        kind: EventKind,
        account: &AccountId,
        old: Option<&str>,
        new: Option<&str>,
        now: Time,
    ) {
        for sink in &notice.sinks {
            self.event(
                sink,
                EventRecord {
                    id: 0,
                    event_id: notice.event_id.clone(),
                    kind,
                    account: account.clone(),
                    old_fingerprint: old.map(str::to_owned),
                    new_fingerprint: new.map(str::to_owned),
                    occurred_at: now,
                    attempts: 0,
                },
            );
        }
    }

    fn retire(&mut self, account: &AccountId, fingerprint: &str) {
        self.transfers.retain(|_, t| t.account != *account);
        self.retired
            .insert((account.as_str().to_owned(), fingerprint.to_owned()));
    }

    fn count_sent(&mut self, s: &SentRecord) {
        for scope in &s.scopes {
            let mut new = [0u64; 2];
            for (i, (kind, item)) in [(0u8, Some(s.number)), (1, s.source)]
                .into_iter()
                .enumerate()
            {
                if let Some(item) = item {
                    new[i] = u64::from(self.seen.insert((scope.clone(), s.bucket, kind, item)));
                }
            }
            let t = self.traffic.entry((scope.clone(), s.bucket)).or_default();
            t.sent += 1;
            t.numbers += new[0];
            t.sources += new[1];
        }
        let key = (
            s.day,
            s.provider.clone(),
            s.country.clone(),
            s.challenge.as_str().to_owned(),
        );
        self.spend
            .entry(key)
            .or_insert_with(|| SpendRecord {
                day: s.day,
                provider: s.provider.clone(),
                country: s.country.clone(),
                challenge: s.challenge,
                messages: 0,
            })
            .messages += 1;
    }
}

#[async_trait]
impl Verifications for MemoryStore {
    async fn verification(
        &self,
        id: &VerificationId,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        Ok(self.lock().verifications.get(id.as_str()).cloned())
    }

    async fn verification_by_account(
        &self,
        account: &AccountId,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        Ok(self
            .lock()
            .verifications
            .values()
            .find(|v| v.account == *account)
            .cloned())
    }

    async fn start_facts(&self, q: &StartQuery<'_>) -> Result<StartFacts, StoreError> {
        let s = self.lock();
        Ok(StartFacts {
            by_phone: s
                .verifications
                .values()
                .find(|v| v.phone == *q.phone)
                .cloned(),
            by_idempotency_key: q.idempotency_key.and_then(|k| {
                s.verifications
                    .values()
                    .find(|v| v.idempotency_key.as_deref() == Some(k))
                    .cloned()
            }),
            registered: s.accounts.contains_key(q.account.as_str()),
        })
    }

    async fn apply(&self, plan: &Plan) -> Result<Applied, StoreError> {
        let mut s = self.lock();
        let now_ms = plan.now.timestamp_millis();
        if let Some((bucket, retry_ms)) = s.take_rates(&plan.charge, now_ms) {
            return Ok(Applied::RateLimited {
                bucket,
                retry_at: chrono::DateTime::from_timestamp_millis(retry_ms).unwrap_or(plan.now),
            });
        }
        for m in &plan.measures {
            let created_at = s
                .blocks
                .get(&m.scope)
                .filter(|b| b.measure == m.measure && b.until > plan.now)
                .map_or(plan.now, |b| b.created_at);
            s.blocks.insert(
                m.scope.clone(),
                BlockRecord {
                    scope: m.scope.clone(),
                    measure: m.measure,
                    until: m.until,
                    reason: m.reason.clone(),
                    created_at,
                },
            );
        }
        // The write on a copy, kept only when it went through whole.
        let mut step = s.clone();
        let applied = match &plan.write {
            Write::Nothing => Applied::Done,
            Write::Create(n) => step.create(n, now_ms),
            Write::Renew(r) => step.renew(r),
        };
        if applied == Applied::Done {
            *s = step;
        }
        Ok(applied)
    }

    async fn record_delivery(
        &self,
        id: &VerificationId,
        outcome: &DeliveryOutcome,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock();
        match outcome {
            DeliveryOutcome::Sent {
                delivery,
                counted,
                owner,
                now,
            } => {
                if let Some(v) = s.verifications.get_mut(id.as_str()) {
                    v.provider = Some(delivery.provider.clone());
                    v.provider_ref = delivery.provider_ref.clone();
                    v.sender = Some(delivery.sender.clone());
                    v.code_length = delivery.code_length;
                    if let Some(h) = &delivery.code_hash {
                        v.code_hash = h.clone();
                    }
                }
                if let Some(c) = counted {
                    s.count_sent(c);
                }
                if let Some((account, notice)) = owner
                    && let Some(a) = s.accounts.get(account.as_str()).cloned()
                {
                    let old = Some(a.fingerprint.as_str());
                    s.events(
                        notice,
                        EventKind::ReregistrationStarted,
                        account,
                        old,
                        None,
                        *now,
                    );
                    return Ok(!notice.sinks.is_empty());
                }
            }
            DeliveryOutcome::Failed {
                delete,
                caps,
                day,
                now,
            } => {
                if *delete {
                    s.verifications.remove(id.as_str());
                } else if let Some(v) = s.verifications.get_mut(id.as_str()) {
                    v.next_resend_at = *now;
                }
                for scope in caps {
                    if let Some(n) = s.daily.get_mut(&(scope.clone(), *day)) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
        Ok(false)
    }

    async fn take_attempt(
        &self,
        id: &VerificationId,
        requester: &Requester,
        limits: TryLimits,
        now: Time,
    ) -> Result<Option<u32>, StoreError> {
        Ok(self.lock().take_attempt(id, requester, limits, now))
    }

    async fn complete(&self, c: &Completion) -> Result<CompleteOutcome, StoreError> {
        let mut s = self.lock();
        let pending = s
            .verifications
            .get(c.id.as_str())
            .is_some_and(|v| v.verified_at.is_none() && v.expires_at > c.now);
        if !pending {
            return Ok(CompleteOutcome::NotPending);
        }
        let previous = s.accounts.get(c.account.as_str()).cloned();
        if previous.is_some() && !c.replace_account {
            return Ok(CompleteOutcome::AccountExists);
        }
        let mut step = s.clone();
        if let Some((requester, limits)) = &c.attempt
            && step
                .take_attempt(&c.id, requester, *limits, c.now)
                .is_none()
        {
            return Ok(CompleteOutcome::NoTryLeft);
        }
        if let Some(v) = step.verifications.get_mut(c.id.as_str()) {
            v.verified_at = Some(c.now);
            v.result_fingerprint = Some(c.fingerprint.clone());
            v.result_key = Some(c.public_key.clone());
        }
        if let Some(old) = previous.as_ref().filter(|a| a.fingerprint != c.fingerprint) {
            let (old, new) = (Some(old.fingerprint.as_str()), Some(c.fingerprint.as_str()));
            step.events(
                &c.notice,
                EventKind::KeyReplaced,
                &c.account,
                old,
                new,
                c.now,
            );
            if let Some(old) = old {
                step.retire(&c.account, old);
            }
        }
        step.accounts.insert(
            c.account.as_str().to_owned(),
            AccountRecord {
                id: c.account.clone(),
                fingerprint: c.fingerprint.clone(),
                public_key: c.public_key.clone(),
                created_at: previous.map_or(c.now, |a| a.created_at),
                updated_at: c.now,
            },
        );
        if let Some((scopes, bucket)) = &c.counted {
            for scope in scopes {
                step.traffic
                    .entry((scope.clone(), *bucket))
                    .or_default()
                    .completed += 1;
            }
        }
        *s = step;
        Ok(CompleteOutcome::Done)
    }

    async fn delete_verification(&self, id: &VerificationId) -> Result<bool, StoreError> {
        Ok(self.lock().verifications.remove(id.as_str()).is_some())
    }

    async fn record_receipt(
        &self,
        provider: &str,
        provider_ref: &str,
        state: DeliveryState,
        _now: Time,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock();
        let mut found = false;
        for v in s.verifications.values_mut() {
            if v.provider.as_deref() == Some(provider)
                && v.provider_ref.as_deref() == Some(provider_ref)
            {
                v.delivery_state = Some(state);
                found = true;
            }
        }
        Ok(found)
    }
}

#[async_trait]
impl Limits for MemoryStore {
    async fn take_rates(
        &self,
        buckets: &[RateBucket],
        now: Time,
    ) -> Result<Option<(usize, Time)>, StoreError> {
        Ok(self
            .lock()
            .take_rates(buckets, now.timestamp_millis())
            .map(|(i, ms)| {
                (
                    i,
                    chrono::DateTime::from_timestamp_millis(ms).unwrap_or(now),
                )
            }))
    }

    async fn rate_free(&self, bucket: &RateBucket, now: Time) -> Result<bool, StoreError> {
        let tat = self.lock().rates.get(&bucket.key).copied().unwrap_or(0);
        Ok(bucket.admit(tat, now.timestamp_millis()).is_ok())
    }

    async fn pumping_facts(
        &self,
        scopes: &[String],
        since_bucket: i64,
        now: Time,
    ) -> Result<(Vec<BlockRecord>, Vec<Traffic>), StoreError> {
        let s = self.lock();
        let measures = s
            .blocks
            .values()
            .filter(|b| b.until > now && scopes.contains(&b.scope))
            .cloned()
            .collect();
        let traffic = scopes
            .iter()
            .map(|scope| {
                s.traffic
                    .iter()
                    .filter(|((sc, bucket), _)| sc == scope && *bucket >= since_bucket)
                    .fold(Traffic::default(), |a, (_, t)| Traffic {
                        sent: a.sent + t.sent,
                        completed: a.completed + t.completed,
                        numbers: a.numbers + t.numbers,
                        sources: a.sources + t.sources,
                    })
            })
            .collect();
        Ok((measures, traffic))
    }

    async fn remove_block(&self, scope: &str) -> Result<bool, StoreError> {
        Ok(self.lock().blocks.remove(scope).is_some())
    }

    async fn blocks(&self, now: Time) -> Result<Vec<BlockRecord>, StoreError> {
        Ok(self
            .lock()
            .blocks
            .values()
            .filter(|b| b.until > now)
            .cloned()
            .collect())
    }

    async fn daily_sends(&self, day: i64) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .lock()
            .daily
            .iter()
            .filter(|((_, d), _)| *d == day)
            .map(|((scope, _), n)| (scope.clone(), *n))
            .collect())
    }

    async fn spend(&self, since_day: i64) -> Result<Vec<SpendRecord>, StoreError> {
        Ok(self
            .lock()
            .spend
            .values()
            .filter(|r| r.day >= since_day)
            .cloned()
            .collect())
    }
}

#[async_trait]
impl Accounts for MemoryStore {
    async fn account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self.lock().accounts.get(id.as_str()).cloned())
    }

    async fn replace_key(&self, account: &AccountId, c: &KeyChange) -> Result<bool, StoreError> {
        let mut s = self.lock();
        match s.accounts.get_mut(account.as_str()) {
            Some(a) if a.fingerprint == c.old_fingerprint => {
                a.fingerprint = c.new_fingerprint.clone();
                a.public_key = c.public_key.clone();
                a.updated_at = c.now;
            }
            _ => return Ok(false),
        }
        s.retire(account, &c.old_fingerprint);
        let (old, new) = (
            Some(c.old_fingerprint.as_str()),
            Some(c.new_fingerprint.as_str()),
        );
        s.events(
            &c.notice,
            EventKind::KeyRolledOver,
            account,
            old,
            new,
            c.now,
        );
        Ok(true)
    }

    async fn remove_account(
        &self,
        account: &AccountId,
        fingerprint: &str,
        now: Time,
        notice: &Notice,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock();
        if s.accounts
            .get(account.as_str())
            .is_none_or(|a| a.fingerprint != fingerprint)
        {
            return Ok(false);
        }
        s.accounts.remove(account.as_str());
        s.verifications.retain(|_, v| v.account != *account);
        s.transfers.retain(|_, t| t.account != *account);
        s.retired.retain(|(a, _)| a != account.as_str());
        s.events(
            notice,
            EventKind::AccountRemoved,
            account,
            Some(fingerprint),
            None,
            now,
        );
        Ok(true)
    }

    async fn is_retired_key(
        &self,
        account: &AccountId,
        fingerprint: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .retired
            .contains(&(account.as_str().to_owned(), fingerprint.to_owned())))
    }

    async fn put_key_transfer(&self, t: &KeyTransferRecord) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.transfers.retain(|_, o| o.account != t.account);
        s.transfers.insert(t.token_hash.clone(), t.clone());
        Ok(())
    }

    async fn take_key_transfer(
        &self,
        token_hash: &str,
        now: Time,
    ) -> Result<Option<KeyTransferRecord>, StoreError> {
        Ok(self
            .lock()
            .transfers
            .remove(token_hash)
            .filter(|t| t.expires_at > now))
    }

    async fn use_nonce(&self, key: &str, expires_at: Time) -> Result<bool, StoreError> {
        let mut s = self.lock();
        if s.nonces.contains_key(key) {
            return Ok(false);
        }
        s.nonces.insert(key.to_owned(), expires_at);
        Ok(true)
    }

    async fn claim_events(
        &self,
        sink: &str,
        now: Time,
        lease_until: Time,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut s = self.lock();
        let mut claimed = Vec::new();
        for (sink_of, e, due) in s.events.values_mut() {
            if claimed.len() as u32 >= limit {
                break;
            }
            if sink_of == sink && *due <= now {
                *due = lease_until;
                claimed.push(e.clone());
            }
        }
        Ok(claimed)
    }

    async fn event_delivered(&self, id: i64) -> Result<(), StoreError> {
        self.lock().events.remove(&id);
        Ok(())
    }

    async fn event_failed(&self, id: i64, next_attempt_at: Time) -> Result<(), StoreError> {
        if let Some((_, e, due)) = self.lock().events.get_mut(&id) {
            e.attempts += 1;
            *due = next_attempt_at;
        }
        Ok(())
    }
}

#[async_trait]
impl Maintenance for MemoryStore {
    async fn purge_expired(&self, now: Time) -> Result<u64, StoreError> {
        let mut s = self.lock();
        let before = s.verifications.len();
        s.verifications.retain(|_, v| v.expires_at > now);
        let t = now.timestamp();
        s.blocks.retain(|_, b| b.until >= now);
        s.traffic
            .retain(|(_, bucket), _| *bucket >= abuse::bucket(t - TRAFFIC_RETENTION));
        s.seen
            .retain(|(_, bucket, _, _)| *bucket >= abuse::bucket(t) - 1);
        s.daily.retain(|(_, day), _| *day >= abuse::day(t) - 2);
        s.spend
            .retain(|(day, ..), _| *day >= abuse::day(t - SPEND_RETENTION));
        s.nonces.retain(|_, expires| *expires >= now);
        s.transfers.retain(|_, tr| tr.expires_at > now);
        Ok((before - s.verifications.len()) as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registrar::abuse::Measure;

    #[tokio::test]
    async fn a_refused_charge_writes_nothing() {
        let store = MemoryStore::new();
        let now = chrono::Utc::now();
        let rate = abuse::Rate::new(1, std::time::Duration::from_secs(60));
        let plan = |key: &str| Plan {
            now,
            charge: vec![RateBucket::new(key.into(), rate)],
            measures: vec![MeasureChange {
                scope: "country:39".into(),
                measure: Measure::Call,
                until: now + chrono::Duration::seconds(60),
                reason: "test".into(),
            }],
            write: Write::Nothing,
        };
        assert_eq!(store.apply(&plan("a")).await.unwrap(), Applied::Done);
        assert_eq!(store.blocks(now).await.unwrap().len(), 1);
        store.remove_block("country:39").await.unwrap();
        let refused = store.apply(&plan("a")).await.unwrap();
        assert!(matches!(refused, Applied::RateLimited { bucket: 0, .. }));
        assert!(store.blocks(now).await.unwrap().is_empty());
    }
}
