//! Guess budgets and lockouts (issue 13, items 2 and 3), on the real service with default
//! settings, over HTTP and the Prosody relay, with a manual clock.
//!
//! The simulation plays an attacker who cannot read the victim's text messages but has as many
//! client addresses as it likes, for `GUESS_BUDGET_HOURS` (default 24) simulated hours at the
//! highest rate the service lets it: every 30 seconds it asks for a new verification of the
//! number, and for each one it gets it spends every try it is allowed, as the holder over HTTP
//! and as anyone else over the relay, from a new address each time. What it achieved, the guesses
//! the service compared, is extrapolated to a year (the README's takeover figures).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sequoia_openpgp::parse::Parse as _;
use serde_json::json;

use crate::abuse::post_from;
use crate::harness::*;
use crate::xmpp_relay::{Client, bridge, relay, step1, step2};

/// How often the attacker asks.
const STEP: Duration = Duration::from_secs(30);

fn hours() -> u64 {
    std::env::var("GUESS_BUDGET_HOURS")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(24)
}

/// Defaults, with the loopback proxy and relay trusted (as behind a reverse proxy, and Prosody
/// on the same host).
async fn server(tweak: impl FnOnce(&mut kontalk_registrar::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.login.relay_allowed_ips = vec!["127.0.0.0/8".parse().unwrap()];
        tweak(c);
    })
    .await
}

/// A new address per request, each in its own IPv6 /64 (limits count per /64).
#[derive(Default)]
struct Addresses(u32);

impl Addresses {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("2001:db8:{:x}:{:x}::1", self.0 >> 16, self.0 & 0xffff)
    }
}

/// Kontalk's account of `phone`: the SHA-1 of the E.164 number.
fn jid_of(phone: &str) -> String {
    use sha1::Digest as _;
    format!("{}@localhost", hex::encode(sha1::Sha1::digest(phone)))
}

/// What the attacker achieved.
#[derive(Debug, Default)]
struct Attack {
    starts: u64,
    /// Wrong guesses the service compared, by code length: (length, holder's, others').
    guesses: Vec<(u32, u64, u64)>,
    won: bool,
    /// Refused starts, by limit.
    refusals: std::collections::BTreeMap<String, u64>,
}

impl Attack {
    fn count(&mut self, length: u32, holder: bool) {
        let i = match self.guesses.iter().position(|g| g.0 == length) {
            Some(i) => i,
            None => {
                self.guesses.push((length, 0, 0));
                self.guesses.len() - 1
            }
        };
        if holder {
            self.guesses[i].1 += 1;
        } else {
            self.guesses[i].2 += 1;
        }
    }

    fn total(&self) -> u64 {
        self.guesses.iter().map(|g| g.1 + g.2).sum()
    }

    /// The chance that one of these guesses was right, scaled from `hours` to a year.
    fn chance_per_year(&self, hours: u64) -> f64 {
        let p: f64 = self
            .guesses
            .iter()
            .map(|&(len, h, o)| (h + o) as f64 / 10f64.powi(len as i32))
            .sum();
        p * (365.0 * 24.0) / hours as f64
    }
}

/// A wrong guess of `length` digits: the attacker's guess, moved off the real code (the test
/// reads it; the attacker cannot), so that a success can only be the service's fault.
fn guess(rng: &mut StdRng, length: u32, real: &str) -> String {
    loop {
        let g: String = (0..length)
            .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
            .collect();
        if g != real {
            return g;
        }
    }
}

