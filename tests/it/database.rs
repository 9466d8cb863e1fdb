//! Database lifecycle: migrations by `kontalk-registrar migrate`, a schema newer than the binary,
//! an unreachable database; on SQLite, and on PostgreSQL in its pass of scripts/test.

use std::process::Command;
use std::time::Duration;

use kontalk_registrar::store::{PgStore, SqliteStore};

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_kontalk-registrar");

/// The database of this pass: PostgreSQL when KONTALK_TEST_POSTGRES is set, else SQLite.
async fn database(dir: &std::path::Path) -> String {
    match postgres_database().await {
        Some(url) => url,
        None => format!("sqlite://{}", dir.join("registrar.db").display()),
    }
}

#[tokio::test]
async fn migrate_then_refuse_a_schema_newer_than_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let url = database(dir.path()).await;
    let kind = if url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .arg("migrate")
        .env("REGISTRAR_DATABASE__URL", &url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{kind} database is up to date (schema version 4)")),
        "{stdout}"
    );
    let store = open_store(&url).await;
    assert_eq!(store.kind(), kind);
    assert_eq!(store.schema_version().await.unwrap(), 4);

    // A newer binary migrated this database further: this one must refuse it, saying why.
    let newer = "INSERT INTO _sqlx_migrations \
        (version, description, success, checksum, execution_time) \
        VALUES (99, 'from the future', TRUE, $1, 0)";
    if kind == "postgres" {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(newer)
            .bind(vec![0u8; 48])
            .execute(&pool)
            .await
            .unwrap();
    } else {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(newer)
            .bind(vec![0u8; 48])
            .execute(&pool)
            .await
            .unwrap();
    }
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .arg("serve")
        .env("REGISTRAR_DATABASE__URL", &url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("newer than this binary"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_postgres_is_a_clear_error() {
    let [port] = free_ports();
    let e = PgStore::open(
        &format!("postgres://registrar:secret-password@127.0.0.1:{port}/registrar"),
        1,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot connect"), "{e}");
    assert!(!e.contains("secret-password"), "{e}");
    let e = SqliteStore::open("sqlite:///nonexistent-dir/x/registrar.db", 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(!e.is_empty());
}

#[tokio::test]
async fn postgres_over_tls_is_required_when_the_url_says_so() {
    // The test server has no TLS: a URL demanding it must fail, and say why.
    let Some(url) = postgres_database().await else {
        eprintln!("runs in the PostgreSQL pass of scripts/test (KONTALK_TEST_POSTGRES)");
        return;
    };
    let e = PgStore::open(&format!("{url}?sslmode=require"), 1, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string()
        .to_lowercase();
    assert!(e.contains("tls") || e.contains("ssl"), "{e}");
    // sslmode=prefer falls back to plain TCP on loopback.
    PgStore::open(&format!("{url}?sslmode=prefer"), 1, Duration::from_secs(5))
        .await
        .unwrap();
}
