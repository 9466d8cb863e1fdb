//! The load generator: simulated clients register through the full flow against running
//! servers, in a process of their own, and report what it cost.
//!
//! ```text
//! # the service's HTTP API
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 \
//!     --outbox data/outbox.jsonl --pid "$(pgrep -f 'kontalk-registrar serve')" \
//!     --registrations 20000 --clients 64 [--rate 1000]
//! # Kontalk's in-band registration through Prosody and the modules in prosody/
//! cargo run --release --example loadgen -- --xmpp 127.0.0.1:5222 --domain localhost \
//!     --outbox data/outbox.jsonl --pid "$REGISTRAR_PID" --prosody-pid "$PROSODY_PID" [--login]
//! # Prosody's own in-band registration (username and password), for comparison
//! cargo run --release --example loadgen -- --prosody-ibr 127.0.0.1:5222 --domain localhost \
//!     --prosody-pid "$PROSODY_PID"
//! ```
//!
//! Over HTTP each registration is a start (`POST /v1/verifications`), the code read from the
//! development provider's outbox as the phone would receive it, and the code with a key made
//! beforehand (`POST /v1/verifications/{id}/code`): keys are made by clients, so their cost stays
//! out of the measurement. With `--xmpp` it is Kontalk's flow through Prosody, one TLS
//! connection per step (see `xmpp.rs`), the code again from the outbox, the key again made
//! beforehand (and its bridge certificate, presented at TLS). With `--prosody-ibr` it is
//! Prosody's own XEP-0077 registration with a username and a password, the baseline the figures
//! are held against.
//!
//! Without `--rate` the clients go as fast as the servers answer (the throughput); with it,
//! registrations are offered at that rate (the latency at a fixed load), at most `--clients` at a
//! time. `--pid` (the registrar) and `--prosody-pid` give each server's CPU time per registration
//! and its peak resident memory, from `/proc`. `scripts/load` runs the service and this together;
//! `scripts/load-prosody` adds Prosody, both ways.
//!
//! The service must let the load through: `scripts/load-registrar.toml` raises the budgets a
//! launch day needs and trusts the loopback client, with every defence still on.

mod http;
mod outbox;
mod report;
mod xmpp;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use kontalk_registrar::openpgp;
use kontalk_registrar::phone::PhonePolicy;

use crate::outbox::Codes;
use crate::report::{Recorder, Run, Seen, Server, Usage};
use crate::xmpp::{KontalkClient, Target};

#[derive(Parser, Debug)]
#[command(about = "Registers accounts through running servers and reports the cost")]
struct Args {
    /// The service's HTTP API [default: http://127.0.0.1:8080]; with --xmpp, waited for
    /// before the run when given.
    #[arg(long)]
    url: Option<String>,
    /// Kontalk's registration through Prosody with the relay modules: its client port,
    /// HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "prosody_ibr")]
    xmpp: Option<String>,
    /// Prosody's own in-band registration (username and password): its client port.
    #[arg(long, value_name = "HOST:PORT")]
    prosody_ibr: Option<String>,
    /// Never STARTTLS, even when offered (for a server that does not require it).
    #[arg(long)]
    no_starttls: bool,
    /// With --xmpp: each client also logs in with its certified key (SASL EXTERNAL).
    #[arg(long, requires = "xmpp")]
    login: bool,
    /// The development provider's outbox the service writes to.
    #[arg(long, default_value = "data/outbox.jsonl")]
    outbox: PathBuf,
    /// The XMPP domain of the accounts (the User IDs of the keys, the streams' `to`).
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
    /// The registrar's process id, for its CPU time and peak memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Prosody's process id, for its CPU time and peak memory.
    #[arg(long)]
    prosody_pid: Option<u32>,
    /// First number: +1 555 and seven digits from this one on (a later run on the same
    /// database takes others, so that none is registered yet); with --prosody-ibr, the first
    /// username's digits.
    #[arg(long)]
    first: Option<u32>,
    /// Also writes the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One registration to make, with what its client made beforehand.
enum Work {
    Http { phone: String, key: String },
    Kontalk(Box<KontalkClient>),
    Ibr { username: String, password: String },
}

/// What every registration shares.
enum Ctx {
    Http {
        client: reqwest::Client,
        base: String,
        codes: Codes,
    },
    Kontalk {
        target: Target,
        plain: Arc<rustls::ClientConfig>,
        codes: Codes,
        login: bool,
    },
    Ibr {
        target: Target,
        plain: Arc<rustls::ClientConfig>,
    },
}

impl Ctx {
    fn mode(&self) -> &'static str {
        match self {
            Ctx::Http { .. } => "registrar over HTTP",
            Ctx::Kontalk { login: false, .. } => "registrar over XMPP through Prosody",
            Ctx::Kontalk { login: true, .. } => "registrar over XMPP through Prosody, with login",
            Ctx::Ibr { .. } => "Prosody's own in-band registration",
        }
    }

    async fn register(&self, work: Work, seen: &Mutex<Seen>) {
        let rec = Recorder(seen);
        match (self, work) {
            (
                Ctx::Http {
                    client,
                    base,
                    codes,
                },
                Work::Http { phone, key },
            ) => http::register(client, base, codes, &phone, &key, rec).await,
            (
                Ctx::Kontalk {
                    target,
                    plain,
                    codes,
                    login,
                },
                Work::Kontalk(c),
            ) => xmpp::kontalk(target, plain, codes, &c, *login, rec).await,
            (Ctx::Ibr { target, plain }, Work::Ibr { username, password }) => {
                xmpp::prosody_ibr(target, plain, &username, &password, rec).await
            }
            _ => unreachable!("the work is made for its mode"),
        }
    }
}