/// `hours` of the attack on `phone` (forced re-registrations with `force`).
async fn attack(s: &TestServer, phone: &str, force: bool, hours: u64, seed: u64) -> Attack {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut addresses = Addresses::default();
    let jid = jid_of(phone);
    // Anyone can make a key naming the account, and its bridge certificate.
    let key = user_key(&jid);
    let public_key = b64(&public(&key));
    let certificate = bridge(&key, &jid);
    let mut a = Attack::default();
    for _ in 0..hours * 3600 / STEP.as_secs() {
        s.clock.advance(STEP);
        let started = post_from(
            s,
            "/v1/verifications",
            &addresses.next(),
            json!({"phone": phone, "force": force}),
        )
        .await;
        if started.status != 201 {
            assert_eq!(started.status, 429, "{:?}", started.body);
            let why = match started.body["limit"].as_str() {
                Some(limit) => limit.to_owned(),
                None => started.problem_type().to_owned(),
            };
            *a.refusals.entry(why).or_default() += 1;
            continue;
        }
        a.starts += 1;
        let id = started.body["id"].as_str().unwrap().to_owned();
        let length = started.body["code_length"].as_u64().unwrap() as u32;
        let real = s.code_for(phone);
        assert_eq!(real.len() as u32, length);
        // The holder's tries, over HTTP.
        loop {
            let r = post_from(
                s,
                &format!("/v1/verifications/{id}/code"),
                &addresses.next(),
                json!({"code": guess(&mut rng, length, &real), "public_key": public_key}),
            )
            .await;
            match r.status {
                422 => a.count(length, true),
                429 => break,
                200 => {
                    a.won = true;
                    break;
                }
                other => panic!("{other}: {:?}", r.body),
            }
        }
        // Everyone else's, over the relay, each from a new address.
        loop {
            let client = Client::at(&addresses.next()).with_certificate(certificate.clone());
            let answer = relay(s, &client, &step2(&guess(&mut rng, length, &real))).await;
            if answer.kind() == "result" {
                a.won = true;
                break;
            }
            if answer.text().starts_with("wrong code") {
                a.count(length, false);
            } else {
                assert_eq!(answer.error(), "wait/service-unavailable", "{}", answer.xml);
                break;
            }
        }
    }
    a
}

/// The worst case: the number's prefix has enough legitimate traffic that the pumping block never
/// comes (with it on, a day of this attack is cut off after 20 messages).
fn without_pumping_block(c: &mut kontalk_registrar::config::Config) {
    c.settings.abuse.pumping.enabled = false;
}

