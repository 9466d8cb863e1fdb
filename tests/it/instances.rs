//! Several instances behind one PostgreSQL: two real service processes sharing the database, the
//! server key and the secret, hammered in parallel with the races that must resolve exactly once.
//! Runs in the PostgreSQL pass of scripts/test (KONTALK_TEST_POSTGRES).

use std::process::{Command, Stdio};

use futures::future::join_all;
use serde_json::{Value, json};

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_kontalk-registrar");

struct Instance {
    base: String,
    _process: Process,
}

fn start_instance(
    config: &std::path::Path,
    data: &std::path::Path,
    secret: &str,
    port: u16,
    log: &std::path::Path,
) -> Instance {
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env("REGISTRAR_SERVER__SECRET", secret)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let process = Process(child, "kontalk-registrar instance");
    wait_for_health(port);
    Instance {
        base: format!("http://127.0.0.1:{port}"),
        _process: process,
    }
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn outbox_codes(outbox: &std::path::Path, phone: &str) -> Vec<String> {
    std::fs::read_to_string(outbox)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["to"] == phone)
        .map(|v| v["code"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_resolve_every_race_exactly_once() {
    let Some(db) = postgres_database().await else {
        eprintln!("runs in the PostgreSQL pass of scripts/test (KONTALK_TEST_POSTGRES)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // One server key and one secret for both, as production mode demands.
    let key = dir.path().join("server-key.asc");
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let secret = "5e".repeat(32);
    let outbox = dir.path().join("outbox.jsonl");
    let config = dir.path().join("registrar.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nkey_file = {key:?}\n[database]\nurl = {db:?}\n\
             [[providers]]\nkind = \"development\"\noutbox = {outbox:?}\n\
             [abuse]\ntrusted_ips = [\"127.0.0.1\"]\n",
            key = key.to_str().unwrap(),
            outbox = outbox.to_str().unwrap()
        ),
    )
    .unwrap();
    let [pa, pb] = free_ports();
    let a = start_instance(
        &config,
        &dir.path().join("a"),
        &secret,
        pa,
        &dir.path().join("a.log"),
    );
    let b = start_instance(
        &config,
        &dir.path().join("b"),
        &secret,
        pb,
        &dir.path().join("b.log"),
    );
    let bases = [a.base.clone(), b.base.clone()];
    let client = http_client();

    for base in &bases {
        let r: Value = client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["database"], "postgres");
        assert_eq!(r["schema_version"], 9);
    }

    // 1. Twenty starts for one number at once, on both instances: one verification, one message.
    let phone = "+15555215554";
    let starts = join_all((0..20).map(|i| {
        post(
            &client,
            format!("{}/v1/verifications", bases[i % 2]),
            json!({"phone": phone}),
        )
    }))
    .await;
    let created: Vec<&Value> = starts
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        created.len(),
        1,
        "{:?}",
        starts.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    // The others are refused (429) or, being the same client within the repeat window, get the
    // verification back (200).
    assert!(
        starts
            .iter()
            .all(|(s, _)| *s == 201 || *s == 200 || *s == 429),
        "{starts:?}"
    );
    assert_eq!(outbox_codes(&outbox, phone).len(), 1, "one message");
    let id = created[0]["id"].as_str().unwrap().to_owned();
    let jid = created[0]["account"].as_str().unwrap().to_owned();

    // 2. The resend wait is shared: a resend on the other instance is refused too.
    for base in &bases {
        let (s, _) = post(
            &client,
            format!("{base}/v1/verifications/{id}/resend"),
            json!({}),
        )
        .await;
        assert_eq!(s, 429);
    }

    // 3. The right code, submitted five times at once on both instances (started on one,
    //    completed on the other): one account, one stored result for everybody.
    let code = outbox_codes(&outbox, phone).pop().unwrap();
    let key_b64 = b64(&public(&user_key(&jid)));
    let submissions = join_all((0..5).map(|i| {
        post(
            &client,
            format!("{}/v1/verifications/{id}/code", bases[(i + 1) % 2]),
            json!({"code": code, "public_key": key_b64}),
        )
    }))
    .await;
    assert!(
        submissions.iter().all(|(s, _)| *s == 200),
        "{submissions:?}"
    );
    assert!(submissions.windows(2).all(|w| w[0].1 == w[1].1));
    let store = open_store(&db).await;
    let account = store
        .account(&EMULATOR_ACCOUNT.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        account.created_at, account.updated_at,
        "created once, never replaced"
    );
    assert_eq!(
        account.fingerprint,
        submissions[0].1["fingerprint"].as_str().unwrap()
    );

    // 4. The key certified by one instance verifies with the other's server key.
    let certified = kontalk_registrar::openpgp::parse_cert(&unb64(
        submissions[0].1["public_key"].as_str().unwrap(),
    ))
    .unwrap();
    for base in &bases {
        let armored = client
            .get(format!("{base}/v1/server-key"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let server = kontalk_registrar::openpgp::parse_cert(&armored).unwrap();
        assert!(kontalk_registrar::openpgp::has_certification(
            &certified, &server, &jid
        ));
    }

    // 5. Forty wrong guesses at once on both instances: exactly five are judged.
    let phone2 = "+15555215556";
    let (s, started) = post(
        &client,
        format!("{}/v1/verifications", bases[1]),
        json!({"phone": phone2}),
    )
    .await;
    assert_eq!(s, 201);
    let id2 = started["id"].as_str().unwrap().to_owned();
    let right = outbox_codes(&outbox, phone2).pop().unwrap();
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    let key2 = b64(&public(&user_key(started["account"].as_str().unwrap())));
    let guesses = join_all((0..40).map(|i| {
        post(
            &client,
            format!("{}/v1/verifications/{id2}/code", bases[i % 2]),
            json!({"code": wrong, "public_key": key2}),
        )
    }))
    .await;
    let judged = guesses.iter().filter(|(s, _)| *s == 422).count();
    let locked = guesses.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!((judged, locked), (5, 35));
    let (s, _) = post(
        &client,
        format!("{}/v1/verifications/{id2}/code", bases[0]),
        json!({"code": right, "public_key": key2}),
    )
    .await;
    assert_eq!(s, 429, "locked on every instance, even for the right code");

    // 6. Both instances purge at once without stepping on each other.
    let purges =
        join_all((0..4).map(|_| store.purge_expired(chrono::DateTime::<chrono::Utc>::MAX_UTC)))
            .await;
    let purged: u64 = purges.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(purged, 2, "each expired verification deleted exactly once");
}
