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
        stdout.contains(&format!("{kind} database is up to date (schema version 9)")),
        "{stdout}"
    );
    let store = open_store(&url).await;
    assert_eq!(store.kind(), kind);
    assert_eq!(store.schema_version().await.unwrap(), 9);

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

/// The event outbox and the nonces, as the store keeps them on both backends: events are
/// written with the account change that causes them, claimed by one deliverer at a time (a
/// lease), retried after a failure, and gone once delivered; a nonce is accepted once.
#[tokio::test]
async fn events_are_leased_retried_and_deleted_and_nonces_are_single_use() {
    use kontalk_registrar::registrar::ports::{EventKind, KeyChange, Notice};
    let dir = tempfile::tempdir().unwrap();
    let url = database(dir.path()).await;
    let store = open_store(&url).await;
    let now = 1_800_000_000;
    let at = |s: i64| chrono::DateTime::from_timestamp(now + s, 0).unwrap();
    let account: kontalk_registrar::phone::AccountId = EMULATOR_ACCOUNT.parse().unwrap();
    execute(
        &url,
        &format!(
            "INSERT INTO accounts (id, fingerprint, public_key, created_at, updated_at) \
             VALUES ('{EMULATOR_ACCOUNT}', 'OLD', '', {now}, {now})"
        ),
    )
    .await;
    let notice = Notice {
        event_id: "e1".into(),
        sinks: vec!["webhook".into(), "xmpp".into()],
    };
    let change = KeyChange {
        old_fingerprint: "OLD".into(),
        new_fingerprint: "NEW".into(),
        public_key: vec![1, 2, 3],
        now: at(0),
        notice: notice.clone(),
    };
    assert!(store.replace_key(&account, &change).await.unwrap());
    // A second rollover from the same old key finds the key changed: nothing written.
    assert!(!store.replace_key(&account, &change).await.unwrap());
    let stored = store.account(&account).await.unwrap().unwrap();
    assert_eq!(stored.fingerprint, "NEW");

    // One row per sink; a claim holds it until the lease ends.
    let claimed = store
        .claim_events("webhook", at(0), at(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let e = &claimed[0];
    assert_eq!(
        (e.kind, e.event_id.as_str(), e.account.as_str()),
        (EventKind::KeyRolledOver, "e1", EMULATOR_ACCOUNT)
    );
    assert_eq!(
        (e.old_fingerprint.as_deref(), e.new_fingerprint.as_deref()),
        (Some("OLD"), Some("NEW"))
    );
    assert!(
        store
            .claim_events("webhook", at(30), at(90), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A deliverer that died: the event comes back when the lease ends.
    let again = store
        .claim_events("webhook", at(60), at(120), 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    store.event_failed(again[0].id, at(200)).await.unwrap();
    assert!(
        store
            .claim_events("webhook", at(199), at(260), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let retried = store
        .claim_events("webhook", at(200), at(260), 10)
        .await
        .unwrap();
    assert_eq!(retried[0].attempts, 1);
    store.event_delivered(retried[0].id).await.unwrap();
    assert!(
        store
            .claim_events("webhook", at(1000), at(1060), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The other sink still has its copy.
    assert_eq!(
        store
            .claim_events("xmpp", at(0), at(60), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Removal: only while the key is the one the caller checked.
    assert!(
        !store
            .remove_account(&account, "OLD", at(0), &notice)
            .await
            .unwrap()
    );
    let removal = Notice {
        event_id: "e2".into(),
        sinks: vec!["webhook".into()],
    };
    assert!(
        store
            .remove_account(&account, "NEW", at(0), &removal)
            .await
            .unwrap()
    );
    assert!(store.account(&account).await.unwrap().is_none());
    let removed = store
        .claim_events("webhook", at(0), at(60), 10)
        .await
        .unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].kind, EventKind::AccountRemoved);
    assert_eq!(removed[0].new_fingerprint, None);
    store.event_delivered(removed[0].id).await.unwrap();

    // No sinks configured: the change happens, no event is written.
    execute(
        &url,
        &format!(
            "INSERT INTO accounts (id, fingerprint, public_key, created_at, updated_at) \
             VALUES ('{EMULATOR_ACCOUNT}', 'A', '', {now}, {now})"
        ),
    )
    .await;
    assert!(
        store
            .remove_account(&account, "A", at(0), &Notice::default())
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_events("webhook", at(5000), at(5060), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Nonces: once each, and purged after they expire.
    assert!(store.use_nonce("remove:x:n1", at(300)).await.unwrap());
    assert!(!store.use_nonce("remove:x:n1", at(300)).await.unwrap());
    assert!(store.use_nonce("remove:x:n2", at(300)).await.unwrap());
    store.purge_expired(at(301)).await.unwrap();
    assert!(store.use_nonce("remove:x:n1", at(900)).await.unwrap());
}

#[tokio::test]
async fn key_transfers_are_taken_once_replaced_by_account_and_go_with_the_key() {
    use kontalk_registrar::registrar::ports::{KeyChange, KeyTransferRecord, Notice};
    let dir = tempfile::tempdir().unwrap();
    let url = database(dir.path()).await;
    let store = open_store(&url).await;
    let now = 1_800_000_000;
    let at = |s: i64| chrono::DateTime::from_timestamp(now + s, 0).unwrap();
    let account: kontalk_registrar::phone::AccountId = EMULATOR_ACCOUNT.parse().unwrap();
    execute(
        &url,
        &format!(
            "INSERT INTO accounts (id, fingerprint, public_key, created_at, updated_at) \
             VALUES ('{EMULATOR_ACCOUNT}', 'OLD', '', {now}, {now})"
        ),
    )
    .await;
    let transfer = |token: &str, expires_at: chrono::DateTime<chrono::Utc>| KeyTransferRecord {
        token_hash: token.into(),
        account: account.clone(),
        fingerprint: "OLD".into(),
        private_key: vec![0x95, 1, 2],
        created_at: at(0),
        expires_at,
    };
    // Taken once, whoever asks second gets nothing.
    store
        .put_key_transfer(&transfer("t1", at(900)))
        .await
        .unwrap();
    let got = store.take_key_transfer("t1", at(0)).await.unwrap().unwrap();
    assert_eq!(got, transfer("t1", at(900)));
    assert_eq!(store.take_key_transfer("t1", at(0)).await.unwrap(), None);
    // A newer upload of the account replaces the older one, concurrent uploads included.
    store
        .put_key_transfer(&transfer("t2", at(900)))
        .await
        .unwrap();
    let (t3, t4) = (transfer("t3", at(900)), transfer("t4", at(900)));
    let (a, b) = tokio::join!(store.put_key_transfer(&t3), store.put_key_transfer(&t4));
    a.unwrap();
    b.unwrap();
    assert_eq!(store.take_key_transfer("t2", at(0)).await.unwrap(), None);
    let left = [
        store.take_key_transfer("t3", at(0)).await.unwrap(),
        store.take_key_transfer("t4", at(0)).await.unwrap(),
    ];
    assert_eq!(left.iter().filter(|t| t.is_some()).count(), 1, "{left:?}");
    // Expired: not handed out, and purged.
    store
        .put_key_transfer(&transfer("t5", at(900)))
        .await
        .unwrap();
    assert_eq!(store.take_key_transfer("t5", at(900)).await.unwrap(), None);
    store
        .put_key_transfer(&transfer("t6", at(900)))
        .await
        .unwrap();
    store.purge_expired(at(901)).await.unwrap();
    assert_eq!(store.take_key_transfer("t6", at(0)).await.unwrap(), None);
    // A rollover takes the old key's transfer with it.
    store
        .put_key_transfer(&transfer("t7", at(900)))
        .await
        .unwrap();
    let change = KeyChange {
        old_fingerprint: "OLD".into(),
        new_fingerprint: "NEW".into(),
        public_key: vec![1],
        now: at(0),
        notice: Notice {
            event_id: "e1".into(),
            sinks: vec![],
        },
    };
    assert!(store.replace_key(&account, &change).await.unwrap());
    assert_eq!(store.take_key_transfer("t7", at(0)).await.unwrap(), None);
    // And a removal takes the new key's.
    store
        .put_key_transfer(&KeyTransferRecord {
            fingerprint: "NEW".into(),
            ..transfer("t8", at(900))
        })
        .await
        .unwrap();
    let notice = Notice {
        event_id: "e2".into(),
        sinks: vec![],
    };
    assert!(
        store
            .remove_account(&account, "NEW", at(0), &notice)
            .await
            .unwrap()
    );
    assert_eq!(store.take_key_transfer("t8", at(0)).await.unwrap(), None);
}

#[tokio::test]
async fn a_database_outage_is_503_with_retry_after_and_loses_nothing() {
    // PostgreSQL only (its pass of scripts/test): the service reaches it through a proxy that
    // the test cuts and restores.
    let Ok(server) = std::env::var("KONTALK_TEST_POSTGRES") else {
        return;
    };
    let authority = server.rsplit_once('@').map(|(_, a)| a.to_owned()).unwrap();
    let proxy = CuttableProxy::start(authority.clone()).await;
    let proxied = format!("127.0.0.1:{}", proxy.port);
    let s = TestServer::start_with(|c| {
        let url = c.database_url.expose().replace(&authority, &proxied);
        c.database_url = url.into();
        c.database_acquire_timeout = Duration::from_secs(2);
    })
    .await;
    let started = s.start_verification(EMULATOR, false).await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();

    // A database that stalls: readiness does not wait for the pool (whose acquire timeout is
    // 2 s here), it answers after its own second.
    proxy.hang();
    let ready = s.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.problem_type(), "database-unavailable");
    assert_eq!(
        ready.body["detail"], "the database did not answer within 1s",
        "{:?}",
        ready.body
    );
    assert!(ready.retry_after().is_some(), "{:?}", ready.headers);
    // A database that is gone: every endpoint that needs it says so, and when to try again.
    proxy.cut();
    for r in [
        s.get(&format!("/v1/verifications/{id}")).await,
        s.start_verification("+15555215556", false).await,
    ] {
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert!(
            ["database-unavailable", "limits-unavailable"].contains(&r.problem_type()),
            "{:?}",
            r.body
        );
        assert!(r.retry_after().is_some());
    }

    // It comes back: nothing was lost, and everything works again.
    proxy.restore();
    let mut back = None;
    for _ in 0..50 {
        let r = s.get(&format!("/v1/verifications/{id}")).await;
        if r.status == 200 {
            back = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back = back.expect("the verification is there once the database is back");
    assert_eq!(back.body["status"], "pending");
    assert_eq!(s.get("/readyz").await.status, 200);
    let second = s.start_verification("+15555215556", false).await;
    assert_eq!(second.status, 201, "{:?}", second.body);
}
