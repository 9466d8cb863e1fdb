//! The SMS-pumping simulation: a seeded traffic generator drives the real service (HTTP API,
//! default abuse settings, manual clock) through two days of traffic, once for each of two
//! attacks.
//!
//! The scenario is fixed so that it cannot be made easy:
//! - legitimate users in 32 countries, each country completing between 70% and 90% of its
//!   verifications, arriving in daily waves (a sine over the day, peak and trough differing by a
//!   factor of 9), from a large pool of residential addresses; one in ten asks for a resend
//!   (once the answer's `next_resend_at` has come, as a client's resend button would) before
//!   completing, and completions come 20 seconds to 8 minutes after the message; a user whose
//!   code comes as a missed call types the caller number's hidden digits the same way;
//! - the **burst** attack starts on day one at 06:00 with 2 requests an hour and ramps up by half
//!   every hour to 150 an hour, then keeps going to the end; every request goes to a random
//!   number of one prefix (+44 7911 1) inside a country (+44) that also has legitimate traffic,
//!   comes from a new random address, and is never completed;
//! - the **wide** attack is slow and spread out: from day one at 03:00 to the end, 35 requests an
//!   hour to each of two countries with legitimate traffic (+44 and +234, 1 680 a day, under
//!   every daily cap), each to a random mobile number anywhere in the country's mobile ranges
//!   (so that no prefix of 5 or more digits gets more than a few a day), from a botnet of 3 000
//!   addresses; never completed.
//!
//! Each test asserts that at least 95% of the attacker's requests get no text message (refused,
//! or answered with a missed call, which earns a pumper nothing) and that at most 1% of
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
/// The wide attack's countries and requests per hour to each.
const WIDE_COUNTRIES: [&str; 2] = ["GB", "NG"];
const WIDE_RATE: f64 = 35.0;

/// The attack a simulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    Burst,
    Wide,
}

/// One user's next step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A legitimate user starts.
    Start { user: usize },
    /// A legitimate user asks for another message.
    Resend { user: usize },
    /// A legitimate user types the code.
    Complete { user: usize },
    /// The attacker sends one request (to a number of `WIDE_COUNTRIES[country]` in the wide
    /// attack).
    Attack { country: usize },
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
    random_mobile(region, &[3, 4, 5, 6], policy, rng)
}