#[tokio::test]
async fn a_stranger_cannot_take_over_a_registered_number() {
    let s = server(without_pumping_block).await;
    let (victim, reply) = s.register(EMULATOR, false).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let hours = hours();
    let a = attack(&s, EMULATOR, true, hours, 1).await;
    let p = a.chance_per_year(hours);
    eprintln!(
        "guess budget, registered number: {hours} h, {} starts, guesses {:?} (length, holder, \
         others), {} in all; chance of a takeover in a year {p:.2e}; refused starts {:?}",
        a.starts,
        a.guesses,
        a.total(),
        a.refusals
    );
    assert!(!a.won, "a wrong code was accepted: {a:?}");
    // Forced re-registrations get 10-digit codes only.
    assert!(a.guesses.iter().all(|g| g.0 == 10), "{a:?}");
    // A burst of four starts, then one per 15 minutes; three tries each for holder and others.
    assert!(
        a.starts >= hours * 3,
        "the attacker could barely start: {a:?}"
    );
    assert!(a.starts <= 4 + hours * 4, "{a:?}");
    assert!(a.total() <= a.starts * 6, "{a:?}");
    assert!(p < 1e-4, "takeover chance per year {p:e}");
    // The victim's certified key still logs in.
    let public_key = unb64(reply.body["public_key"].as_str().unwrap());
    let certified = victim
        .merge_public(sequoia_openpgp::Cert::from_bytes(&public_key).unwrap())
        .unwrap();
    // (As the XMPP server on this host asks: named in X-Forwarded-For to the trusted proxy.)
    let login = Reply::from(
        s.http
            .post(s.url("/v1/login-certificates/verify"))
            .header("x-forwarded-for", "127.0.0.2")
            .body(bridge(&certified, &jid_of(EMULATOR)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    assert_eq!(login.body["fingerprint"], certified.fingerprint().to_hex());
}

#[tokio::test]
async fn guessing_an_unregistered_number_gets_long_codes_after_two_a_day() {
    let s = server(without_pumping_block).await;
    let phone = "+393471299001";
    let hours = hours();
    let a = attack(&s, phone, false, hours, 2).await;
    let p = a.chance_per_year(hours);
    eprintln!(
        "guess budget, unregistered number: {hours} h, {} starts, guesses {:?} (length, holder, \
         others), {} in all; chance of registering it in a year {p:.2e}; refused starts {:?}",
        a.starts,
        a.guesses,
        a.total(),
        a.refusals
    );
    assert!(!a.won, "a wrong code was accepted: {a:?}");
    // Two short codes, then one every twelve hours; each takes five tries from the holder and
    // ten from the others (whose tries also count against the number's 15 a day).
    let short = a
        .guesses
        .iter()
        .find(|g| g.0 == 6)
        .copied()
        .unwrap_or_default();
    let short_starts = 2 + hours / 12;
    assert!(short.1 <= short_starts * 5, "{a:?}");
    assert!(short.1 + short.2 <= short_starts * 15, "{a:?}");
    assert!(short.1 + short.2 > 0, "{a:?}");
    assert!(a.guesses.iter().any(|g| g.0 == 10), "no long codes: {a:?}");
    assert!(p < 0.02, "chance per year {p:e}");
}

#[tokio::test]
async fn a_forced_start_for_a_number_without_an_account_is_a_plain_one() {
    let s = server(|_| {}).await;
    let phone = "+393471299002";
    // Nothing to replace: a short code, as for any new number; it registers the number.
    let r = s.start_verification(phone, true).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["code_length"], 6);
    let done = s
        .submit(
            r.body["id"].as_str().unwrap(),
            &s.code_for(phone),
            &public(&user_key(&jid_of(phone))),
        )
        .await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    // Now there is an account: a forced start gets the long code.
    s.clock.advance(Duration::from_secs(3600));
    let r = s.start_verification(phone, true).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["code_length"], 10);
    assert_eq!(s.code_for(phone).len(), 10);
}

#[tokio::test]
async fn strangers_guesses_do_not_lock_out_the_holder() {
    // The number's budget for the others' tries: three a day here.
    let s = server(|c| c.settings.abuse.check.number = Some("3/1d".parse().unwrap())).await;
    let mut addresses = Addresses::default();
    let mut rng = StdRng::seed_from_u64(3);

    // The owner starts over HTTP; strangers guess over the relay with certificates of their
    // own keys naming the account, until the number's budget for them is spent.
    let phone = "+393471299002";
    let jid = jid_of(phone);
    let started = post_from(
        &s,
        "/v1/verifications",
        "192.0.2.10",
        json!({"phone": phone}),
    )
    .await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    let code = s.code_for(phone);
    let stranger = bridge(&user_key(&jid), &jid);
    for _ in 0..3 {
        let client = Client::at(&addresses.next()).with_certificate(stranger.clone());
        let a = relay(&s, &client, &step2(&guess(&mut rng, 6, &code))).await;
        assert!(a.text().starts_with("wrong code"), "{}", a.xml);
    }
    let client = Client::at(&addresses.next()).with_certificate(stranger.clone());
    let a = relay(&s, &client, &step2(&code)).await;
    assert_eq!(a.error(), "wait/service-unavailable", "{}", a.xml);
    // The owner's right code still works, and so would its wrong ones: none of its five tries
    // went to the strangers.
    let owner = user_key(&jid);
    let path = format!("/v1/verifications/{id}/code");
    let body = |c: &str| json!({"code": c, "public_key": b64(&public(&owner))});
    let r = post_from(&s, &path, "192.0.2.10", body(&guess(&mut rng, 6, &code))).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["attempts_left"], 4);
    let r = post_from(&s, &path, "192.0.2.10", body(&code)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // The owner starts over the relay (Kontalk before login); strangers use up the others' five
    // tries; the owner, asking again from its address, registers.
    let phone = "+393471299003";
    let jid = jid_of(phone);
    let started = relay(&s, &Client::at("192.0.2.20"), &step1(phone, false)).await;
    assert_eq!(started.kind(), "result", "{}", started.xml);
    let code = s.code_for(phone);
    let stranger = bridge(&user_key(&jid), &jid);
    let mut wrong = 0;
    for _ in 0..8 {
        let client = Client::at(&addresses.next()).with_certificate(stranger.clone());
        let a = relay(&s, &client, &step2(&guess(&mut rng, 6, &code))).await;
        if a.text().starts_with("wrong code") {
            wrong += 1;
        } else {
            assert_eq!(a.error(), "wait/service-unavailable", "{}", a.xml);
        }
    }
    assert_eq!(
        wrong, 3,
        "the number's budget (3 a day here) caps the strangers first"
    );
    let owner = Client::at("192.0.2.20").with_certificate(bridge(&user_key(&jid), &jid));
    let done = relay(&s, &owner, &step2(&code)).await;
    assert_eq!(done.kind(), "result", "{}", done.xml);
}

#[tokio::test]
async fn a_strangers_start_keeps_the_owner_waiting_a_quarter_hour_at_most() {
    let s = server(|_| {}).await;
    let (_old, reply) = s.register(EMULATOR, false).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let mut addresses = Addresses::default();
    let mut rng = StdRng::seed_from_u64(4);
    let stranger_key = b64(&public(&user_key(&jid_of(EMULATOR))));
    let owner_key = user_key(&jid_of(EMULATOR));
    let step = Duration::from_secs(60);
    let mut stranger_starts = 0u32;
    let mut owner_waits = vec![];
    let mut owner_pending: Option<(String, u32)> = None;
    let mut registered = None;
    // An hour of a stranger starting forced re-registrations whenever it may (each pays for a
    // message) and spending its tries, then it stops. The owner wants a new device meanwhile,
    // starts whenever it may, and types the code it received two minutes later.
    let mut blocked_minutes = 0u32;
    for minute in 0..180u32 {
        s.clock.advance(step);
        let r = if minute < 60 {
            post_from(
                &s,
                "/v1/verifications",
                &addresses.next(),
                json!({"phone": EMULATOR, "force": true}),
            )
            .await
        } else {
            Reply {
                status: 0,
                headers: Default::default(),
                body: json!(null),
            }
        };
        if r.status == 201 {
            stranger_starts += 1;
            let id = r.body["id"].as_str().unwrap().to_owned();
            let real = s.code_for(EMULATOR);
            for _ in 0..3 {
                let r = post_from(
                    &s,
                    &format!("/v1/verifications/{id}/code"),
                    &addresses.next(),
                    json!({"code": guess(&mut rng, 10, &real), "public_key": stranger_key}),
                )
                .await;
                assert_eq!(r.status, 422, "{:?}", r.body);
            }
        }
        match owner_pending.take() {
            Some((id, since)) if minute >= since + 2 => {
                let r = post_from(
                    &s,
                    &format!("/v1/verifications/{id}/code"),
                    "198.51.100.7",
                    json!({"code": s.code_for(EMULATOR), "public_key": b64(&public(&owner_key))}),
                )
                .await;
                if r.status == 200 {
                    registered = Some(minute);
                    break;
                }
                // The stranger's start replaced the owner's verification: start again.
                assert_eq!(r.status, 404, "{:?}", r.body);
            }
            Some(pending) => {
                owner_pending = Some(pending);
                continue;
            }
            None => {}
        }
        let r = post_from(
            &s,
            "/v1/verifications",
            "198.51.100.7",
            json!({"phone": EMULATOR, "force": true}),
        )
        .await;
        if r.status == 201 {
            owner_pending = Some((r.body["id"].as_str().unwrap().to_owned(), minute));
        } else {
            assert_eq!(r.status, 429, "{:?}", r.body);
            owner_waits.push(r.retry_after().unwrap());
            blocked_minutes += 1;
        }
    }
    eprintln!(
        "lockout: {stranger_starts} stranger starts in an hour kept the owner from starting for \
         {blocked_minutes} min; it registered at minute {registered:?}; waits told {owner_waits:?} s"
    );
    assert!(stranger_starts >= 4, "{stranger_starts}");
    assert!(
        owner_waits.iter().all(|&w| w <= 15 * 60),
        "waits over 15 minutes: {owner_waits:?}"
    );
    assert!(
        blocked_minutes <= 15 * stranger_starts,
        "{blocked_minutes} min blocked by {stranger_starts} starts"
    );
    let registered = registered.expect("the owner never registered");
    assert!(
        registered <= 60 + 15 + 2,
        "registered at minute {registered}"
    );
}
