//! The SMS-pumping simulation: a seeded traffic generator drives the real service (HTTP API,
//! default abuse settings, manual clock) through two days of traffic.
//!
//! The scenario is fixed so that it cannot be made easy:
//! - legitimate users in 32 countries, each country completing between 70% and 90% of its
//!   verifications, arriving in daily waves (a sine over the day, peak and trough differing by a
//!   factor of 9), from a large pool of residential addresses; one in ten asks for a resend before
//!   completing, and completions come 20 seconds to 8 minutes after the message;
//! - an attacker that starts on day one at 06:00 with 2 requests an hour and ramps up by half
//!   every hour to 150 an hour, then keeps going to the end; every request goes to a random
//!   number of one prefix (+44 7911 1) inside a country (+44) that also has legitimate traffic,
//!   comes from a new random address, and is never completed.
//!
//! The test asserts that at least 95% of the attacker's messages are refused and at most 1% of
//! legitimate users are refused anything, and prints both (the figures in the README).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use kontalk_registrar::phone::PhonePolicy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sequoia_openpgp::cert::CertBuilder;
use sequoia_openpgp::types::KeyFlags;
use serde_json::json;

use crate::harness::{Reply, TestServer, b64};

const SEED: u64 = 0x006b_6f6e_7461_6c6b;
const DAYS: i64 = 2;
/// Regions with a calling code of their own (so that each is one country for the caps).
const COUNTRIES: [&str; 32] = [
    "DE", "FR", "ES", "NL", "SE", "PL", "CH", "AT", "BR", "IN", "ID", "MX", "NG", "PK", "BD", "JP",
    "PH", "VN", "TR", "TH", "EG", "ZA", "KE", "AR", "CO", "UA", "MY", "AU", "BE", "PT", "GR", "GB",
];
const ATTACKED_PREFIX: &str = "+4479111";

/// One user's next step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A legitimate user starts.
    Start { user: usize },
    /// A legitimate user asks for another message.
    Resend { user: usize },
    /// A legitimate user types the code.
    Complete { user: usize },
    /// The attacker sends one request.
    Attack,
}

struct User {
    phone: String,
    ip: String,
    completes: bool,
    resends: bool,
    verification: Option<String>,
    account: Option<String>,
    refused: Option<String>,
}

/// Valid mobile numbers of `region`: its example mobile number with every digit after the first
/// three randomised, kept when the service's own policy accepts it.
fn mobile_number(region: &str, policy: &PhonePolicy, rng: &mut StdRng) -> String {
    let meta = phonenumber::metadata::DATABASE.by_id(region).unwrap();
    let mobile = meta.descriptors().mobile().unwrap();
    let example = mobile.example().unwrap().to_owned();
    for keep in [3, 4, 5, 6] {
        for _ in 0..40 {
            let nsn: String = example
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i < keep {
                        c
                    } else {
                        char::from(b'0' + rng.random_range(0..10u8))
                    }
                })
                .collect();
            // The mobile pattern first (cheap), then the service's own policy.
            if !mobile.is_match(&nsn) {
                continue;
            }
            let candidate = format!("+{}{nsn}", meta.country_code());
            if let Ok(n) = policy.parse(&candidate) {
                return n.as_str().to_owned();
            }
        }
    }
    panic!("no valid mobile number for {region}");
}

fn random_ip(rng: &mut StdRng) -> String {
    if rng.random_bool(0.3) {
        format!(
            "2a02:{:x}:{:x}:{:x}::{:x}",
            rng.random::<u16>(),
            rng.random::<u16>(),
            rng.random::<u16>(),
            rng.random::<u16>()
        )
    } else {
        format!(
            "{}.{}.{}.{}",
            rng.random_range(1..224u8),
            rng.random::<u8>(),
            rng.random::<u8>(),
            rng.random_range(1..255u8)
        )
    }
}

