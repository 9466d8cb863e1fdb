//! The SQL behind both backends, written once. Queries use `$n` placeholders, which SQLite and
//! PostgreSQL both accept, and portable statements (`ON CONFLICT`, `RETURNING`); each backend
//! module instantiates [`sql_store!`] with its pool and row types and how it opens a write
//! transaction (SQLite's `BEGIN IMMEDIATE` takes the write lock up front, so that two writers
//! wait for each other instead of failing; PostgreSQL locks the rows it updates).

use super::StoreError;

pub(super) fn db(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(d) = &e
        && d.is_unique_violation()
    {
        return StoreError::Conflict;
    }
    StoreError::Database(e.to_string())
}

/// `SELECT <every verification column> FROM verifications <clause>`, as one literal.
macro_rules! select_verification {
    ($clause:literal) => {
        concat!(
            "SELECT id, phone, account, challenge, force, code_hash, code_length, provider, ",
            "provider_ref, sender, attempts, total_attempts, sends, created_at, expires_at, ",
            "next_resend_at, ",
            "verified_at, result_fingerprint, result_key, locale, delivery_state ",
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

/// Implements [`Store`](super::Store) for `$store` (a struct with a `pool` field).
macro_rules! sql_store {
    ($store:ident, $row:ty, $begin:literal, $kind:literal) => {
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
             created_at, expires_at, next_resend_at, locale) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
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
                     WHERE id = $1 AND attempts < $2 AND total_attempts < $3 \
                     AND verified_at IS NULL AND expires_at > $4 RETURNING attempts",
                )
                .bind(id)
                .bind(i64::from(limits.per_requester))
                .bind(i64::from(limits.total))
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?,
            ),
            Requester::Peer(who) => {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let total = sqlx::query(
                    "UPDATE verifications SET total_attempts = total_attempts + 1 \
                     WHERE id = $1 AND total_attempts < $2 AND verified_at IS NULL \
                     AND expires_at > $3",
                )
                .bind(id)
                .bind(i64::from(limits.total))
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
                    .bind(i64::from(limits.per_requester))
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
             delivery_state = NULL, delivery_updated_at = NULL \
             WHERE id = $1 AND sends = $2 AND verified_at IS NULL",
        )
        .bind(id)
        .bind(i64::from(sends))
        .bind(r.challenge.as_str())
        .bind(&r.code_hash)
        .bind(i64::from(r.code_length))
        .bind(r.expires_at)
        .bind(r.next_resend_at)
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
        let exists = sqlx::query("SELECT 1 FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .is_some();
        if exists && !c.replace_account {
            return Ok(CompleteOutcome::AccountExists);
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
        Ok(r.rows_affected())
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
