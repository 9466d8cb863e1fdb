// The ports implemented over sqlx, written once and compiled for each backend: the including
// module defines `This` (the store, with `write` and `read` pools), `Db` (the sqlx database),
// `Conn` (its connection), `BEGIN` (how a write transaction opens), `KIND`, and the statements
// whose SQL differs (`TAKE_RATE`, `TAKE_RATE_ANYWAY`, `ACCOUNT_FINGERPRINT_FOR_UPDATE`).
//
// Each step that changes state is one transaction; the helpers below take the transaction's
// connection, so that a step is read top to bottom as the statements it runs.

use async_trait::async_trait;
use sqlx::Acquire as _;

use super::queries as q;
use super::rows::{
    AccountRow, BlockRow, EventRow, KeyTransferRow, SpendRow, TrafficRow, VerificationRow,
};
use crate::phone::AccountId;
use crate::registrar::VerificationId;
use crate::registrar::ports::{
    AccountRecord, Accounts, Applied, BlockRecord, CompleteOutcome, Completion, DeliveryOutcome,
    EventKind, EventRecord, KeyChange, KeyTransferRecord, Limits, Maintenance, MeasureChange,
    NewVerification, Notice, Plan, RateBucket, Renew, Requester, SPEND_RETENTION, SentRecord,
    SpendRecord, StartFacts, StartQuery, TRAFFIC_RETENTION, Time, Traffic, TryLimits,
    VerificationRecord, Verifications, Write,
};
use crate::registrar::abuse;

type Tx = sqlx::Transaction<'static, Db>;

/// Takes one event from `b` at `now_ms`: `None` when admitted, else when it will be.
async fn take_rate(c: &mut Conn, b: &RateBucket, now_ms: i64) -> Result<Option<i64>, StoreError> {
    let taken = sqlx::query(TAKE_RATE)
        .bind(&b.key)
        .bind(now_ms)
        .bind(b.interval_ms)
        .bind(b.burst_ms)
        .execute(&mut *c)
        .await
        .map_err(db)?;
    if taken.rows_affected() > 0 {
        return Ok(None);
    }
    let tat: i64 = sqlx::query_scalar(q::TAT)
        .bind(&b.key)
        .fetch_one(&mut *c)
        .await
        .map_err(db)?;
    // When the bucket will admit one again: its arrival time less a burst.
    Ok(Some(
        tat.max(now_ms)
            .saturating_add(b.interval_ms)
            .saturating_sub(b.burst_ms),
    ))
}

/// Takes one event from every bucket, all or none (in key order, so that two transactions never
/// wait for each other in a cycle): the refusing bucket with the latest retry time.
async fn take_rates_in(
    c: &mut Conn,
    buckets: &[RateBucket],
    now_ms: i64,
) -> Result<Option<(usize, i64)>, StoreError> {
    let mut order: Vec<usize> = (0..buckets.len()).collect();
    order.sort_by(|&a, &b| buckets[a].key.cmp(&buckets[b].key));
    let mut refused: Option<(usize, i64)> = None;
    for i in order {
        if let Some(at) = take_rate(c, &buckets[i], now_ms).await?
            && refused.is_none_or(|(_, latest)| at > latest)
        {
            refused = Some((i, at));
        }
    }
    Ok(refused)
}