/// Numbers `+1555nnnnnnn` from `first` on that the policy accepts, with their accounts' JIDs.
fn numbers(first: u32, count: usize, domain: &str) -> Vec<(String, String)> {
    let policy = PhonePolicy {
        accept_fictional: true,
        ..PhonePolicy::default()
    };
    let mut out = Vec::with_capacity(count);
    let mut n = first;
    while out.len() < count {
        let candidate = format!("+1555{n:07}");
        n = (n + 1) % 10_000_000;
        if let Ok(phone) = policy.parse(&candidate) {
            out.push((phone.as_str().to_owned(), phone.account().jid(domain)));
        }
    }
    out
}

/// What each client makes before the run (keys, certificates), not measured.
fn prepare(args: &Args, first: u32) -> Vec<Work> {
    let n = args.registrations;
    let mut work: Vec<Work> = if args.prosody_ibr.is_some() {
        (0..n)
            .map(|i| {
                let id = (first as usize + i) % 10_000_000;
                Work::Ibr {
                    username: format!("load{id:07}"),
                    password: format!("load-password-{id:07}"),
                }
            })
            .collect()
    } else {
        let what = if args.xmpp.is_some() {
            "keys and bridge certificates"
        } else {
            "keys"
        };
        eprintln!("making {n} client {what} (Ed25519; not measured)...");
        numbers(first, n, &args.domain)
            .into_iter()
            .map(|(phone, jid)| {
                if args.xmpp.is_some() {
                    Work::Kontalk(Box::new(KontalkClient::new(phone, jid).expect("a key")))
                } else {
                    let cert = openpgp::generate_user_key("Load", &jid, false).expect("a key");
                    let key = base64::engine::general_purpose::STANDARD
                        .encode(openpgp::public_bytes(&cert).expect("its bytes"));
                    Work::Http { phone, key }
                }
            })
            .collect()
    };
    work.reverse();
    work
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let first = args.first.unwrap_or_else(|| {
        // Seconds of the day times a hundred: runs a minute apart do not overlap below ~6 000
        // registrations a minute.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        ((now % 86_400) * 100 % 9_000_000) as u32
    });
    let work = prepare(&args, first);

    // The service closes a connection that waits 10 s for a request head (its header
    // timeout, idle keep-alive included): drop idle connections before that, or a request sent
    // on one as it closes fails.
    let http_client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let default_url = "http://127.0.0.1:8080".to_owned();
    let base = args
        .url
        .clone()
        .unwrap_or(default_url)
        .trim_end_matches('/')
        .to_owned();
    let target = |address: &String| Target {
        address: address.clone(),
        domain: args.domain.clone(),
        starttls: !args.no_starttls,
    };
    let plain = || xmpp::tls(None).expect("a TLS configuration");
    let ctx = if let Some(address) = &args.prosody_ibr {
        Ctx::Ibr {
            target: target(address),
            plain: plain(),
        }
    } else if let Some(address) = &args.xmpp {
        Ctx::Kontalk {
            target: target(address),
            plain: plain(),
            codes: Codes::follow(args.outbox.clone()),
            login: args.login,
        }
    } else {
        Ctx::Http {
            client: http_client.clone(),
            base: base.clone(),
            codes: Codes::follow(args.outbox.clone()),
        }
    };
    // The servers may still be starting.
    match &ctx {
        Ctx::Http { .. } => http::wait_healthy(&http_client, &base).await,
        Ctx::Kontalk { target, .. } | Ctx::Ibr { target, .. } => {
            if args.url.is_some() {
                http::wait_healthy(&http_client, &base).await;
            }
            target.wait_listening().await;
        }
    }
    // Let the outbox follower reach the end of the file before the first message.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let usage = |pid: Option<u32>| pid.and_then(Usage::of);
    let before = (usage(args.pid), usage(args.prosody_pid));
    let client_before = usage(Some(std::process::id()));
    let machine_before = report::Machine::now();
    let ctx = Arc::new(ctx);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let work = Arc::new(Mutex::new(work));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.clients));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.registrations {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = gate.clone().acquire_owned().await.expect("the gate");
        let Some(item) = work.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            break;
        };
        let (ctx, seen) = (ctx.clone(), seen.clone());
        tasks.spawn(async move {
            ctx.register(item, &seen).await;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let machine_after = report::Machine::now();

    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let servers = [
        Server {
            label: "registrar",
            before: before.0,
            after: usage(args.pid),
        },
        Server {
            label: "prosody",
            before: before.1,
            after: usage(args.prosody_pid),
        },
    ];
    let client = Server {
        label: "load generator",
        before: client_before,
        after: usage(Some(std::process::id())),
    };
    let tls = if args.no_starttls { ", no TLS" } else { "" };
    let run = Run {
        mode: format!("{}{tls}", ctx.mode()),
        total: args.registrations,
        clients: args.clients,
        rate: args.rate,
        elapsed,
        machine: [machine_before, machine_after],
    };
    let json = report::report(&run, seen, &servers, &client);
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json:#}\n")).expect("the JSON report written");
    }
}
