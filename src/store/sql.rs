//! The SQL behind both backends, written once. Queries use `$n` placeholders, which SQLite and
//! PostgreSQL both accept, and portable statements (`ON CONFLICT`, `RETURNING`); each backend
//! module instantiates [`sql_store!`] with its pool and row types and how it opens a write
//! transaction (SQLite's `BEGIN IMMEDIATE` takes the write lock up front, so that two writers
//! wait for each other instead of failing; PostgreSQL locks the rows it updates).

use super::StoreError;

pub(super) fn db(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
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

/// `traffic_seen.kind` of a number's hash.
pub(super) const SEEN_NUMBER: i32 = 0;
/// `traffic_seen.kind` of a client's hash.
pub(super) const SEEN_SOURCE: i32 = 1;

/// `$first, $first+1, ...`: `n` numbered placeholders for an `IN (...)` list.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SELECT <every verification column> FROM verifications <clause>`, as one literal.
macro_rules! select_verification {
    ($clause:literal) => {
        concat!(
            "SELECT id, phone, account, challenge, force, code_hash, code_length, provider, ",
            "provider_ref, sender, attempts, total_attempts, sends, created_at, expires_at, ",
            "next_resend_at, ",
            "verified_at, result_fingerprint, result_key, locale, delivery_state, client, ",
            "idempotency_key, last_sent_at, completing_at ",
            "FROM verifications ",
            $clause
        )
    };
}
pub(super) use select_verification;

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

/// Inserts one `events` row per sink of `$notice` inside transaction `$tx`.
macro_rules! insert_events {
    ($tx:ident, $notice:expr, $kind:expr, $account:expr, $old:expr, $new:expr, $now:expr) => {
        for sink in &$notice.sinks {
            sqlx::query(
                "INSERT INTO events (event_id, sink, kind, account, old_fingerprint, \
                 new_fingerprint, occurred_at, next_attempt_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            )
            .bind(&$notice.event_id)
            .bind(sink)
            .bind($kind.as_str())
            .bind($account)
            .bind($old)
            .bind($new)
            .bind($now)
            .execute(&mut *$tx)
            .await
            .map_err(db)?;
        }
    };
}
pub(super) use insert_events;

/// Deletes the key transfer of `$account` inside transaction `$tx`: its key stops being the
/// account's, and a key replaced since the upload is never handed out anyway.
macro_rules! delete_key_transfer {
    ($tx:ident, $account:expr) => {
        sqlx::query("DELETE FROM key_transfers WHERE account = $1")
            .bind($account)
            .execute(&mut *$tx)
            .await
            .map_err(db)?;
    };
}
pub(super) use delete_key_transfer;

/// Records inside transaction `$tx` that `$account` retired the key `$fingerprint` at `$now`.
macro_rules! retire_key {
    ($tx:ident, $account:expr, $fingerprint:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO retired_keys (account, fingerprint, retired_at) VALUES ($1, $2, $3) \
             ON CONFLICT (account, fingerprint) DO UPDATE SET retired_at = excluded.retired_at",
        )
        .bind($account)
        .bind($fingerprint)
        .bind($now)
        .execute(&mut *$tx)
        .await
        .map_err(db)?;
    };
}
pub(super) use retire_key;

/// Implements [`Store`](super::Store) for `$store` (a struct with a `pool` field).
macro_rules! sql_store {
    ($store:ident, $row:ty, $begin:literal, $kind:literal, $for_update:literal) => {
fn block_from_row(r: &$row) -> Result<BlockRecord, StoreError> {
    let measure: String = r.try_get("measure").map_err(db)?;
    Ok(BlockRecord {
        scope: r.try_get("scope").map_err(db)?,
        measure: abuse::Measure::from_stored(&measure),
        until: r.try_get("until").map_err(db)?,
        reason: r.try_get("reason").map_err(db)?,
        created_at: r.try_get("created_at").map_err(db)?,
    })
}

fn verification_from_row(row: &$row) -> Result<VerificationRecord, StoreError> {
    let get = |e: sqlx::Error| StoreError::Database(e.to_string());
    let challenge: String = row.try_get("challenge").map_err(get)?;
    Ok(VerificationRecord {
        id: row.try_get("id").map_err(get)?,
        phone: row.try_get("phone").map_err(get)?,
        account: row.try_get("account").map_err(get)?,
        challenge: challenge
            .parse()
            .map_err(|_| StoreError::Database(format!("unknown challenge {challenge:?}")))?,
        force: row.try_get("force").map_err(get)?,
        code_hash: row.try_get("code_hash").map_err(get)?,
        code_length: row.try_get::<i64, _>("code_length").map_err(get)? as u32,
        provider: row.try_get("provider").map_err(get)?,
        provider_ref: row.try_get("provider_ref").map_err(get)?,
        sender: row.try_get("sender").map_err(get)?,
        attempts: row.try_get::<i64, _>("attempts").map_err(get)? as u32,
        total_attempts: row.try_get::<i64, _>("total_attempts").map_err(get)? as u32,
        sends: row.try_get::<i64, _>("sends").map_err(get)? as u32,
        created_at: row.try_get("created_at").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
        next_resend_at: row.try_get("next_resend_at").map_err(get)?,
        verified_at: row.try_get("verified_at").map_err(get)?,
        result_fingerprint: row.try_get("result_fingerprint").map_err(get)?,
        result_key: row.try_get("result_key").map_err(get)?,
        locale: row.try_get("locale").map_err(get)?,
        delivery_state: row.try_get("delivery_state").map_err(get)?,
        client: row.try_get("client").map_err(get)?,
        idempotency_key: row.try_get("idempotency_key").map_err(get)?,
        last_sent_at: row.try_get("last_sent_at").map_err(get)?,
        completing_at: row.try_get("completing_at").map_err(get)?,
    })
}


impl $store {
    async fn verification_where(
        &self,
        query: &'static str,
        value: &str,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        sqlx::query(query)
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .as_ref()
            .map(verification_from_row)
            .transpose()
    }
}

#[async_trait]
impl Store for $store {
    async fn account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, fingerprint, public_key, created_at, updated_at FROM accounts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(AccountRecord {
                id: r.try_get("id").map_err(db)?,
                fingerprint: r.try_get("fingerprint").map_err(db)?,
                public_key: r.try_get("public_key").map_err(db)?,
                created_at: r.try_get("created_at").map_err(db)?,
                updated_at: r.try_get("updated_at").map_err(db)?,
            })
        })
        .transpose()
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        self.verification_where(super::sql::select_verification!("WHERE id = $1"), id)
            .await
    }

    async fn verification_by_phone(
        &self,
        phone: &str,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        self.verification_where(super::sql::select_verification!("WHERE phone = $1"), phone)
            .await
    }

    async fn create_verification(
        &self,
        v: &VerificationRecord,
        replaces: Option<&str>,
    ) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock up front: two deferred transactions that both read and
        // then write would fail with SQLITE_BUSY instead of waiting.
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        if let Some(old) = replaces {
            let gone = sqlx::query("DELETE FROM verifications WHERE id = $1")
                .bind(old)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            if gone.rows_affected() == 0 {
                return Err(StoreError::Conflict);
            }
        }
        sqlx::query(
            "INSERT INTO verifications (id, phone, account, challenge, force, code_hash, \
             code_length, provider, provider_ref, sender, attempts, total_attempts, sends, \
             created_at, expires_at, next_resend_at, locale, client, idempotency_key, \
             last_sent_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20)",
        )
        .bind(&v.id)
        .bind(&v.phone)
        .bind(&v.account)
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
        .bind(v.created_at)
        .bind(v.expires_at)
        .bind(v.next_resend_at)
        .bind(&v.locale)
        .bind(&v.client)
        .bind(&v.idempotency_key)
        .bind(v.last_sent_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn delete_verification(&self, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM verifications WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() > 0)
    }

    async fn verification_by_account(
        &self,
        account: &str,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        self.verification_where(super::sql::select_verification!("WHERE account = $1"), account)
            .await
    }

    async fn take_attempt(
        &self,
        id: &str,
        requester: Requester<'_>,
        limits: TryLimits,
        now: i64,
    ) -> Result<Option<u32>, StoreError> {
        let count = |row: Option<$row>| {
            row.map(|r| r.try_get::<i64, _>(0).map(|n| n as u32).map_err(db))
                .transpose()
        };
        match requester {
            Requester::Holder => count(
                sqlx::query(
                    "UPDATE verifications \
                     SET attempts = attempts + 1, total_attempts = total_attempts + 1 \
                     WHERE id = $1 AND attempts < $2 \
                     AND verified_at IS NULL AND expires_at > $3 RETURNING attempts",
                )
                .bind(id)
                .bind(i64::from(limits.holder))
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?,
            ),
            Requester::Peer(who) => {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                // The others' tries are the total less the holder's.
                let total = sqlx::query(
                    "UPDATE verifications SET total_attempts = total_attempts + 1 \
                     WHERE id = $1 AND total_attempts - attempts < $2 AND verified_at IS NULL \
                     AND expires_at > $3",
                )
                .bind(id)
                .bind(i64::from(limits.others))
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                if total.rows_affected() == 0 {
                    return Ok(None);
                }
                let mine = count(
                    sqlx::query(
                        "INSERT INTO verification_attempts (verification_id, requester, attempts) \
                         VALUES ($1, $2, 1) \
                         ON CONFLICT (verification_id, requester) DO UPDATE \
                         SET attempts = verification_attempts.attempts + 1 \
                         WHERE verification_attempts.attempts < $3 \
                         RETURNING attempts",
                    )
                    .bind(id)
                    .bind(who)
                    .bind(i64::from(limits.per_peer))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?,
                )?;
                if mine.is_some() {
                    tx.commit().await.map_err(db)?;
                }
                Ok(mine)
            }
        }
    }

    async fn record_delivery(&self, id: &str, d: &DeliveryRecord) -> Result<(), StoreError> {
        let (replace_hash, hash) = match &d.code_hash {
            Some(h) => (true, h.clone()),
            None => (false, None),
        };
        sqlx::query(
            "UPDATE verifications SET provider = $2, provider_ref = $3, sender = $4, \
             code_length = $5, code_hash = CASE WHEN $6 THEN $7 ELSE code_hash END \
             WHERE id = $1",
        )
        .bind(id)
        .bind(&d.provider)
        .bind(&d.provider_ref)
        .bind(&d.sender)
        .bind(i64::from(d.code_length))
        .bind(replace_hash)
        .bind(hash)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn renew_code(&self, id: &str, sends: u32, r: &Renewal) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE verifications SET challenge = $3, code_hash = $4, code_length = $5, \
             expires_at = $6, next_resend_at = $7, sends = sends + 1, provider_ref = NULL, \
             delivery_state = NULL, delivery_updated_at = NULL, last_sent_at = $8, \
             completing_at = NULL WHERE id = $1 AND sends = $2 AND verified_at IS NULL",
        )
        .bind(id)
        .bind(i64::from(sends))
        .bind(r.challenge.as_str())
        .bind(&r.code_hash)
        .bind(i64::from(r.code_length))
        .bind(r.expires_at)
        .bind(r.next_resend_at)
        .bind(r.sent_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn allow_resend(&self, id: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE verifications SET next_resend_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn complete(
        &self,
        id: &str,
        account: &str,
        c: &Completion,
    ) -> Result<CompleteOutcome, StoreError> {
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        let marked = sqlx::query(
            "UPDATE verifications SET verified_at = $2, result_fingerprint = $3, result_key = $4 \
             WHERE id = $1 AND verified_at IS NULL",
        )
        .bind(id)
        .bind(c.now)
        .bind(&c.fingerprint)
        .bind(&c.public_key)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if marked.rows_affected() == 0 {
            return Ok(CompleteOutcome::NotPending);
        }
        let previous: Option<String> =
            sqlx::query(concat!("SELECT fingerprint FROM accounts WHERE id = $1", $for_update))
                .bind(account)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .map(|r| r.try_get("fingerprint"))
                .transpose()
                .map_err(db)?;
        if previous.is_some() && !c.replace_account {
            return Ok(CompleteOutcome::AccountExists);
        }
        // A forced re-registration with another key: the old key's sessions must go, and so
        // does a private key of it waiting for another device.
        if let Some(old) = previous.filter(|old| *old != c.fingerprint) {
            insert_events!(tx, c.notice, EventKind::KeyReplaced, account, Some(old.as_str()),
                Some(c.fingerprint.as_str()), c.now);
            delete_key_transfer!(tx, account);
            retire_key!(tx, account, old.as_str(), c.now);
        }
        sqlx::query(
            "INSERT INTO accounts (id, fingerprint, public_key, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint, \
             public_key = excluded.public_key, updated_at = excluded.updated_at",
        )
        .bind(account)
        .bind(&c.fingerprint)
        .bind(&c.public_key)
        .bind(c.now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(CompleteOutcome::Done)
    }

    async fn record_receipt(
        &self,
        provider: &str,
        provider_ref: &str,
        state: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE verifications SET delivery_state = $3, delivery_updated_at = $4 \
             WHERE provider = $1 AND provider_ref = $2",
        )
        .bind(provider)
        .bind(provider_ref)
        .bind(state)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() > 0)
    }

    async fn purge_expired(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM verifications WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        // Empty rate buckets, and counters older than any window or report needs.
        let old = [
            ("DELETE FROM rate_limits WHERE tat < $1", now.saturating_mul(1000)),
            ("DELETE FROM blocks WHERE until < $1", now),
            ("DELETE FROM traffic WHERE bucket < $1", abuse::bucket(now - super::TRAFFIC_RETENTION)),
            // Only the current bucket's rows can still tell a number or client is new.
            ("DELETE FROM traffic_seen WHERE bucket < $1", abuse::bucket(now) - 1),
            ("DELETE FROM daily_sends WHERE day < $1", abuse::day(now) - 2),
            ("DELETE FROM spend WHERE day < $1", abuse::day(now - super::SPEND_RETENTION)),
            ("DELETE FROM nonces WHERE expires_at < $1", now),
            ("DELETE FROM key_transfers WHERE expires_at <= $1", now),
        ];
        for (query, before) in old {
            sqlx::query(query).bind(before).execute(&self.pool).await.map_err(db)?;
        }
        Ok(r.rows_affected())
    }

    async fn take_rates(
        &self,
        buckets: &[RateBucket],
        now_ms: i64,
    ) -> Result<Option<(usize, i64)>, StoreError> {
        if buckets.is_empty() {
            return Ok(None);
        }
        // Lock the rows in one order, so that two transactions never wait for each other in a
        // cycle (PostgreSQL); SQLite's IMMEDIATE transaction serialises writers anyway.
        let mut order: Vec<usize> = (0..buckets.len()).collect();
        order.sort_by(|&a, &b| buckets[a].key.cmp(&buckets[b].key));
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        let mut next = vec![0i64; buckets.len()];
        let mut refused: Option<(usize, i64)> = None;
        for &i in &order {
            let b = &buckets[i];
            sqlx::query("INSERT INTO rate_limits (key, tat) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING")
                .bind(&b.key)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let tat: i64 = sqlx::query(concat!("SELECT tat FROM rate_limits WHERE key = $1", $for_update))
                .bind(&b.key)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
            match b.rate.admit(tat, now_ms) {
                Ok(t) => next[i] = t,
                Err(retry_at) => {
                    if refused.is_none_or(|(_, at)| retry_at > at) {
                        refused = Some((i, retry_at));
                    }
                }
            }
        }
        if refused.is_some() {
            tx.rollback().await.map_err(db)?;
            return Ok(refused);
        }
        for &i in &order {
            sqlx::query("UPDATE rate_limits SET tat = $2 WHERE key = $1")
                .bind(&buckets[i].key)
                .bind(next[i])
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(None)
    }

    async fn verification_by_idempotency_key(
        &self,
        key: &str,
    ) -> Result<Option<VerificationRecord>, StoreError> {
        self.verification_where(
            super::sql::select_verification!("WHERE idempotency_key = $1"),
            key,
        )
        .await
    }

    async fn measures(&self, scopes: &[String], now: i64) -> Result<Vec<BlockRecord>, StoreError> {
        if scopes.is_empty() {
            return Ok(Vec::new());
        }
        let query = format!(
            "SELECT scope, measure, until, reason, created_at FROM blocks \
             WHERE until > $1 AND scope IN ({})",
            super::sql::placeholders(2, scopes.len())
        );
        // Only numbered placeholders are formatted in: no input reaches the text.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(query)).bind(now);
        for scope in scopes {
            q = q.bind(scope);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(db)?;
        rows.iter().map(block_from_row).collect()
    }

    async fn set_measure(
        &self,
        scope: &str,
        measure: abuse::Measure,
        until: i64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO blocks (scope, measure, until, reason, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (scope) DO UPDATE SET until = excluded.until, reason = excluded.reason, \
             created_at = CASE WHEN blocks.measure = excluded.measure AND blocks.until > $5 \
             THEN blocks.created_at ELSE excluded.created_at END, measure = excluded.measure",
        )
        .bind(scope)
        .bind(measure.as_str())
        .bind(until)
        .bind(reason)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn remove_block(&self, scope: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM blocks WHERE scope = $1")
            .bind(scope)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() > 0)
    }

    async fn blocks(&self, now: i64) -> Result<Vec<BlockRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT scope, measure, until, reason, created_at FROM blocks WHERE until > $1 \
             ORDER BY scope",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(block_from_row).collect()
    }

    async fn traffic(
        &self,
        scopes: &[String],
        since_bucket: i64,
    ) -> Result<Vec<super::Traffic>, StoreError> {
        let mut out = vec![super::Traffic::default(); scopes.len()];
        if scopes.is_empty() {
            return Ok(out);
        }
        let index = |scope: &str| scopes.iter().position(|s| s == scope);
        let sums = format!(
            "SELECT scope, CAST(COALESCE(SUM(sent), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completed), 0) AS BIGINT), \
             CAST(COALESCE(SUM(numbers), 0) AS BIGINT), \
             CAST(COALESCE(SUM(sources), 0) AS BIGINT) \
             FROM traffic WHERE bucket >= $1 AND scope IN ({}) GROUP BY scope",
            super::sql::placeholders(2, scopes.len())
        );
        // Only numbered placeholders are formatted in: no input reaches the text.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sums)).bind(since_bucket);
        for scope in scopes {
            q = q.bind(scope);
        }
        for r in q.fetch_all(&self.pool).await.map_err(db)? {
            let scope: String = r.try_get(0).map_err(db)?;
            let count = |i: usize| -> Result<u64, StoreError> {
                Ok(r.try_get::<i64, _>(i).map_err(db)?.max(0) as u64)
            };
            if let Some(i) = index(&scope) {
                out[i] = super::Traffic {
                    sent: count(1)?,
                    completed: count(2)?,
                    numbers: count(3)?,
                    sources: count(4)?,
                };
            }
        }
        Ok(out)
    }

    async fn reserve_daily(
        &self,
        caps: &[(String, u32)],
        day: i64,
    ) -> Result<Option<usize>, StoreError> {
        if caps.is_empty() {
            return Ok(None);
        }
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        for (i, (scope, cap)) in caps.iter().enumerate() {
            // One conditional upsert per counter: it moves only while under the cap, so that
            // concurrent reservations on any instance never pass it.
            let taken = sqlx::query(
                "INSERT INTO daily_sends (scope, day, sent) VALUES ($1, $2, 1) \
                 ON CONFLICT (scope, day) DO UPDATE SET sent = daily_sends.sent + 1 \
                 WHERE daily_sends.sent < $3",
            )
            .bind(scope)
            .bind(day)
            .bind(i64::from(*cap))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            if taken.rows_affected() == 0 || *cap == 0 {
                tx.rollback().await.map_err(db)?;
                return Ok(Some(i));
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(None)
    }

    async fn release_daily(&self, scopes: &[String], day: i64) -> Result<(), StoreError> {
        for scope in scopes {
            sqlx::query(
                "UPDATE daily_sends SET sent = sent - 1 WHERE scope = $1 AND day = $2 AND sent > 0",
            )
            .bind(scope)
            .bind(day)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    async fn daily_sends(&self, day: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query("SELECT scope, sent FROM daily_sends WHERE day = $1 ORDER BY scope")
            .bind(day)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                let sent: i64 = r.try_get(1).map_err(db)?;
                Ok((r.try_get(0).map_err(db)?, sent.max(0) as u64))
            })
            .collect()
    }

    async fn record_sent(&self, s: &SentRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        for scope in &s.scopes {
            // A number or client is new to the scope's bucket when its row goes in: the counters
            // then hold distinct counts per bucket, summed over the window in one indexed read.
            let mut new = [0i64; 2];
            let seen = [
                (super::sql::SEEN_NUMBER, Some(s.number)),
                (super::sql::SEEN_SOURCE, s.source),
            ];
            for (i, (kind, item)) in seen.into_iter().enumerate() {
                let Some(item) = item else { continue };
                let inserted = sqlx::query(
                    "INSERT INTO traffic_seen (scope, bucket, kind, item) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(scope)
                .bind(s.bucket)
                .bind(kind)
                .bind(item)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                new[i] = inserted.rows_affected() as i64;
            }
            sqlx::query(
                "INSERT INTO traffic (scope, bucket, sent, completed, numbers, sources) \
                 VALUES ($1, $2, 1, 0, $3, $4) \
                 ON CONFLICT (scope, bucket) DO UPDATE SET sent = traffic.sent + 1, \
                 numbers = traffic.numbers + excluded.numbers, \
                 sources = traffic.sources + excluded.sources",
            )
            .bind(scope)
            .bind(s.bucket)
            .bind(new[0])
            .bind(new[1])
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        sqlx::query(
            "INSERT INTO spend (day, provider, country, challenge, messages) \
             VALUES ($1, $2, $3, $4, 1) \
             ON CONFLICT (day, provider, country, challenge) \
             DO UPDATE SET messages = spend.messages + 1",
        )
        .bind(s.day)
        .bind(&s.provider)
        .bind(&s.country)
        .bind(s.challenge.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn record_completed(&self, scopes: &[String], bucket: i64) -> Result<(), StoreError> {
        for scope in scopes {
            sqlx::query(
                "INSERT INTO traffic (scope, bucket, sent, completed) VALUES ($1, $2, 0, 1) \
                 ON CONFLICT (scope, bucket) DO UPDATE SET completed = traffic.completed + 1",
            )
            .bind(scope)
            .bind(bucket)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    async fn spend(&self, since_day: i64) -> Result<Vec<SpendRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT day, provider, country, challenge, messages FROM spend WHERE day >= $1 \
             ORDER BY day, provider, country, challenge",
        )
        .bind(since_day)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                let challenge: String = r.try_get("challenge").map_err(db)?;
                let messages: i64 = r.try_get("messages").map_err(db)?;
                Ok(SpendRecord {
                    day: r.try_get("day").map_err(db)?,
                    provider: r.try_get("provider").map_err(db)?,
                    country: r.try_get("country").map_err(db)?,
                    challenge: challenge.parse().map_err(|_| {
                        StoreError::Database(format!("unknown challenge {challenge:?}"))
                    })?,
                    messages: messages.max(0) as u64,
                })
            })
            .collect()
    }

    async fn replace_key(&self, account: &str, c: &KeyChange) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        let r = sqlx::query(
            "UPDATE accounts SET fingerprint = $3, public_key = $4, updated_at = $5 \
             WHERE id = $1 AND fingerprint = $2",
        )
        .bind(account)
        .bind(&c.old_fingerprint)
        .bind(&c.new_fingerprint)
        .bind(&c.public_key)
        .bind(c.now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        delete_key_transfer!(tx, account);
        retire_key!(tx, account, c.old_fingerprint.as_str(), c.now);
        insert_events!(tx, c.notice, EventKind::KeyRolledOver, account,
            Some(c.old_fingerprint.as_str()), Some(c.new_fingerprint.as_str()), c.now);
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn reregistration_started(
        &self,
        account: &str,
        now: i64,
        notice: &Notice,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        let mut recorded = false;
        for sink in &notice.sinks {
            let r = sqlx::query(
                "INSERT INTO events (event_id, sink, kind, account, old_fingerprint, \
                 new_fingerprint, occurred_at, next_attempt_at) \
                 SELECT $1, $2, $3, id, fingerprint, NULL, $5, $5 FROM accounts WHERE id = $4",
            )
            .bind(&notice.event_id)
            .bind(sink)
            .bind(EventKind::ReregistrationStarted.as_str())
            .bind(account)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            recorded |= r.rows_affected() > 0;
        }
        tx.commit().await.map_err(db)?;
        Ok(recorded)
    }

    async fn remove_account(
        &self,
        account: &str,
        fingerprint: &str,
        now: i64,
        notice: &Notice,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
        let r = sqlx::query("DELETE FROM accounts WHERE id = $1 AND fingerprint = $2")
            .bind(account)
            .bind(fingerprint)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        // A verification still held for the account (with its number) and a private key
        // waiting for another device go with it.
        for query in [
            "DELETE FROM verifications WHERE account = $1",
            "DELETE FROM key_transfers WHERE account = $1",
            "DELETE FROM retired_keys WHERE account = $1",
        ] {
            sqlx::query(query)
                .bind(account)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        insert_events!(tx, *notice, EventKind::AccountRemoved, account, Some(fingerprint),
            None::<&str>, now);
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn is_retired_key(&self, account: &str, fingerprint: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM retired_keys WHERE account = $1 AND fingerprint = $2")
            .bind(account)
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(row.is_some())
    }

    async fn mark_completing(&self, id: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE verifications SET completing_at = $2 WHERE id = $1 AND verified_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn put_key_transfer(&self, t: &KeyTransferRecord) -> Result<(), StoreError> {
        // One statement, so that concurrent uploads of one account replace each other instead
        // of meeting at the unique constraint.
        sqlx::query(
            "INSERT INTO key_transfers (token_hash, account, fingerprint, private_key, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (account) DO UPDATE SET token_hash = excluded.token_hash, \
             fingerprint = excluded.fingerprint, private_key = excluded.private_key, \
             created_at = excluded.created_at, expires_at = excluded.expires_at",
        )
        .bind(&t.token_hash)
        .bind(&t.account)
        .bind(&t.fingerprint)
        .bind(&t.private_key)
        .bind(t.created_at)
        .bind(t.expires_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn take_key_transfer(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<Option<KeyTransferRecord>, StoreError> {
        // One statement: of two requests with the same token, one gets the row.
        let row = sqlx::query(
            "DELETE FROM key_transfers WHERE token_hash = $1 RETURNING token_hash, account, \
             fingerprint, private_key, created_at, expires_at",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let get = |e: sqlx::Error| StoreError::Database(e.to_string());
        let t = KeyTransferRecord {
            token_hash: row.try_get("token_hash").map_err(get)?,
            account: row.try_get("account").map_err(get)?,
            fingerprint: row.try_get("fingerprint").map_err(get)?,
            private_key: row.try_get("private_key").map_err(get)?,
            created_at: row.try_get("created_at").map_err(get)?,
            expires_at: row.try_get("expires_at").map_err(get)?,
        };
        Ok((t.expires_at > now).then_some(t))
    }

    async fn use_nonce(&self, key: &str, expires_at: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO nonces (key, expires_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    async fn claim_events(
        &self,
        sink: &str,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_id, kind, account, old_fingerprint, new_fingerprint, occurred_at, \
             attempts, next_attempt_at FROM events WHERE sink = $1 AND next_attempt_at <= $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(sink)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get("id").map_err(db)?;
            let due: i64 = r.try_get("next_attempt_at").map_err(db)?;
            // Taken only if no other instance took it since the read.
            let took = sqlx::query(
                "UPDATE events SET next_attempt_at = $3 WHERE id = $1 AND next_attempt_at = $2",
            )
            .bind(id)
            .bind(due)
            .bind(lease_until)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            if took.rows_affected() == 0 {
                continue;
            }
            let kind: String = r.try_get("kind").map_err(db)?;
            claimed.push(EventRecord {
                id,
                event_id: r.try_get("event_id").map_err(db)?,
                kind: EventKind::parse(&kind)
                    .ok_or_else(|| StoreError::Database(format!("unknown event kind {kind:?}")))?,
                account: r.try_get("account").map_err(db)?,
                old_fingerprint: r.try_get("old_fingerprint").map_err(db)?,
                new_fingerprint: r.try_get("new_fingerprint").map_err(db)?,
                occurred_at: r.try_get("occurred_at").map_err(db)?,
                attempts: r.try_get::<i32, _>("attempts").map_err(db)?.max(0) as u32,
            });
        }
        Ok(claimed)
    }

    async fn event_delivered(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM events WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn event_failed(&self, id: i64, next_attempt_at: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE events SET attempts = attempts + 1, next_attempt_at = $2 WHERE id = $1")
            .bind(id)
            .bind(next_attempt_at)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        $kind
    }

    async fn schema_version(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        row.try_get::<i64, _>(0).map_err(db)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db)
            .map(|_| ())
    }
}

    };
}
pub(super) use sql_store;
