//! The load generator: simulated clients register numbers through the full flow against a
//! running service, in a process of their own, and report what it cost.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 \
//!     --outbox data/outbox.jsonl --pid "$(pgrep -f 'kontalk-registrar serve')" \
//!     --registrations 20000 --clients 64 [--rate 1000]
//! ```
//!
//! Each registration is a start (`POST /v1/verifications`), the code read from the development
//! provider's outbox as the phone would receive it, and the code with a key made beforehand
//! (`POST /v1/verifications/{id}/code`): keys are made by clients, so their cost stays out of the
//! measurement. Without `--rate` the clients go as fast as the service answers (the throughput);
//! with it, registrations are offered at that rate (the latency at a fixed load), at most
//! `--clients` at a time. With `--pid`, the service's CPU time per registration and its peak
//! resident memory come from `/proc`. `scripts/load` runs the service and this together.
//!
//! The service must let the load through: `scripts/load-registrar.toml` raises the budgets a
//! launch day needs and trusts the loopback client, with every defence still on.

use std::collections::HashMap;
use std::io::{BufRead as _, Seek as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use kontalk_registrar::openpgp;
use kontalk_registrar::phone::PhonePolicy;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Registers numbers through a running kontalk-registrar and reports the cost")]
struct Args {
    /// The service's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The development provider's outbox the service writes to.
    #[arg(long, default_value = "data/outbox.jsonl")]
    outbox: PathBuf,
    /// The XMPP domain of the accounts (the User IDs of the keys).
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Full registrations to make.
    #[arg(long, default_value_t = 5000)]
    registrations: usize,
    /// Clients at once.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Registrations offered per second (open loop); none: as fast as answered.
    #[arg(long)]
    rate: Option<f64>,
    /// The service's process id, for its CPU time and peak memory.
    #[arg(long)]
    pid: Option<u32>,
    /// First number: +1 555 and seven digits from this one on (a later run on the same
    /// database takes others, so that none is registered yet).
    #[arg(long)]
    first: Option<u32>,
}

/// Codes seen in the outbox, by number.
type Codes = Arc<Mutex<HashMap<String, String>>>;

/// Follows the outbox from its current end, recording each line's number and code.
fn follow_outbox(path: PathBuf, codes: Codes) {
    std::thread::spawn(move || {
        // An outbox that is there already holds earlier runs' codes: follow it from its end. One
        // that is not is followed from its first line once the service makes it.
        let mut file = std::fs::File::open(&path).ok();
        if let Some(f) = file.as_mut() {
            let _ = f.seek(std::io::SeekFrom::End(0));
        }
        let file = loop {
            match file
                .take()
                .map(Ok)
                .unwrap_or_else(|| std::fs::File::open(&path))
            {
                Ok(f) => break f,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => std::thread::sleep(Duration::from_micros(500)),
                Ok(_) if !line.ends_with('\n') => {
                    // A line still being written: read on from where it stopped next time.
                    let back = -(line.len() as i64);
                    let _ = reader.seek_relative(back);
                    std::thread::sleep(Duration::from_micros(200));
                }
                Ok(_) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && let (Some(to), Some(code)) = (v["to"].as_str(), v["code"].as_str())
                    {
                        codes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(to.to_owned(), code.to_owned());
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
}

/// `utime + stime` of `pid` in seconds, and its peak resident set in MiB.
fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((ticks / 100.0, hwm_kib / 1024.0))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    starts: Vec<Duration>,
    verifies: Vec<Duration>,
    /// Whole registrations, from the start request to the verify answer.
    flows: Vec<Duration>,
    errors: HashMap<String, u32>,
}

impl Seen {
    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_default() += 1;
    }
}

async fn post(client: &reqwest::Client, url: String, body: &Value) -> Result<(u16, Value), String> {
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// One full registration of `phone` with `key` (base64).
async fn register(
    client: &reqwest::Client,
    base: &str,
    codes: &Codes,
    phone: &str,
    key: &str,
    seen: &Mutex<Seen>,
) {
    let seen =
        |f: &mut dyn FnMut(&mut Seen)| f(&mut seen.lock().unwrap_or_else(|e| e.into_inner()));
    let t0 = Instant::now();
    let started = post(
        client,
        format!("{base}/v1/verifications"),
        &json!({"phone": phone}),
    )
    .await;
    let start_time = t0.elapsed();
    let id = match started {
        Ok((201, body)) => body["id"].as_str().unwrap_or_default().to_owned(),
        Ok((status, body)) => {
            let what = body["limit"]
                .as_str()
                .or(body["type"].as_str())
                .unwrap_or("?")
                .to_owned();
            return seen(&mut |s| s.error(format!("start {status} {what}")));
        }
        Err(e) => return seen(&mut |s| s.error(format!("start {e}"))),
    };
    seen(&mut |s| s.starts.push(start_time));
    // The code as the phone gets it.
    let wait = Instant::now();
    let code = loop {
        if let Some(c) = codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(phone)
        {
            break c;
        }
        if wait.elapsed() > Duration::from_secs(10) {
            return seen(&mut |s| s.error("no code in the outbox within 10 s".into()));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    let t1 = Instant::now();
    let verified = post(
        client,
        format!("{base}/v1/verifications/{id}/code"),
        &json!({"code": code, "public_key": key}),
    )
    .await;
    let verify_time = t1.elapsed();
    match verified {
        Ok((200, _)) => seen(&mut |s| {
            s.verifies.push(verify_time);
            s.flows.push(t0.elapsed());
        }),
        Ok((status, body)) => {
            let what = body["type"].as_str().unwrap_or("?").to_owned();
            seen(&mut |s| s.error(format!("verify {status} {what}")))
        }
        Err(e) => seen(&mut |s| s.error(format!("verify {e}"))),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let policy = PhonePolicy {
        accept_fictional: true,
        ..PhonePolicy::default()
    };
    let first = args.first.unwrap_or_else(|| {
        // Seconds of the day times a hundred: runs a minute apart do not overlap below ~6 000
        // registrations a minute.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        ((now % 86_400) * 100 % 9_000_000) as u32
    });
    eprintln!(
        "making {} client keys (Ed25519; not measured)...",
        args.registrations
    );
    let mut work = Vec::with_capacity(args.registrations);
    let mut n = first;
    while work.len() < args.registrations {
        let candidate = format!("+1555{n:07}");
        n = (n + 1) % 10_000_000;
        let Ok(phone) = policy.parse(&candidate) else {
            continue;
        };
        let jid = phone.account().jid(&args.domain);
        let cert = openpgp::generate_user_key("Load", &jid, false).expect("a key");
        let key = base64::engine::general_purpose::STANDARD
            .encode(openpgp::public_bytes(&cert).expect("its bytes"));
        work.push((phone.as_str().to_owned(), key));
    }
    work.reverse();

    let _ = rustls::crypto::ring::default_provider().install_default();
    let codes: Codes = Arc::default();
    follow_outbox(args.outbox.clone(), codes.clone());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()
        .expect("an HTTP client");
    let base = args.url.trim_end_matches('/').to_owned();
    // The service may still be starting.
    let mut tries = 0;
    loop {
        match client.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status().is_success() => break,
            other if tries == 100 => {
                panic!("the service at {base} is not answering /healthz: {other:?}")
            }
            _ => tries += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the outbox follower reach the end of the file before the first message.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let before = args.pid.and_then(process_usage);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let work = Arc::new(Mutex::new(work));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.clients));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let total = args.registrations;
    for i in 0..total {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = gate.clone().acquire_owned().await.expect("the gate");
        let Some((phone, key)) = work.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            break;
        };
        let (client, base, codes, seen) =
            (client.clone(), base.clone(), codes.clone(), seen.clone());
        tasks.spawn(async move {
            register(&client, &base, &codes, &phone, &key, &seen).await;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let after = args.pid.and_then(process_usage);

    let mut s = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    s.starts.sort();
    s.verifies.sort();
    s.flows.sort();
    let done = s.flows.len();
    let offered = match args.rate {
        Some(r) => format!("offered {r:.0}/s"),
        None => "closed loop".to_owned(),
    };
    println!(
        "{done} of {total} registrations in {:.2} s ({offered}, {} clients): {:.0} registrations/s",
        elapsed.as_secs_f64(),
        args.clients,
        done as f64 / elapsed.as_secs_f64()
    );
    for (label, v) in [
        ("start ", &s.starts),
        ("verify", &s.verifies),
        ("whole ", &s.flows),
    ] {
        println!(
            "  {label} p50 {:7.2} ms  p95 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
            percentile(v, 0.5),
            percentile(v, 0.95),
            percentile(v, 0.99),
            percentile(v, 1.0)
        );
    }
    if s.errors.is_empty() {
        println!("  errors: none");
    } else {
        let mut errors: Vec<_> = s.errors.into_iter().collect();
        errors.sort();
        println!("  errors: {errors:?}");
    }
    if let (Some((cpu0, _)), Some((cpu1, hwm))) = (before, after) {
        let cpu = cpu1 - cpu0;
        println!(
            "  service CPU {cpu:.2} s: {:.0} µs per registration; service peak RSS {hwm:.1} MiB",
            cpu / done.max(1) as f64 * 1e6
        );
    }
}
