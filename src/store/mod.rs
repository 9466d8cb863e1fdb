//! The store adapters: the core's ports ([`crate::registrar::ports`]) over SQLite (the embedded
//! default) and PostgreSQL (several instances behind one database), through sqlx.
//!
//! The SQL is kept as constants (`queries.rs`, and the few statements that differ in the backend
//! modules); rows are read with `#[derive(FromRow)]` and converted to the core's records at the
//! edge (`rows.rs`); the implementation (`shared.rs`) is written once and compiled for each
//! backend. Times are stored as Unix seconds (rate-limit times as milliseconds).

mod postgres;
mod queries;
mod rows;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