/// A minimal client key (Ed25519 primary, one User ID): what the policy needs, quick to make.
fn key_for(jid: &str) -> Vec<u8> {
    let (cert, _) = CertBuilder::new()
        .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
        .set_validity_period(None)
        .add_userid(format!("User <{jid}>"))
        .generate()
        .unwrap();
    crate::harness::public(&cert)
}

async fn post(s: &TestServer, path: &str, ip: &str, body: serde_json::Value) -> Reply {
    Reply::from(
        s.http
            .post(s.url(path))
            .header("x-forwarded-for", ip)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn refusal(r: &Reply) -> String {
    match r.body["limit"].as_str() {
        Some(limit) => format!("{} {limit}", r.status),
        None => format!("{} {}", r.status, r.problem_type()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pumping_simulation_blocks_the_attacker_and_spares_real_users() {
    let s = TestServer::start_with(|c| {
        // Clients are named by X-Forwarded-For, as behind a reverse proxy; every abuse setting
        // keeps its default.
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let mut rng = StdRng::seed_from_u64(SEED);
    let policy = PhonePolicy::default();
    let day0 = (s.clock_now().timestamp().div_euclid(86_400) + 1) * 86_400;
    s.clock.advance(Duration::from_secs(
        (day0 - s.clock_now().timestamp()) as u64,
    ));

    // The legitimate users: per country a daily volume and a completion rate.
    let mut users: Vec<User> = Vec::new();
    let mut queue: BinaryHeap<Reverse<(i64, Step)>> = BinaryHeap::new();
    let ip_pool: Vec<String> = (0..20_000).map(|_| random_ip(&mut rng)).collect();
    for (i, region) in COUNTRIES.iter().enumerate() {
        let per_day = rng.random_range(25.0..60.0f64);
        let completion = rng.random_range(0.70..0.90f64);
        // Local peak hour, spread round the world.
        let peak = (i as f64 * 24.0 / COUNTRIES.len() as f64).rem_euclid(24.0);
        let max_rate = per_day / 24.0 * 1.8; // per hour, at the peak
        let mut t = 0.0f64; // hours since day0
        loop {
            // Poisson arrivals at the peak rate, thinned by the wave.
            t += -rng.random::<f64>().ln() / max_rate;
            if t >= (DAYS * 24) as f64 {
                break;
            }
            let phase = ((t - peak) / 24.0) * std::f64::consts::TAU;
            let wave = (1.0 + 0.8 * phase.cos()) / 1.8;
            if rng.random::<f64>() > wave {
                continue;
            }
            let user = users.len();
            users.push(User {
                phone: mobile_number(region, &policy, &mut rng),
                ip: ip_pool[rng.random_range(0..ip_pool.len())].clone(),
                completes: rng.random_bool(completion),
                resends: rng.random_bool(0.1),
                verification: None,
                account: None,
                refused: None,
            });
            queue.push(Reverse((day0 + (t * 3600.0) as i64, Step::Start { user })));
        }
    }
    // The attacker: from 06:00 on day one, 2 requests an hour, half again more each hour, at most
    // 150 an hour.
    let mut t = 6.0f64;
    let mut attacks = 0u32;
    while t < (DAYS * 24) as f64 {
        let rate = (2.0 * 1.5f64.powf(t - 6.0)).min(150.0);
        t += -rng.random::<f64>().ln() / rate;
        queue.push(Reverse((day0 + (t * 3600.0) as i64, Step::Attack)));
        attacks += 1;
    }

    let mut attacker_sent = 0u32;
    let mut attacker_refused = 0u32;
    let mut attacker_reasons = std::collections::BTreeMap::<String, u32>::new();
    let mut legit_messages = 0u32;
    while let Some(Reverse((when, step))) = queue.pop() {
        let now = s.clock_now().timestamp();
        if when > now {
            s.clock.advance(Duration::from_secs((when - now) as u64));
        }
        match step {
            Step::Attack => {
                let phone = format!("{ATTACKED_PREFIX}{:05}", rng.random_range(0..100_000u32));
                let ip = random_ip(&mut rng);
                let r = post(&s, "/v1/verifications", &ip, json!({"phone": phone})).await;
                if r.status == 201 {
                    attacker_sent += 1;
                } else {
                    attacker_refused += 1;
                    *attacker_reasons.entry(refusal(&r)).or_default() += 1;
                }
            }
            Step::Start { user } => {
                let u = &mut users[user];
                let r = post(&s, "/v1/verifications", &u.ip, json!({"phone": u.phone})).await;
                if r.status != 201 {
                    u.refused = Some(format!("start: {}", refusal(&r)));
                    continue;
                }
                legit_messages += 1;
                u.verification = Some(r.body["id"].as_str().unwrap().to_owned());
                u.account = Some(r.body["account"].as_str().unwrap().to_owned());
                if u.completes {
                    let next = if u.resends {
                        // After the resend wait, plus a little.
                        Step::Resend { user }
                    } else {
                        Step::Complete { user }
                    };
                    let delay = if u.resends {
                        rng.random_range(61..180)
                    } else {
                        rng.random_range(20..480)
                    };
                    queue.push(Reverse((when + delay, next)));
                }
            }
            Step::Resend { user } => {
                let u = &mut users[user];
                let id = u.verification.clone().unwrap();
                let r = post(
                    &s,
                    &format!("/v1/verifications/{id}/resend"),
                    &u.ip,
                    json!({}),
                )
                .await;
                if r.status != 200 {
                    u.refused = Some(format!("resend: {}", refusal(&r)));
                    continue;
                }
                legit_messages += 1;
                queue.push(Reverse((
                    when + rng.random_range(20..240),
                    Step::Complete { user },
                )));
            }
            Step::Complete { user } => {
                let u = &mut users[user];
                let id = u.verification.clone().unwrap();
                let code = s.code_for(&u.phone);
                let key = key_for(u.account.as_deref().unwrap());
                let r = post(
                    &s,
                    &format!("/v1/verifications/{id}/code"),
                    &u.ip,
                    json!({"code": code, "public_key": b64(&key)}),
                )
                .await;
                if r.status != 200 {
                    u.refused = Some(format!("code: {}", refusal(&r)));
                }
            }
        }
    }

    let refused: Vec<&User> = users.iter().filter(|u| u.refused.is_some()).collect();
    let blocked_share = f64::from(attacker_refused) / f64::from(attacks);
    let refused_share = refused.len() as f64 / users.len() as f64;
    eprintln!(
        "pumping simulation (seed {SEED:#x}, {DAYS} days): {} legitimate users in {} countries \
         ({legit_messages} messages), {} refused ({:.2}%); attacker: {attacks} requests, \
         {attacker_sent} messages sent, {attacker_refused} refused ({:.2}%) by {attacker_reasons:?}",
        users.len(),
        COUNTRIES.len(),
        refused.len(),
        refused_share * 100.0,
        blocked_share * 100.0,
    );
    for u in refused.iter().take(10) {
        eprintln!("  refused: {} {:?}", &u.phone[..5], u.refused);
    }
    assert_eq!(attacker_sent + attacker_refused, attacks);
    assert!(users.len() > 2000, "{} users", users.len());
    assert!(attacks > 4000, "{attacks} attacks");
    assert!(
        blocked_share >= 0.95,
        "only {:.2}% of the attacker's messages were refused",
        blocked_share * 100.0
    );
    assert!(
        refused_share <= 0.01,
        "{:.2}% of legitimate users were refused",
        refused_share * 100.0
    );
    // The block is on the record, for the attacked prefix only.
    let blocks = crate::harness::open_store(&s.db_url)
        .await
        .blocks(s.clock_now().timestamp() - 2 * 86_400)
        .await
        .unwrap();
    assert!(
        blocks
            .iter()
            .all(|b| b.scope == format!("prefix:{}", &ATTACKED_PREFIX[1..])),
        "{blocks:?}"
    );
    assert!(!blocks.is_empty());
}