/// A valid mobile number of `region` that keeps the first `keeps[i]` digits of its example
/// (the first that yields one) and randomises the rest.
fn random_mobile(region: &str, keeps: &[usize], policy: &PhonePolicy, rng: &mut StdRng) -> String {
    let meta = phonenumber::metadata::DATABASE.by_id(region).unwrap();
    let mobile = meta.descriptors().mobile().unwrap();
    let example = mobile.example().unwrap().to_owned();
    for &keep in keeps {
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

/// What a simulation ends with.
struct Outcome {
    server: TestServer,
    users: usize,
    refused_users: usize,
    attacks: u32,
    /// Attacker requests answered with a text message (or voice call).
    texts: u32,
}

/// Runs the scenario with `attack`, prints its figures, and asserts the targets.
async fn simulate(attack: Attack) -> Outcome {
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
    let mut attacks = 0u32;
    match attack {
        Attack::Burst => {
            // From 06:00 on day one, 2 requests an hour, half again more each hour, at most
            // 150 an hour.
            let mut t = 6.0f64;
            while t < (DAYS * 24) as f64 {
                let rate = (2.0 * 1.5f64.powf(t - 6.0)).min(150.0);
                t += -rng.random::<f64>().ln() / rate;
                queue.push(Reverse((
                    day0 + (t * 3600.0) as i64,
                    Step::Attack { country: 0 },
                )));
                attacks += 1;
            }
        }
        Attack::Wide => {
            // From 03:00 on day one, a steady WIDE_RATE an hour to each country.
            for country in 0..WIDE_COUNTRIES.len() {
                let mut t = 3.0f64;
                loop {
                    t += -rng.random::<f64>().ln() / WIDE_RATE;
                    if t >= (DAYS * 24) as f64 {
                        break;
                    }
                    queue.push(Reverse((
                        day0 + (t * 3600.0) as i64,
                        Step::Attack { country },
                    )));
                    attacks += 1;
                }
            }
        }
    }
    let botnet: Vec<String> = (0..3_000).map(|_| random_ip(&mut rng)).collect();

    let mut texts = 0u32;
    let mut calls = 0u32;
    let mut attacker_refused = 0u32;
    let mut attacker_reasons = std::collections::BTreeMap::<String, u32>::new();
    let mut legit_messages = 0u32;
    let mut legit_calls = 0u32;
    while let Some(Reverse((when, step))) = queue.pop() {
        let now = s.clock_now().timestamp();
        if when > now {
            s.clock.advance(Duration::from_secs((when - now) as u64));
        }
        match step {
            Step::Attack { country } => {
                let (phone, ip) = match attack {
                    Attack::Burst => (
                        format!("{ATTACKED_PREFIX}{:05}", rng.random_range(0..100_000u32)),
                        random_ip(&mut rng),
                    ),
                    Attack::Wide => (
                        random_mobile(WIDE_COUNTRIES[country], &[1, 2, 3], &policy, &mut rng),
                        botnet[rng.random_range(0..botnet.len())].clone(),
                    ),
                };
                let r = post(&s, "/v1/verifications", &ip, json!({"phone": phone})).await;
                if r.status != 201 {
                    attacker_refused += 1;
                    *attacker_reasons.entry(refusal(&r)).or_default() += 1;
                } else if r.body["challenge"] == "missedcall" {
                    calls += 1;
                } else {
                    texts += 1;
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
                if r.body["challenge"] == "missedcall" {
                    legit_calls += 1;
                }
                u.verification = Some(r.body["id"].as_str().unwrap().to_owned());
                u.account = Some(r.body["account"].as_str().unwrap().to_owned());
                if u.completes {
                    let (next, delay) = if u.resends {
                        // A little after the resend button comes up.
                        let resend_at = chrono::DateTime::parse_from_rfc3339(
                            r.body["next_resend_at"].as_str().unwrap(),
                        )
                        .unwrap()
                        .timestamp();
                        let delay = rng.random_range(61..180).max(resend_at - when + 1);
                        (Step::Resend { user }, delay)
                    } else {
                        (Step::Complete { user }, rng.random_range(20..480))
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
    let stopped_share = f64::from(attacks - texts) / f64::from(attacks);
    let refused_share = refused.len() as f64 / users.len() as f64;
    eprintln!(
        "pumping simulation, {attack:?} attack (seed {SEED:#x}, {DAYS} days): {} legitimate \
         users in {} countries ({legit_messages} messages, {legit_calls} of them missed calls), \
         {} refused ({:.2}%); attacker: {attacks} requests, {texts} texts sent, {calls} missed \
         calls, {attacker_refused} refused by {attacker_reasons:?}: {:.2}% got no text",
        users.len(),
        COUNTRIES.len(),
        refused.len(),
        refused_share * 100.0,
        stopped_share * 100.0,
    );
    for u in refused.iter().take(10) {
        eprintln!("  refused: {} {:?}", &u.phone[..5], u.refused);
    }
    assert_eq!(texts + calls + attacker_refused, attacks);
    assert!(users.len() > 2000, "{} users", users.len());
    assert!(attacks > 3000, "{attacks} attacks");
    assert!(
        stopped_share >= 0.95,
        "only {:.2}% of the attacker's requests got no text",
        stopped_share * 100.0
    );
    assert!(
        refused_share <= 0.01,
        "{:.2}% of legitimate users were refused",
        refused_share * 100.0
    );
    Outcome {
        server: s,
        users: users.len(),
        refused_users: refused.len(),
        attacks,
        texts,
    }
}

/// The pumping measures on record at the end, as `(scope, measure)`.
async fn measures(s: &TestServer) -> Vec<(String, String)> {
    crate::harness::open_store(&s.db_url)
        .await
        .blocks(s.clock_now() - chrono::Duration::days(2))
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.scope, b.measure.as_str().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pumping_simulation_blocks_a_burst_on_one_prefix_and_spares_real_users() {
    let o = simulate(Attack::Burst).await;
    assert!(o.texts < o.attacks / 20 && o.refused_users * 100 <= o.users);
    // The block is on the record, for the attacked prefix only; missed calls only in the
    // attacked ranges.
    let measures = measures(&o.server).await;
    let attacked = &ATTACKED_PREFIX[1..];
    assert!(
        measures
            .iter()
            .any(|(scope, m)| scope == &format!("prefix:{attacked}") && m == "block"),
        "{measures:?}"
    );
    for (scope, m) in &measures {
        let digits = scope.split(':').nth(1).unwrap();
        assert!(attacked.starts_with(digits), "{scope} {m}");
        assert!(
            m == "call" || scope.len() == "prefix:".len() + attacked.len(),
            "{scope} {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pumping_simulation_answers_a_slow_wide_attack_with_missed_calls_and_spares_real_users() {
    let o = simulate(Attack::Wide).await;
    assert!(o.texts < o.attacks / 20 && o.refused_users * 100 <= o.users);
    // The attacked countries get missed calls (their own users complete them); nothing is
    // blocked, and no other country is touched.
    let measures = measures(&o.server).await;
    for code in ["44", "234"] {
        assert!(
            measures.contains(&(format!("country:{code}"), "call".to_owned())),
            "{measures:?}"
        );
    }
    for (scope, m) in &measures {
        let digits = scope.split(':').nth(1).unwrap();
        assert!(
            (digits.starts_with("44") || digits.starts_with("234")) && m == "call",
            "{scope} {m}"
        );
    }
}