/// Reserves one message under every cap, never passing one: the index of a cap reached.
async fn reserve_daily(
    c: &mut Conn,
    caps: &[(String, u32)],
    day: i64,
) -> Result<Option<usize>, StoreError> {
    for (i, (scope, cap)) in caps.iter().enumerate() {
        let taken = sqlx::query(q::RESERVE_DAILY)
            .bind(scope)
            .bind(day)
            .bind(i64::from(*cap))
            .execute(&mut *c)
            .await
            .map_err(db)?;
        if taken.rows_affected() == 0 || *cap == 0 {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

async fn set_measure(c: &mut Conn, m: &MeasureChange, now: Time) -> Result<(), StoreError> {
    sqlx::query(q::SET_MEASURE)
        .bind(&m.scope)
        .bind(m.measure.as_str())
        .bind(m.until.timestamp())
        .bind(&m.reason)
        .bind(now.timestamp())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

async fn execute_by(c: &mut Conn, query: &'static str, value: &str) -> Result<u64, StoreError> {
    Ok(sqlx::query(query)
        .bind(value)
        .execute(&mut *c)
        .await
        .map_err(db)?
        .rows_affected())
}

async fn insert_verification(c: &mut Conn, v: &VerificationRecord) -> Result<(), StoreError> {
    sqlx::query(q::INSERT_VERIFICATION)
        .bind(v.id.as_str())
        .bind(v.phone.as_str())
        .bind(v.account.as_str())
        .bind(v.challenge.as_str())
        .bind(v.force)
        .bind(&v.code_hash)
        .bind(i64::from(v.code_length))
        .bind(&v.provider)
        .bind(&v.provider_ref)
        .bind(&v.sender)
        .bind(i64::from(v.attempts))
        .bind(i64::from(v.total_attempts))
        .bind(i64::from(v.sends))
        .bind(v.created_at.timestamp())
        .bind(v.expires_at.timestamp())
        .bind(v.next_resend_at.timestamp())
        .bind(v.verified_at.map(|t| t.timestamp()))
        .bind(&v.result_fingerprint)
        .bind(&v.result_key)
        .bind(&v.locale)
        .bind(v.delivery_state.map(|d| d.as_str()))
        .bind(&v.client)
        .bind(&v.idempotency_key)
        .bind(v.last_sent_at.map(|t| t.timestamp()))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// A new verification with what it takes; `Conflict` or `CapReached` leave the savepoint to be
/// rolled back.
async fn create(c: &mut Conn, n: &NewVerification, now_ms: i64) -> Result<Applied, StoreError> {
    if let Some(old) = &n.replaces
        && execute_by(c, q::DELETE_VERIFICATION, old.as_str()).await? == 0
    {
        return Ok(Applied::Conflict);
    }
    if let Some(expired) = &n.frees {
        execute_by(c, q::DELETE_VERIFICATION, expired.as_str()).await?;
    }
    if let Some(cap) = reserve_daily(c, &n.caps, n.day).await? {
        return Ok(Applied::CapReached { cap });
    }
    for b in &n.take {
        sqlx::query(TAKE_RATE_ANYWAY)
            .bind(&b.key)
            .bind(now_ms)
            .bind(b.interval_ms)
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    match insert_verification(c, &n.record).await {
        Ok(()) => Ok(Applied::Done),
        Err(StoreError::Conflict) => Ok(Applied::Conflict),
        Err(e) => Err(e),
    }
}

async fn renew(c: &mut Conn, r: &Renew) -> Result<Applied, StoreError> {
    if let Some(cap) = reserve_daily(c, &r.caps, r.day).await? {
        return Ok(Applied::CapReached { cap });
    }
    let n = &r.renewal;
    let renewed = sqlx::query(q::RENEW_CODE)
        .bind(r.id.as_str())
        .bind(i64::from(r.sends))
        .bind(n.challenge.as_str())
        .bind(&n.code_hash)
        .bind(i64::from(n.code_length))
        .bind(n.expires_at.timestamp())
        .bind(n.next_resend_at.timestamp())
        .bind(n.sent_at.timestamp())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(if renewed.rows_affected() == 1 {
        Applied::Done
    } else {
        Applied::Conflict
    })
}

/// Counts a message under its scopes, in three statements whatever their number: a number or
/// client is new to a scope's bucket when its `traffic_seen` row goes in (the insert returns the
/// new ones), so the counters hold distinct counts per bucket, summed over the window in one
/// indexed read.
async fn count_sent(c: &mut Conn, s: &SentRecord) -> Result<(), StoreError> {
    if !s.scopes.is_empty() {
        let items: Vec<(i32, i64)> = [(q::SEEN_NUMBER, Some(s.number)), (q::SEEN_SOURCE, s.source)]
            .into_iter()
            .filter_map(|(kind, item)| Some((kind, item?)))
            .collect();
        // Only numbered placeholders are formatted into these: no input reaches the text.
        let seen = q::seen(s.scopes.len() * items.len());
        let mut query = sqlx::query_as::<_, (String, i32)>(sqlx::AssertSqlSafe(seen));
        for scope in &s.scopes {
            for (kind, item) in &items {
                query = query.bind(scope).bind(s.bucket).bind(*kind).bind(*item);
            }
        }
        let new = query.fetch_all(&mut *c).await.map_err(db)?;
        let is_new = |scope: &str, kind: i32| i64::from(new.iter().any(|(s, k)| s == scope && *k == kind));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(q::count_sent(s.scopes.len())));
        for scope in &s.scopes {
            query = query
                .bind(scope)
                .bind(s.bucket)
                .bind(is_new(scope, q::SEEN_NUMBER))
                .bind(is_new(scope, q::SEEN_SOURCE));
        }
        query.execute(&mut *c).await.map_err(db)?;
    }
    sqlx::query(q::COUNT_SPEND)
        .bind(s.day)
        .bind(&s.provider)
        .bind(&s.country)
        .bind(s.challenge.as_str())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// One `events` row per sink of `notice`.
async fn insert_events(
    c: &mut Conn,
    notice: &Notice,
    kind: EventKind,
    account: &AccountId,
    old: Option<&str>,
    new: Option<&str>,
    now: Time,
) -> Result<(), StoreError> {
    for sink in &notice.sinks {
        sqlx::query(q::INSERT_EVENT)
            .bind(&notice.event_id)
            .bind(sink)
            .bind(kind.as_str())
            .bind(account.as_str())
            .bind(old)
            .bind(new)
            .bind(now.timestamp())
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    Ok(())
}

/// The account's key `fingerprint` stops being its key at `now`: it is retired, and a private
/// key of it waiting for another device is deleted.
async fn retire_key(
    c: &mut Conn,
    account: &AccountId,
    fingerprint: &str,
    now: Time,
) -> Result<(), StoreError> {
    execute_by(c, q::DELETE_KEY_TRANSFER_OF, account.as_str()).await?;
    sqlx::query(q::RETIRE_KEY)
        .bind(account.as_str())
        .bind(fingerprint)
        .bind(now.timestamp())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// Spends one try of `requester`: the tries it has spent, or `None` when its budget is used up
/// or the verification is no longer pending and live.
async fn take_attempt_in(
    c: &mut Conn,
    id: &VerificationId,
    requester: &Requester,
    limits: TryLimits,
    now: Time,
) -> Result<Option<u32>, StoreError> {
    let spent = match requester {
        Requester::Holder => sqlx::query_scalar::<_, i64>(q::TAKE_HOLDER_ATTEMPT)
            .bind(id.as_str())
            .bind(i64::from(limits.holder))
            .bind(now.timestamp())
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?,
        Requester::Peer(who) => {
            let total = sqlx::query(q::TAKE_OTHERS_ATTEMPT)
                .bind(id.as_str())
                .bind(i64::from(limits.others))
                .bind(now.timestamp())
                .execute(&mut *c)
                .await
                .map_err(db)?;
            if total.rows_affected() == 0 {
                return Ok(None);
            }
            sqlx::query_scalar::<_, i64>(q::TAKE_PEER_ATTEMPT)
                .bind(id.as_str())
                .bind(who)
                .bind(i64::from(limits.per_peer))
                .fetch_optional(&mut *c)
                .await
                .map_err(db)?
        }
    };
    Ok(spent.map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX)))
}

async fn begin(pool: &sqlx::Pool<Db>) -> Result<Tx, StoreError> {
    pool.begin_with(BEGIN).await.map_err(db)
}

#[async_trait]
impl Verifications for This {
    async fn verification(
        &self,
        id: &VerificationId,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        sqlx::query_as::<_, VerificationRow>(q::VERIFICATION_BY_ID)
            .bind(id.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(db)?
            .map(TryInto::try_into)
            .transpose()
    }

    async fn verification_by_account(
        &self,
        account: &AccountId,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        sqlx::query_as::<_, VerificationRow>(q::VERIFICATION_BY_ACCOUNT)
            .bind(account.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(db)?
            .map(TryInto::try_into)
            .transpose()
    }

    async fn start_facts(&self, s: &StartQuery<'_>) -> Result<StartFacts, StoreError> {
        let mut c = self.read.acquire().await.map_err(db)?;
        let rows = sqlx::query_as::<_, VerificationRow>(q::VERIFICATIONS_OF_START)
            .bind(s.phone.as_str())
            .bind(s.idempotency_key)
            .fetch_all(&mut *c)
            .await
            .map_err(db)?;
        let registered = sqlx::query(q::ACCOUNT_EXISTS)
            .bind(s.account.as_str())
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?
            .is_some();
        let mut facts = StartFacts {
            registered,
            ..StartFacts::default()
        };
        for row in rows {
            let v: VerificationRecord = row.try_into()?;
            if s.idempotency_key.is_some() && v.idempotency_key.as_deref() == s.idempotency_key {
                facts.by_idempotency_key = Some(v.clone());
            }
            if v.phone == *s.phone {
                facts.by_phone = Some(v);
            }
        }
        Ok(facts)
    }

    async fn apply(&self, plan: &Plan) -> Result<Applied, StoreError> {
        let now_ms = plan.now.timestamp_millis();
        let mut tx = begin(&self.write).await?;
        if let Some((bucket, retry_ms)) = take_rates_in(&mut tx, &plan.charge, now_ms).await? {
            tx.rollback().await.map_err(db)?;
            return Ok(Applied::RateLimited {
                bucket,
                retry_at: chrono::DateTime::from_timestamp_millis(retry_ms)
                    .unwrap_or(plan.now + chrono::Duration::seconds(1)),
            });
        }
        for m in &plan.measures {
            set_measure(&mut tx, m, plan.now).await?;
        }
        // The step's own change either happens whole, or is rolled back to here while the
        // charges and measures stay.
        let mut step = (&mut tx).begin().await.map_err(db)?;
        let applied = match &plan.write {
            Write::Nothing => Applied::Done,
            Write::Create(n) => create(&mut step, n, now_ms).await?,
            Write::Renew(r) => renew(&mut step, r).await?,
        };
        if applied == Applied::Done {
            step.commit().await.map_err(db)?;
        } else {
            step.rollback().await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(applied)
    }

    async fn record_delivery(
        &self,
        id: &VerificationId,
        outcome: &DeliveryOutcome,
    ) -> Result<bool, StoreError> {
        let mut tx = begin(&self.write).await?;
        let mut told = false;
        match outcome {
            DeliveryOutcome::Sent {
                delivery: d,
                counted,
                owner,
                now,
            } => {
                let (replace_hash, hash) = match &d.code_hash {
                    Some(h) => (true, h.clone()),
                    None => (false, None),
                };
                sqlx::query(q::RECORD_DELIVERY)
                    .bind(id.as_str())
                    .bind(&d.provider)
                    .bind(&d.provider_ref)
                    .bind(&d.sender)
                    .bind(i64::from(d.code_length))
                    .bind(replace_hash)
                    .bind(hash)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                if let Some(s) = counted {
                    count_sent(&mut tx, s).await?;
                }
                if let Some((account, notice)) = owner {
                    for sink in &notice.sinks {
                        let r = sqlx::query(q::INSERT_EVENT_OF_ACCOUNT)
                            .bind(&notice.event_id)
                            .bind(sink)
                            .bind(EventKind::ReregistrationStarted.as_str())
                            .bind(account.as_str())
                            .bind(now.timestamp())
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                        told |= r.rows_affected() > 0;
                    }
                }
            }
            DeliveryOutcome::Failed {
                delete,
                caps,
                day,
                now,
            } => {
                if *delete {
                    execute_by(&mut tx, q::DELETE_VERIFICATION, id.as_str()).await?;
                } else {
                    sqlx::query(q::ALLOW_RESEND)
                        .bind(id.as_str())
                        .bind(now.timestamp())
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                for scope in caps {
                    sqlx::query(q::RELEASE_DAILY)
                        .bind(scope)
                        .bind(day)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(told)
    }

    async fn take_attempt(
        &self,
        id: &VerificationId,
        requester: &Requester,
        limits: TryLimits,
        now: Time,
    ) -> Result<Option<u32>, StoreError> {
        let mut tx = begin(&self.write).await?;
        let spent = take_attempt_in(&mut tx, id, requester, limits, now).await?;
        if spent.is_some() {
            tx.commit().await.map_err(db)?;
        }
        Ok(spent)
    }

    async fn complete(&self, c: &Completion) -> Result<CompleteOutcome, StoreError> {
        let mut tx = begin(&self.write).await?;
        if let Some((requester, limits)) = &c.attempt
            && take_attempt_in(&mut tx, &c.id, requester, *limits, c.now)
                .await?
                .is_none()
        {
            // Used up, or no longer pending: the marking below tells which.
            let pending = sqlx::query(q::PENDING)
                .bind(c.id.as_str())
                .bind(c.now.timestamp())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .is_some();
            return Ok(if pending {
                CompleteOutcome::NoTryLeft
            } else {
                CompleteOutcome::NotPending
            });
        }
        let marked = sqlx::query(q::MARK_VERIFIED)
            .bind(c.id.as_str())
            .bind(c.now.timestamp())
            .bind(&c.fingerprint)
            .bind(&c.public_key)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if marked.rows_affected() == 0 {
            return Ok(CompleteOutcome::NotPending);
        }
        let previous: Option<String> = sqlx::query_scalar(ACCOUNT_FINGERPRINT_FOR_UPDATE)
            .bind(c.account.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if previous.is_some() && !c.replace_account {
            return Ok(CompleteOutcome::AccountExists);
        }
        // A forced re-registration with another key: the old key's sessions must go, and so
        // does a private key of it waiting for another device.
        if let Some(old) = previous.filter(|old| *old != c.fingerprint) {
            let new = Some(c.fingerprint.as_str());
            insert_events(&mut tx, &c.notice, EventKind::KeyReplaced, &c.account, Some(&old), new, c.now)
                .await?;
            retire_key(&mut tx, &c.account, &old, c.now).await?;
        }
        sqlx::query(q::UPSERT_ACCOUNT)
            .bind(c.account.as_str())
            .bind(&c.fingerprint)
            .bind(&c.public_key)
            .bind(c.now.timestamp())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if let Some((scopes, bucket)) = c.counted.as_ref().filter(|(s, _)| !s.is_empty()) {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(q::count_completed(scopes.len())));
            for scope in scopes {
                query = query.bind(scope).bind(bucket);
            }
            query.execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(CompleteOutcome::Done)
    }

    async fn delete_verification(&self, id: &VerificationId) -> Result<bool, StoreError> {
        let mut c = self.write.acquire().await.map_err(db)?;
        Ok(execute_by(&mut c, q::DELETE_VERIFICATION, id.as_str()).await? > 0)
    }

    async fn record_receipt(
        &self,
        provider: &str,
        provider_ref: &str,
        state: registrar_providers::DeliveryState,
        now: Time,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(q::RECORD_RECEIPT)
            .bind(provider)
            .bind(provider_ref)
            .bind(state.as_str())
            .bind(now.timestamp())
            .execute(&self.write)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() > 0)
    }
}

#[async_trait]
impl Limits for This {
    async fn take_rates(
        &self,
        buckets: &[RateBucket],
        now: Time,
    ) -> Result<Option<(usize, Time)>, StoreError> {
        if buckets.is_empty() {
            return Ok(None);
        }
        let mut tx = begin(&self.write).await?;
        match take_rates_in(&mut tx, buckets, now.timestamp_millis()).await? {
            None => {
                tx.commit().await.map_err(db)?;
                Ok(None)
            }
            Some((i, retry_ms)) => Ok(Some((
                i,
                chrono::DateTime::from_timestamp_millis(retry_ms)
                    .unwrap_or(now + chrono::Duration::seconds(1)),
            ))),
        }
    }

    async fn rate_free(&self, bucket: &RateBucket, now: Time) -> Result<bool, StoreError> {
        let tat: Option<i64> = sqlx::query_scalar(q::TAT)
            .bind(&bucket.key)
            .fetch_optional(&self.read)
            .await
            .map_err(db)?;
        let now_ms = now.timestamp_millis();
        let next = tat.unwrap_or(0).max(now_ms).saturating_add(bucket.interval_ms);
        Ok(next - now_ms <= bucket.burst_ms)
    }

    async fn pumping_facts(
        &self,
        scopes: &[String],
        since_bucket: i64,
        now: Time,
    ) -> Result<(Vec<BlockRecord>, Vec<Traffic>), StoreError> {
        let mut traffic = vec![Traffic::default(); scopes.len()];
        if scopes.is_empty() {
            return Ok((Vec::new(), traffic));
        }
        let mut c = self.read.acquire().await.map_err(db)?;
        // Only numbered placeholders are formatted into these: no input reaches the text.
        let measures = q::measures_on(scopes.len());
        let mut query = sqlx::query_as::<_, BlockRow>(sqlx::AssertSqlSafe(measures))
            .bind(now.timestamp());
        for scope in scopes {
            query = query.bind(scope);
        }
        let measures = query.fetch_all(&mut *c).await.map_err(db)?;
        let sums = q::traffic_of(scopes.len());
        let mut query = sqlx::query_as::<_, TrafficRow>(sqlx::AssertSqlSafe(sums)).bind(since_bucket);
        for scope in scopes {
            query = query.bind(scope);
        }
        for row in query.fetch_all(&mut *c).await.map_err(db)? {
            if let Some(i) = scopes.iter().position(|s| *s == row.scope) {
                traffic[i] = Traffic::from(&row);
            }
        }
        Ok((measures.into_iter().map(Into::into).collect(), traffic))
    }

    async fn remove_block(&self, scope: &str) -> Result<bool, StoreError> {
        let mut c = self.write.acquire().await.map_err(db)?;
        Ok(execute_by(&mut c, q::REMOVE_BLOCK, scope).await? > 0)
    }

    async fn blocks(&self, now: Time) -> Result<Vec<BlockRecord>, StoreError> {
        Ok(sqlx::query_as::<_, BlockRow>(q::BLOCKS)
            .bind(now.timestamp())
            .fetch_all(&self.read)
            .await
            .map_err(db)?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    async fn daily_sends(&self, day: i64) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(sqlx::query_as::<_, (String, i64)>(q::DAILY_SENDS)
            .bind(day)
            .fetch_all(&self.read)
            .await
            .map_err(db)?
            .into_iter()
            .map(|(scope, sent)| (scope, sent.max(0).unsigned_abs()))
            .collect())
    }

    async fn spend(&self, since_day: i64) -> Result<Vec<SpendRecord>, StoreError> {
        sqlx::query_as::<_, SpendRow>(q::SPEND)
            .bind(since_day)
            .fetch_all(&self.read)
            .await
            .map_err(db)?
            .into_iter()
            .map(TryInto::try_into)
            .collect()
    }
}

#[async_trait]
impl Accounts for This {
    async fn account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError> {
        Ok(sqlx::query_as::<_, AccountRow>(q::ACCOUNT)
            .bind(id.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(db)?
            .map(Into::into))
    }

    async fn replace_key(&self, account: &AccountId, c: &KeyChange) -> Result<bool, StoreError> {
        let mut tx = begin(&self.write).await?;
        let r = sqlx::query(q::REPLACE_KEY)
            .bind(account.as_str())
            .bind(&c.old_fingerprint)
            .bind(&c.new_fingerprint)
            .bind(&c.public_key)
            .bind(c.now.timestamp())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        retire_key(&mut tx, account, &c.old_fingerprint, c.now).await?;
        let (old, new) = (Some(c.old_fingerprint.as_str()), Some(c.new_fingerprint.as_str()));
        insert_events(&mut tx, &c.notice, EventKind::KeyRolledOver, account, old, new, c.now)
            .await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn remove_account(
        &self,
        account: &AccountId,
        fingerprint: &str,
        now: Time,
        notice: &Notice,
    ) -> Result<bool, StoreError> {
        let mut tx = begin(&self.write).await?;
        let r = sqlx::query(q::DELETE_ACCOUNT)
            .bind(account.as_str())
            .bind(fingerprint)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        // A verification still held for the account (with its number) and a private key
        // waiting for another device go with it.
        for query in q::DELETE_OF_ACCOUNT {
            execute_by(&mut tx, query, account.as_str()).await?;
        }
        insert_events(&mut tx, notice, EventKind::AccountRemoved, account, Some(fingerprint), None, now)
            .await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn is_retired_key(
        &self,
        account: &AccountId,
        fingerprint: &str,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query(q::IS_RETIRED)
            .bind(account.as_str())
            .bind(fingerprint)
            .fetch_optional(&self.read)
            .await
            .map_err(db)?
            .is_some())
    }

    async fn put_key_transfer(&self, t: &KeyTransferRecord) -> Result<(), StoreError> {
        sqlx::query(q::PUT_KEY_TRANSFER)
            .bind(&t.token_hash)
            .bind(t.account.as_str())
            .bind(&t.fingerprint)
            .bind(&t.private_key)
            .bind(t.created_at.timestamp())
            .bind(t.expires_at.timestamp())
            .execute(&self.write)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn take_key_transfer(
        &self,
        token_hash: &str,
        now: Time,
    ) -> Result<Option<KeyTransferRecord>, StoreError> {
        let taken = sqlx::query_as::<_, KeyTransferRow>(q::TAKE_KEY_TRANSFER)
            .bind(token_hash)
            .fetch_optional(&self.write)
            .await
            .map_err(db)?
            .map(KeyTransferRecord::from);
        Ok(taken.filter(|t| t.expires_at > now))
    }

    async fn use_nonce(&self, key: &str, expires_at: Time) -> Result<bool, StoreError> {
        let r = sqlx::query(q::USE_NONCE)
            .bind(key)
            .bind(expires_at.timestamp())
            .execute(&self.write)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    async fn claim_events(
        &self,
        sink: &str,
        now: Time,
        lease_until: Time,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let due = sqlx::query_as::<_, EventRow>(q::DUE_EVENTS)
            .bind(sink)
            .bind(now.timestamp())
            .bind(i64::from(limit))
            .fetch_all(&self.write)
            .await
            .map_err(db)?;
        let mut claimed = Vec::with_capacity(due.len());
        for row in due {
            let took = sqlx::query(q::CLAIM_EVENT)
                .bind(row.id)
                .bind(row.next_attempt_at)
                .bind(lease_until.timestamp())
                .execute(&self.write)
                .await
                .map_err(db)?;
            if took.rows_affected() > 0 {
                claimed.push(row.try_into()?);
            }
        }
        Ok(claimed)
    }

    async fn event_delivered(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query(q::EVENT_DELIVERED)
            .bind(id)
            .execute(&self.write)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn event_failed(&self, id: i64, next_attempt_at: Time) -> Result<(), StoreError> {
        sqlx::query(q::EVENT_FAILED)
            .bind(id)
            .bind(next_attempt_at.timestamp())
            .execute(&self.write)
            .await
            .map_err(db)?;
        Ok(())
    }
}

#[async_trait]
impl Maintenance for This {
    async fn purge_expired(&self, now: Time) -> Result<u64, StoreError> {
        let t = now.timestamp();
        let purged = sqlx::query(q::PURGE_VERIFICATIONS)
            .bind(t)
            .execute(&self.write)
            .await
            .map_err(db)?
            .rows_affected();
        let before = [
            t.saturating_mul(1000),
            t,
            abuse::bucket(t - TRAFFIC_RETENTION),
            // Only the current bucket's rows can still tell a number or client is new.
            abuse::bucket(t) - 1,
            abuse::day(t) - 2,
            abuse::day(t - SPEND_RETENTION),
            t,
            t,
        ];
        for (query, before) in q::PURGE.into_iter().zip(before) {
            sqlx::query(query)
                .bind(before)
                .execute(&self.write)
                .await
                .map_err(db)?;
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map_err(db)
            .map(|_| ())
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    async fn schema_version(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(q::SCHEMA_VERSION)
            .fetch_one(&self.read)
            .await
            .map_err(db)
    }
}
