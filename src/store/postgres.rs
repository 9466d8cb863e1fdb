//! PostgreSQL (and PostgreSQL-compatible databases), for several instances behind one database.
//! The queries are shared with SQLite (`sql.rs`); every race between instances is settled by a
//! constraint or a conditional update, never by a lock in one process.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};

use super::sql::{db, delete_key_transfer, insert_events, migration_error, retire_key};
use super::{
    AccountRecord, BlockRecord, CompleteOutcome, Completion, DeliveryRecord, EventKind,
    EventRecord, KeyChange, KeyTransferRecord, Notice, RateBucket, Renewal, Requester, SentRecord,
    SpendRecord, Store, StoreError, TryLimits, VerificationRecord,
};
use crate::registrar::abuse;

/// A PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) with a pool of
    /// `max_connections`, and runs the migrations.
    pub async fn open(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(db)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Database(format!("cannot connect: {}", db(e))))?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Runs the pending migrations. Instances starting together are safe: sqlx takes an
    /// advisory lock around them.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(migration_error)
    }
}

super::sql::sql_store!(PgStore, PgRow, "BEGIN", "postgres", " FOR UPDATE");
