//! The embedded default: SQLite through sqlx, one file in the data directory, WAL mode. The
//! queries are shared with PostgreSQL (`sql.rs`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::sql::{db, delete_key_transfer, insert_events, migration_error, retire_key};
use super::{
    AccountRecord, BlockRecord, CompleteOutcome, Completion, DeliveryRecord, EventKind,
    EventRecord, KeyChange, KeyTransferRecord, Notice, RateBucket, Renewal, Requester, SentRecord,
    SpendRecord, Store, StoreError, TryLimits, VerificationRecord,
};
use crate::registrar::abuse;

/// A SQLite database.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`) and runs the
    /// migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(db)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Runs the pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(migration_error)
    }
}

super::sql::sql_store!(SqliteStore, SqliteRow, "BEGIN IMMEDIATE", "sqlite", "");
