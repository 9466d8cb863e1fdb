//! PostgreSQL (and PostgreSQL-compatible databases), for several instances behind one database.
//! Every race between instances is settled by a constraint or a conditional write, never by a
//! lock in one process.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::rows::{db, migration_error};
use crate::registrar::ports::StoreError;

type Db = sqlx::Postgres;
type Conn = sqlx::PgConnection;
type This = PgStore;

/// Rows are locked as they are updated.
const BEGIN: &str = "BEGIN";
const KIND: &str = "postgres";
/// One event from a bucket if it has one (see [`RateBucket`](crate::registrar::ports::RateBucket)).
const TAKE_RATE: &str = "INSERT INTO rate_limits (key, tat) VALUES ($1, $2 + $3) \
     ON CONFLICT (key) DO UPDATE SET tat = GREATEST(rate_limits.tat, $2) + $3 \
     WHERE GREATEST(rate_limits.tat, $2) + $3 - $2 <= $4";
/// One event from a bucket, admitted or not.
const TAKE_RATE_ANYWAY: &str = "INSERT INTO rate_limits (key, tat) VALUES ($1, $2 + $3) \
     ON CONFLICT (key) DO UPDATE SET tat = GREATEST(rate_limits.tat, $2) + $3";
/// Locks the account's row until the completion commits.
const ACCOUNT_FINGERPRINT_FOR_UPDATE: &str =
    "SELECT fingerprint FROM accounts WHERE id = $1 FOR UPDATE";

/// A PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgStore {
    write: PgPool,
    read: PgPool,
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
        let store = Self {
            read: pool.clone(),
            write: pool,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Runs the pending migrations. Instances starting together are safe: sqlx takes an
    /// advisory lock around them.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.write)
            .await
            .map_err(migration_error)
    }
}

include!("shared.rs");
