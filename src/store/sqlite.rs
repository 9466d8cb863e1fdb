//! The embedded default: SQLite through sqlx, one file in the data directory, in WAL mode with
//! `synchronous = NORMAL` (a commit is durable once the WAL is checkpointed; a power cut can lose
//! the last commits, never corrupt the file). Writes go through one connection, so that SQLite's
//! single writer never waits on a lock held by this process; reads use a pool of their own,
//! which WAL lets run beside the writer.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::rows::{db, migration_error};
use crate::registrar::ports::StoreError;

type Db = sqlx::Sqlite;
type Conn = sqlx::SqliteConnection;
type This = SqliteStore;

/// Takes the write lock up front: two deferred transactions that both read and then write would
/// fail with `SQLITE_BUSY` instead of waiting.
const BEGIN: &str = "BEGIN IMMEDIATE";
const KIND: &str = "sqlite";
/// One event from a bucket if it has one (see [`RateBucket`](crate::registrar::ports::RateBucket)).
const TAKE_RATE: &str = "INSERT INTO rate_limits (key, tat) VALUES ($1, $2 + $3) \
     ON CONFLICT (key) DO UPDATE SET tat = MAX(rate_limits.tat, $2) + $3 \
     WHERE MAX(rate_limits.tat, $2) + $3 - $2 <= $4";
/// One event from a bucket, admitted or not.
const TAKE_RATE_ANYWAY: &str = "INSERT INTO rate_limits (key, tat) VALUES ($1, $2 + $3) \
     ON CONFLICT (key) DO UPDATE SET tat = MAX(rate_limits.tat, $2) + $3";
/// The transaction holds the write lock already.
const ACCOUNT_FINGERPRINT_FOR_UPDATE: &str = "SELECT fingerprint FROM accounts WHERE id = $1";

/// A SQLite database.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`) and runs the
    /// migrations; reads get up to `max_connections` connections.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = |n: u32| {
            SqlitePoolOptions::new()
                .max_connections(n)
                .acquire_timeout(Duration::from_secs(10))
        };
        let write = pool(1).connect_with(options.clone()).await.map_err(db)?;
        let store = Self {
            read: if options
                .get_filename()
                .to_string_lossy()
                .contains(":memory:")
                || url.contains("mode=memory")
            {
                // Another connection would open another database.
                write.clone()
            } else {
                pool(max_connections.max(1))
                    .connect_with(options)
                    .await
                    .map_err(db)?
            },
            write,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Runs the pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.write)
            .await
            .map_err(migration_error)
    }
}

include!("shared.rs");
