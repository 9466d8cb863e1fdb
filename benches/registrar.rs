//! Benchmarks: `cargo bench --bench registrar`. Prints a table of figures (the README quotes
//! them); asserts nothing about time.
//!
//! - phone parsing per country (libphonenumber's validity check dominates);
//! - keyed code hashing;
//! - the key policy check and certification, for Ed25519 and RSA-2048 user keys;
//! - the whole registration (start + verify) over HTTP with concurrent clients, and the process's
//!   peak memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kontalk_registrar::config::Config;
use kontalk_registrar::openpgp::{self, ServerKey, UserKey};
use kontalk_registrar::phone::PhonePolicy;
use kontalk_registrar::registrar::abuse::Rate;
use kontalk_registrar::secret::ServerSecret;
use kontalk_registrar::{Listeners, Services};
use registrar_providers::{CapturingProvider, Provider};
use serde_json::{Value, json};

fn per_op(label: &str, n: u32, f: impl Fn()) {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let each = t.elapsed() / n;
    println!("{label:<48} {:>12.1} µs/op", each.as_secs_f64() * 1e6);
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn micro() {
    let policy = PhonePolicy::default();
    for (country, number) in [
        ("US (fictional, dev policy)", "+15555215554"),
        ("UK mobile", "+447911123456"),
        ("Italy mobile", "+393471234567"),
        ("Germany mobile", "+4915123456789"),
        ("Brazil mobile", "+5511912345678"),
        ("India mobile", "+919812345678"),
        ("China mobile", "+8613800138000"),
    ] {
        let p = if country.contains("dev") {
            PhonePolicy {
                accept_fictional: true,
                ..PhonePolicy::default()
            }
        } else {
            policy.clone()
        };
        assert!(p.parse(number).is_ok(), "{number}");
        per_op(&format!("phone parse+validate: {country}"), 200, || {
            let _ = p.parse(number);
        });
    }
    let secret = ServerSecret::generate();
    let hash = secret.code_hash("0123456789abcdef0123456789abcdef", "123456");
    per_op("code hash compare (HMAC-SHA256)", 100_000, || {
        let _ = secret.code_matches("0123456789abcdef0123456789abcdef", "123456", &hash);
    });

    let server = ServerKey::generate("localhost").unwrap_or_else(|e| panic!("{e}"));
    let email = "4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost";
    for (label, rsa) in [("Ed25519", false), ("RSA-2048", true)] {
        let cert =
            openpgp::generate_user_key("Bench", email, rsa).unwrap_or_else(|e| panic!("{e}"));
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(openpgp::public_bytes(&cert).unwrap_or_else(|e| panic!("{e}")));
        let key = UserKey::parse(&b64).unwrap_or_else(|e| panic!("{e}"));
        per_op(
            &format!("parse + policy check, {label} user key"),
            200,
            || {
                let k = UserKey::parse(&b64).unwrap_or_else(|e| panic!("{e}"));
                openpgp::check_user_key(&k, email, std::time::SystemTime::now())
                    .unwrap_or_else(|e| panic!("{e}"));
            },
        );
        per_op(
            &format!("certify {label} user key (Ed25519 server key)"),
            200,
            || {
                server
                    .certify(&key, email, std::time::SystemTime::now())
                    .unwrap_or_else(|e| panic!("{e}"));
            },
        );
    }
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A fresh database on the PostgreSQL server `server` (`postgres://user@host:port`).
async fn postgres_database(server: &str) -> String {
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let name = format!("bench_{}", std::process::id());
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&admin)
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    format!("{server}/{name}")
}

async fn load(registrations: usize, concurrency: usize, postgres: Option<&str>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut config = Config::development(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let backend = match postgres {
        Some(server) => {
            config.database_url = postgres_database(server).await.into();
            config.database_max_connections = 32;
            "PostgreSQL"
        }
        None => "SQLite",
    };
    // Every limit is applied and counted, as in production, but the load comes from one
    // loopback client (trusted, so the per-IP limits do not apply) and exceeds the default
    // country, global and daily budgets by design.
    let abuse = &mut config.settings.abuse;
    abuse.lists.trusted_ips = vec!["127.0.0.1/32".parse().unwrap_or_else(|e| panic!("{e}"))];
    let plenty = Some(Rate::new(1_000_000, Duration::from_secs(3600)));
    abuse.start.country = plenty;
    abuse.start.global = plenty;
    abuse.start.prefix = plenty;
    abuse.caps.total = None;
    abuse.caps.per_country = None;
    abuse.pumping.enabled = true;
    let capture = CapturingProvider::new("bench", "12345");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let base = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    let services = Services {
        clock: None,
        providers: Some(vec![Arc::new(capture.clone()) as Arc<dyn Provider>]),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kontalk_registrar::run_with(
        config,
        Listeners { http: listener },
        async move {
            let _ = stopped.await;
        },
        services,
    ));
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keys are made by clients, not the server: prepare them outside the measurement.
    let numbers: Vec<String> = (0..registrations)
        .map(|i| format!("+1555521{i:04}"))
        .collect();
    let keys: Vec<String> = numbers
        .iter()
        .map(|n| {
            let policy = PhonePolicy {
                accept_fictional: true,
                ..PhonePolicy::default()
            };
            let jid = policy
                .parse(n)
                .unwrap_or_else(|e| panic!("{e}"))
                .account()
                .jid("localhost");
            let cert =
                openpgp::generate_user_key("Bench", &jid, false).unwrap_or_else(|e| panic!("{e}"));
            base64::engine::general_purpose::STANDARD
                .encode(openpgp::public_bytes(&cert).unwrap_or_else(|e| panic!("{e}")))
        })
        .collect();
    let work = Arc::new(std::sync::Mutex::new(
        numbers.into_iter().zip(keys).collect::<Vec<_>>(),
    ));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (work, client, base, capture) =
            (work.clone(), client.clone(), base.clone(), capture.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = (Vec::new(), Vec::new());
            loop {
                let Some((phone, key)) = work.lock().unwrap_or_else(|e| e.into_inner()).pop()
                else {
                    break;
                };
                let t = Instant::now();
                let (status, body) = post(
                    &client,
                    format!("{base}/v1/verifications"),
                    json!({"phone": phone}),
                )
                .await;
                assert_eq!(status, 201, "{body}");
                lat.0.push(t.elapsed());
                let id = body["id"].as_str().unwrap_or_default().to_owned();
                let code = capture.last_code(&phone).unwrap_or_default();
                let t = Instant::now();
                let (status, body) = post(
                    &client,
                    format!("{base}/v1/verifications/{id}/code"),
                    json!({"code": code, "public_key": key}),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                lat.1.push(t.elapsed());
            }
            lat
        }));
    }
    let (mut starts, mut verifies) = (Vec::new(), Vec::new());
    for t in tasks {
        let (s, v) = t.await.unwrap_or_else(|e| panic!("{e}"));
        starts.extend(s);
        verifies.extend(v);
    }
    let elapsed = started.elapsed();
    starts.sort();
    verifies.sort();
    println!(
        "HTTP registrations (start + verify) on {backend}, {concurrency} clients: {:.0} registrations/s over {registrations}",
        registrations as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  start  latency p50 {:.2} ms  p99 {:.2} ms",
        percentile(&starts, 0.5),
        percentile(&starts, 0.99)
    );
    println!(
        "  verify latency p50 {:.2} ms  p99 {:.2} ms",
        percentile(&verifies, 0.5),
        percentile(&verifies, 0.99)
    );
    println!(
        "  peak RSS of the whole bench process: {:.1} MiB",
        peak_rss_mib()
    );
    let _ = stop.send(());
    let _ = server.await;
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    let full = std::env::args().any(|a| a == "--bench");
    micro();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (n, c) = if full { (2000, 16) } else { (50, 4) };
    rt.block_on(load(n, c, None));
    // KONTALK_BENCH_POSTGRES=postgres://user@host:port measures the same on PostgreSQL.
    if let Ok(server) = std::env::var("KONTALK_BENCH_POSTGRES") {
        rt.block_on(load(n, c, Some(&server)));
    }
}
