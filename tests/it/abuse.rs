//! Abuse resistance through the HTTP API: every limit, wait, lockout, idempotent repeat, list,
//! the pumping block, daily caps, test numbers and failing closed. Time is the manual clock; no
//! test sleeps. Client addresses come from `X-Forwarded-For` through a trusted proxy (the
//! loopback peer), as behind a real reverse proxy.

use std::sync::Arc;
use std::time::Duration;

use kontalk_registrar::clock::ManualClock;
use kontalk_registrar::config::Config;
use kontalk_registrar::registrar::Challenge;
use kontalk_registrar::registrar::abuse::{Limits, Rate};
use registrar_providers::{CapturingProvider, Provider};
use serde_json::{Value, json};

use crate::harness::{Reply, TestServer, public, user_key};

/// A server with every limit off, except what `tweak` turns on; clients are named by
/// `X-Forwarded-For` from the loopback proxy.
async fn server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        limits_off(c);
        c.settings.abuse.pumping.enabled = false;
        tweak(c);
    })
    .await
}

/// Every rate limit, cap and repeat window off; clients named by `X-Forwarded-For` from the
/// loopback proxy.
fn limits_off(c: &mut Config) {
    let a = &mut c.settings.abuse;
    a.start = Limits::default();
    a.resend = Limits::default();
    a.check = Limits::default();
    a.caps.total = None;
    a.caps.per_country = None;
    a.repeat_window = Duration::ZERO;
    c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
}

fn rate(s: &str) -> Option<Rate> {
    Some(s.parse().unwrap())
}

pub(crate) async fn post_from(s: &TestServer, path: &str, ip: &str, body: Value) -> Reply {
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

async fn start_from(s: &TestServer, phone: &str, ip: &str) -> Reply {
    post_from(s, "/v1/verifications", ip, json!({"phone": phone})).await
}

fn id(r: &Reply) -> String {
    r.body["id"].as_str().unwrap().to_owned()
}

/// A 429 of `limit` whose `Retry-After` and `retry_at` agree with `wait` from now.
fn assert_limited(r: &Reply, limit: &str, wait: Duration) {
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.problem_type(), "rate-limited", "{:?}", r.body);
    assert_eq!(r.body["limit"], limit, "{:?}", r.body);
    let after = r.retry_after().unwrap();
    assert!(
        after.abs_diff(wait.as_secs()) <= 1,
        "Retry-After {after}, expected {wait:?}"
    );
    assert!(r.body["retry_at"].is_string());
}

fn it_number(i: u32) -> String {
    format!("+3934712{i:05}")
}

#[tokio::test]
async fn starts_are_limited_per_ip_and_ipv6_counts_per_network() {
    let s = server(|c| c.settings.abuse.start.ip = rate("3/1h")).await;
    for i in 0..3 {
        assert_eq!(
            start_from(&s, &it_number(i), "203.0.113.9").await.status,
            201
        );
    }
    let r = start_from(&s, &it_number(3), "203.0.113.9").await;
    assert_limited(&r, "ip", Duration::from_secs(1200));
    assert_eq!(s.provider.sent().len(), 3, "nothing sent when refused");
    // Another address has its own budget.
    assert_eq!(
        start_from(&s, &it_number(4), "198.51.100.1").await.status,
        201
    );
    // One IPv6 /64 is one client.
    for i in 0..3 {
        let ip = format!("2001:db8:5:6::{i:x}");
        assert_eq!(start_from(&s, &it_number(10 + i), &ip).await.status, 201);
    }
    let r = start_from(&s, &it_number(20), "2001:db8:5:6:ffff::1").await;
    assert_limited(&r, "ip", Duration::from_secs(1200));
    assert_eq!(
        start_from(&s, &it_number(21), "2001:db8:5:7::1")
            .await
            .status,
        201
    );
    // The bucket refills: one interval later, one more.
    s.clock.advance(Duration::from_secs(1200));
    assert_eq!(
        start_from(&s, &it_number(5), "203.0.113.9").await.status,
        201
    );
    assert_eq!(
        start_from(&s, &it_number(6), "203.0.113.9").await.status,
        429
    );
}

#[tokio::test]
async fn trusted_ips_skip_ip_throttling_and_untrusted_peers_cannot_forge_their_address() {
    let s = server(|c| {
        c.settings.abuse.start.ip = rate("1/1h");
        c.settings.abuse.lists.trusted_ips = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    for i in 0..5 {
        assert_eq!(start_from(&s, &it_number(i), "10.1.2.3").await.status, 201);
    }
    assert_eq!(start_from(&s, &it_number(9), "192.0.2.1").await.status, 201);
    assert_eq!(
        start_from(&s, &it_number(10), "192.0.2.1").await.status,
        429
    );

    // The per-client key budget of code submissions spares trusted backends too.
    let s = server(|c| {
        c.settings.key_checks_per_client = rate("1/1h");
        c.settings.abuse.lists.trusted_ips = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    for (n, ip, second) in [(20, "10.1.2.3", 422), (30, "192.0.2.1", 429)] {
        let mut answers = Vec::new();
        for i in 0..2 {
            let started = start_from(&s, &it_number(n + i), ip).await;
            assert_eq!(started.status, 201, "{:?}", started.body);
            let r = post_from(
                &s,
                &format!("/v1/verifications/{}/code", id(&started)),
                ip,
                json!({"code": "000000", "public_key": "AAAA"}),
            )
            .await;
            answers.push(r.status);
        }
        assert_eq!(answers, [422, second], "{ip}");
    }

    // Without a trusted proxy, X-Forwarded-For is ignored: the peer is the client.
    let direct = server(|c| {
        c.settings.abuse.start.ip = rate("1/1h");
        c.trusted_proxies.clear();
    })
    .await;
    assert_eq!(
        start_from(&direct, &it_number(0), "192.0.2.1").await.status,
        201
    );
    let r = start_from(&direct, &it_number(1), "192.0.2.2").await;
    assert_limited(&r, "ip", Duration::from_secs(3600));
}

#[tokio::test]
async fn conflicts_count_against_the_number_limit() {
    let s = server(|c| c.settings.abuse.start.number = rate("3/1d")).await;
    let phone = it_number(1);
    let (_, done) = s.register(&phone, false).await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    // One start so far; two conflicts, then the limit: probing whether a number is registered
    // costs like asking for a message.
    for _ in 0..2 {
        assert_eq!(start_from(&s, &phone, "192.0.2.1").await.status, 409);
    }
    let r = start_from(&s, &phone, "192.0.2.2").await;
    assert_limited(&r, "number", Duration::from_secs(28_800));
}

#[tokio::test]
async fn prefix_country_and_global_limits() {
    let s = server(|c| c.settings.abuse.start.prefix = rate("2/1h")).await;
    for i in 0..2 {
        assert_eq!(
            start_from(&s, &it_number(i), &format!("192.0.2.{i}"))
                .await
                .status,
            201
        );
    }
    let r = start_from(&s, &it_number(2), "192.0.2.9").await;
    assert_limited(&r, "prefix", Duration::from_secs(1800));
    // Another prefix of the same country is not affected.
    assert_eq!(
        start_from(&s, "+393201234567", "192.0.2.9").await.status,
        201
    );

    let s = server(|c| c.settings.abuse.start.country = rate("2/1h")).await;
    assert_eq!(
        start_from(&s, "+393471234567", "192.0.2.1").await.status,
        201
    );
    assert_eq!(
        start_from(&s, "+393201234567", "192.0.2.2").await.status,
        201
    );
    let r = start_from(&s, "+393331234567", "192.0.2.3").await;
    assert_limited(&r, "country", Duration::from_secs(1800));
    assert_eq!(
        start_from(&s, "+4915112345678", "192.0.2.3").await.status,
        201
    );

    let s = server(|c| c.settings.abuse.start.global = rate("2/1h")).await;
    assert_eq!(
        start_from(&s, "+393471234567", "192.0.2.1").await.status,
        201
    );
    assert_eq!(
        start_from(&s, "+4915112345678", "192.0.2.2").await.status,
        201
    );
    let r = start_from(&s, "+33612345678", "192.0.2.3").await;
    assert_limited(&r, "global", Duration::from_secs(1800));
}

#[tokio::test]
async fn resends_wait_longer_each_time_and_are_limited_per_number() {
    let s = server(|c| {
        c.settings.resend_wait = Duration::from_secs(60);
        c.settings.resend_wait_max = Duration::from_secs(200);
        c.settings.abuse.resend.number = rate("3/1h");
    })
    .await;
    let phone = it_number(7);
    let started = start_from(&s, &phone, "192.0.2.1").await;
    let v = id(&started);
    let resend = format!("/v1/verifications/{v}/resend");
    let t0 = s.clock_now();
    let next = |r: &Reply| {
        chrono::DateTime::parse_from_rfc3339(r.body["next_resend_at"].as_str().unwrap()).unwrap()
    };
    assert_eq!(next(&started).timestamp() - t0.timestamp(), 60);
    // Inside the wait: refused with the time it ends, nothing sent.
    s.clock.advance(Duration::from_secs(30));
    let r = post_from(&s, &resend, "192.0.2.1", json!({})).await;
    assert_limited(&r, "resend-wait", Duration::from_secs(30));
    assert_eq!(s.provider.sent().len(), 1);
    // After it: a new message with a new code, and a doubled wait (60, 120, then the cap 200).
    let mut waits = vec![];
    let mut codes = vec![s.code_for(&phone)];
    for expected in [120, 200] {
        s.clock.advance(Duration::from_secs(300));
        let r = post_from(&s, &resend, "192.0.2.1", json!({})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        waits.push(next(&r).timestamp() - s.clock_now().timestamp());
        assert_eq!(*waits.last().unwrap(), expected);
        codes.push(s.code_for(&phone));
    }
    assert_eq!(s.provider.sent().len(), 3);
    assert_ne!(codes[0], codes[1]);
    // The third resend within the hour passes its wait but not the number's resend limit.
    s.clock.advance(Duration::from_secs(200));
    let r = post_from(&s, &resend, "192.0.2.2", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    s.clock.advance(Duration::from_secs(200));
    let r = post_from(&s, &resend, "192.0.2.3", json!({})).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.body["limit"], "number");
}

#[tokio::test]
async fn brute_force_never_verifies_and_is_locked_out() {
    let s = server(|c| c.settings.abuse.check.number = rate("8/1d")).await;
    let phone = it_number(3);
    let started = start_from(&s, &phone, "192.0.2.1").await;
    let v = id(&started);
    let jid = started.body["account"].as_str().unwrap().to_owned();
    let key = public(&user_key(&jid));
    let right = s.code_for(&phone);
    let code_path = format!("/v1/verifications/{v}/code");
    // The attacker tries codes as fast as the API answers: every wrong one is refused, then the
    // verification locks after five.
    let mut statuses = vec![];
    let mut tried = 0u32;
    for guess in 0..1_000_000u32 {
        let guess = format!("{guess:06}");
        if guess == right {
            continue;
        }
        let r = post_from(
            &s,
            &code_path,
            "192.0.2.66",
            json!({"code": guess, "public_key": crate::harness::b64(&key)}),
        )
        .await;
        statuses.push(r.status);
        tried += 1;
        if r.status == 429 {
            assert_eq!(r.problem_type(), "locked", "{:?}", r.body);
            assert!(r.retry_after().is_some());
            break;
        }
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert_eq!(r.body["attempts_left"], 5 - tried);
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 422).count(), 5);
    // Locked: even the right code is refused.
    let r = post_from(
        &s,
        &code_path,
        "192.0.2.1",
        json!({"code": right, "public_key": crate::harness::b64(&key)}),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.problem_type(), "locked");
    assert_eq!(
        s.get(&format!("/v1/verifications/{v}")).await.body["status"],
        "locked"
    );
    // A new verification for the number after this one expires has its own five tries: the
    // holder's tries are not counted in the number's check budget (8 a day here, which only the
    // others' tries over XMPP spend), so that a stranger's guesses cannot use it up. The guesses
    // per number stay bounded by the start limits (see the guess-budget simulation).
    s.clock.advance(Duration::from_secs(601));
    let again = start_from(&s, &phone, "192.0.2.1").await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    let v2 = id(&again);
    let code2 = s.code_for(&phone);
    let path2 = format!("/v1/verifications/{v2}/code");
    let wrong: Vec<String> = (0..10u32)
        .map(|g| format!("{g:06}"))
        .filter(|g| *g != code2)
        .take(4)
        .collect();
    for guess in &wrong {
        let r = post_from(
            &s,
            &path2,
            "192.0.2.66",
            json!({"code": guess, "public_key": crate::harness::b64(&key)}),
        )
        .await;
        assert_eq!(r.status, 422, "{:?}", r.body);
    }
    let r = post_from(
        &s,
        &path2,
        "192.0.2.1",
        json!({"code": code2, "public_key": crate::harness::b64(&key)}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_verification() {
    let s = server(|_| {}).await;
    let send = |key: &'static str, phone: String| {
        let s = &s;
        async move {
            Reply::from(
                s.http
                    .post(s.url("/v1/verifications"))
                    .header("idempotency-key", key)
                    .json(&json!({"phone": phone}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let first = send("5f1c-aa", it_number(1)).await;
    assert_eq!(first.status, 201);
    let again = send("5f1c-aa", it_number(1)).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(id(&again), id(&first));
    assert_eq!(s.provider.sent().len(), 1, "no second message");
    let misuse = send("5f1c-aa", it_number(2)).await;
    assert_eq!(misuse.status, 422);
    assert_eq!(misuse.problem_type(), "idempotency-key-reused");
    // Another key for the same number is a new request, inside the resend wait.
    let other = send("77-bb", it_number(1)).await;
    assert_limited(&other, "resend-wait", Duration::from_secs(60));
}

#[tokio::test]
async fn a_repeated_start_from_the_same_client_returns_the_verification() {
    let s = server(|c| c.settings.abuse.repeat_window = Duration::from_secs(30)).await;
    let first = start_from(&s, &it_number(1), "192.0.2.7").await;
    s.clock.advance(Duration::from_secs(10));
    let again = start_from(&s, &it_number(1), "192.0.2.7").await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(id(&again), id(&first));
    assert_eq!(s.provider.sent().len(), 1);
    // Another client, or the same after the window, is inside the resend wait.
    let stranger = start_from(&s, &it_number(1), "192.0.2.8").await;
    assert_limited(&stranger, "resend-wait", Duration::from_secs(50));
    s.clock.advance(Duration::from_secs(25));
    let late = start_from(&s, &it_number(1), "192.0.2.7").await;
    assert_limited(&late, "resend-wait", Duration::from_secs(25));
}

#[tokio::test]
async fn allow_and_deny_lists() {
    let s = server(|c| {
        let l = &mut c.settings.abuse.lists;
        l.deny_countries = vec!["33".into()];
        l.deny_prefixes = vec!["3932".into()];
        l.deny_ips = vec!["192.0.2.0/24".parse().unwrap()];
    })
    .await;
    let r = start_from(&s, "+33612345678", "198.51.100.1").await;
    assert_eq!((r.status, r.problem_type()), (403, "country-not-served"));
    let r = start_from(&s, "+393201234567", "198.51.100.1").await;
    assert_eq!((r.status, r.problem_type()), (403, "prefix-not-served"));
    let r = start_from(&s, "+393471234567", "192.0.2.200").await;
    assert_eq!((r.status, r.problem_type()), (403, "address-blocked"));
    assert_eq!(
        start_from(&s, "+393471234567", "198.51.100.1").await.status,
        201
    );
    assert!(s.provider.sent().len() == 1);

    let s = server(|c| {
        let l = &mut c.settings.abuse.lists;
        l.allow_countries = vec!["39".into(), "49".into()];
        l.allow_prefixes = vec!["39347".into(), "49".into()];
    })
    .await;
    assert_eq!(
        start_from(&s, "+393471234567", "198.51.100.1").await.status,
        201
    );
    assert_eq!(
        start_from(&s, "+4915112345678", "198.51.100.1")
            .await
            .status,
        201
    );
    let r = start_from(&s, "+393201234567", "198.51.100.1").await;
    assert_eq!(r.problem_type(), "prefix-not-served");
    let r = start_from(&s, "+447911123456", "198.51.100.1").await;
    assert_eq!(r.problem_type(), "country-not-served");
}

/// A server whose pumping defence judges from `min_numbers` numbers, with the given
/// providers (the capturing one when `providers` is `None`).
async fn pumping_server(min_numbers: u32, providers: Option<Vec<Arc<dyn Provider>>>) -> TestServer {
    let tweak = move |c: &mut Config| {
        limits_off(c);
        let p = &mut c.settings.abuse.pumping;
        p.enabled = true;
        p.min_numbers = min_numbers;
        p.min_completion = 0.3;
        p.block_after = Duration::from_secs(1800);
        p.block_for = Duration::from_secs(7200);
    };
    match providers {
        None => TestServer::start_with(tweak).await,
        Some(providers) => {
            let unused = CapturingProvider::new("unused", "0");
            TestServer::start_in(
                tempfile::tempdir().unwrap(),
                ManualClock::new(chrono::Utc::now()),
                providers,
                unused,
                tweak,
            )
            .await
        }
    }
}

#[tokio::test]
async fn a_prefix_whose_completion_ratio_collapses_gets_missed_calls_then_a_block() {
    let s = pumping_server(6, None).await;
    // A prefix with real users: they complete, so it stays open (and so does the country).
    for i in 0..8 {
        let phone = format!("+3932012{i:05}");
        let (_, done) = s.register(&phone, false).await;
        assert_eq!(done.status, 200);
    }
    // A prefix that receives messages nobody completes, each for another client.
    for i in 0..6 {
        let r = start_from(&s, &it_number(i), &format!("192.0.2.{i}")).await;
        assert_eq!((r.status, r.body["challenge"].as_str()), (201, Some("pin")));
    }
    // Six numbers, none completed: the next start asking for a text gets a missed call, and
    // says so; the user completes it with the caller number's hidden digits.
    let r = start_from(&s, &it_number(50), "198.51.100.50").await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["challenge"], "missedcall", "{:?}", r.body);
    let sent = s.provider.sent();
    assert_eq!(sent.last().unwrap().challenge, Challenge::MissedCall);
    let key = user_key(r.body["account"].as_str().unwrap());
    let done = s
        .submit(&id(&r), &s.code_for(&it_number(50)), &public(&key))
        .await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    // Voice calls too; the other prefix keeps its texts.
    let r = post_from(
        &s,
        "/v1/verifications",
        "198.51.100.51",
        json!({"phone": it_number(51), "challenge": "voice"}),
    )
    .await;
    assert_eq!(r.body["challenge"], "missedcall", "{:?}", r.body);
    let r = start_from(&s, "+393201288888", "198.51.100.52").await;
    assert_eq!(r.body["challenge"], "pin", "{:?}", r.body);
    // Missed calls did not help for half an hour: the prefix is blocked.
    s.clock.advance(Duration::from_secs(1800));
    let r = start_from(&s, &it_number(52), "198.51.100.53").await;
    assert_limited(&r, "prefix-blocked", Duration::from_secs(7200));
    let messages = s.provider.sent().len();
    // Still blocked an hour later, for any number of the prefix; the other prefix is served.
    s.clock.advance(Duration::from_secs(3600));
    let r = start_from(&s, &it_number(77), "198.51.100.54").await;
    assert_limited(&r, "prefix-blocked", Duration::from_secs(3600));
    assert_eq!(s.provider.sent().len(), messages);
    assert_eq!(
        start_from(&s, "+393201299999", "198.51.100.55")
            .await
            .status,
        201
    );
    // The measures are on record: missed calls for the country's broader prefixes of the
    // attacked range, the block on the prefix itself.
    let measures: Vec<(String, &str)> = crate::harness::open_store(&s.db_url)
        .await
        .blocks(s.clock_now())
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.scope, b.measure.as_str()))
        .collect();
    assert!(
        measures.contains(&("prefix:3934712".to_owned(), "block")),
        "{measures:?}"
    );
    assert!(
        measures
            .iter()
            .all(|(scope, _)| "prefix:3934712".starts_with(scope.as_str())),
        "{measures:?}"
    );
}

#[tokio::test]
async fn without_a_missed_call_provider_a_collapsed_prefix_is_blocked_at_once() {
    let texts = CapturingProvider::new("texts", "1").with_challenges(vec![Challenge::Pin]);
    let s = pumping_server(6, Some(vec![Arc::new(texts.clone())])).await;
    for i in 0..6 {
        assert_eq!(
            start_from(&s, &it_number(i), &format!("192.0.2.{i}"))
                .await
                .status,
            201
        );
    }
    let r = start_from(&s, &it_number(50), "198.51.100.50").await;
    assert_limited(&r, "prefix-blocked", Duration::from_secs(7200));
    assert_eq!(texts.sent().len(), 6);
}

#[tokio::test]
async fn waits_grow_where_few_numbers_complete_and_sources_are_weighed() {
    let s = pumping_server(4, None).await;
    // One client asking for many numbers is not distributed traffic: the per-client limits
    // are for it, and the range is not judged.
    for i in 0..6 {
        let r = start_from(&s, &it_number(i), "192.0.2.1").await;
        assert_eq!(r.status, 201);
        assert_eq!(r.body["challenge"], "pin");
        let wait = (|| {
            let at = |k: &str| {
                chrono::DateTime::parse_from_rfc3339(r.body[k].as_str()?)
                    .ok()
                    .map(|t| t.timestamp())
            };
            Some(at("next_resend_at")? - s.clock_now().timestamp())
        })();
        assert_eq!(wait, Some(60), "{:?}", r.body);
    }
    // Four clients, two of the five numbers completed (below a half, above 0.3): waits are
    // four times longer, and texts still go out.
    let s = pumping_server(4, None).await;
    for i in 0..2 {
        let (_, done) = s.register(&it_number(i), false).await;
        assert_eq!(done.status, 200);
    }
    for i in 2..5 {
        let r = start_from(&s, &it_number(i), &format!("192.0.2.{i}")).await;
        assert_eq!(r.status, 201);
    }
    let r = start_from(&s, &it_number(9), "198.51.100.9").await;
    assert_eq!(r.body["challenge"], "pin", "{:?}", r.body);
    let resend_at =
        chrono::DateTime::parse_from_rfc3339(r.body["next_resend_at"].as_str().unwrap())
            .unwrap()
            .timestamp();
    assert_eq!(resend_at - s.clock_now().timestamp(), 240, "{:?}", r.body);
    let early = post_from(
        &s,
        &format!("/v1/verifications/{}/resend", id(&r)),
        "198.51.100.9",
        json!({}),
    )
    .await;
    assert_limited(&early, "resend-wait", Duration::from_secs(240));
}

#[tokio::test]
async fn daily_caps_per_country_and_in_total() {
    let s = server(|c| {
        c.settings.abuse.caps.per_country = Some(2);
        c.settings.abuse.caps.countries = [("49".to_owned(), 3)].into();
        c.settings.abuse.caps.total = Some(6);
    })
    .await;
    let midnight = |now: chrono::DateTime<chrono::Utc>| {
        let next = (now.timestamp().div_euclid(86_400) + 1) * 86_400;
        Duration::from_secs((next - now.timestamp()) as u64)
    };
    assert_eq!(
        start_from(&s, "+393471234567", "192.0.2.1").await.status,
        201
    );
    assert_eq!(
        start_from(&s, "+393201234567", "192.0.2.1").await.status,
        201
    );
    let r = start_from(&s, "+393331234567", "192.0.2.1").await;
    assert_limited(&r, "country-daily-cap", midnight(s.clock_now()));
    for n in ["+4915112345678", "+4915212345678", "+4916012345678"] {
        assert_eq!(start_from(&s, n, "192.0.2.1").await.status, 201);
    }
    assert_eq!(
        start_from(&s, "+4917012345678", "192.0.2.1").await.body["limit"],
        "country-daily-cap"
    );
    assert_eq!(
        start_from(&s, "+33612345678", "192.0.2.1").await.status,
        201
    );
    let r = start_from(&s, "+34612345678", "192.0.2.1").await;
    assert_limited(&r, "daily-cap", midnight(s.clock_now()));
    assert_eq!(s.provider.sent().len(), 6);
    // A new day.
    s.clock.advance(midnight(s.clock_now()));
    assert_eq!(
        start_from(&s, "+393331234567", "192.0.2.1").await.status,
        201
    );
}

#[tokio::test]
async fn test_numbers_use_their_fixed_code_and_never_reach_a_provider() {
    let s = server(|c| {
        c.settings.phone_policy.accept_fictional = false;
        c.settings
            .abuse
            .test_numbers
            .insert("+15555550100".into(), "246810".into());
    })
    .await;
    let started = start_from(&s, "+1 555 555 0100", "192.0.2.1").await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    assert!(s.provider.sent().is_empty(), "nothing sent");
    let jid = started.body["account"].as_str().unwrap().to_owned();
    let key = public(&user_key(&jid));
    let r = post_from(
        &s,
        &format!("/v1/verifications/{}/code", id(&started)),
        "192.0.2.1",
        json!({"code": "246810", "public_key": crate::harness::b64(&key)}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // A fictional number that is not listed is refused where fictional numbers are.
    let r = start_from(&s, "+15555550101", "192.0.2.1").await;
    assert_eq!((r.status, r.problem_type()), (422, "invalid-phone"));
}

#[tokio::test]
async fn the_service_fails_closed_when_it_cannot_count() {
    for fail_open in [false, true] {
        let s = server(|c| {
            c.settings.abuse.start.ip = rate("10/1h");
            c.settings.abuse.fail_open = fail_open;
        })
        .await;
        assert_eq!(start_from(&s, &it_number(1), "192.0.2.1").await.status, 201);
        crate::harness::execute(&s.db_url, "DROP TABLE rate_limits").await;
        let r = start_from(&s, &it_number(2), "192.0.2.1").await;
        if fail_open {
            assert_eq!(r.status, 201, "{:?}", r.body);
        } else {
            assert_eq!(r.status, 503, "{:?}", r.body);
            assert_eq!(r.problem_type(), "limits-unavailable");
            assert_eq!(r.retry_after(), Some(30));
            assert_eq!(s.provider.sent().len(), 1);
        }
    }
}

#[tokio::test]
async fn a_verification_tells_when_a_call_can_replace_the_message() {
    let s = server(|c| {
        c.settings.resend_wait = Duration::from_secs(120);
        c.settings.call_wait = Duration::from_secs(45);
    })
    .await;
    let r = start_from(&s, &it_number(1), "192.0.2.1").await;
    let t0 = s.clock_now();
    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(r.body[k].as_str().unwrap()).unwrap();
    assert_eq!(at("next_resend_at").timestamp() - t0.timestamp(), 120);
    assert_eq!(at("next_call_at").timestamp() - t0.timestamp(), 45);
    let resend = format!("/v1/verifications/{}/resend", id(&r));
    s.clock.advance(Duration::from_secs(44));
    let early = post_from(&s, &resend, "192.0.2.1", json!({"challenge": "voice"})).await;
    assert_limited(&early, "resend-wait", Duration::from_secs(1));
    s.clock.advance(Duration::from_secs(1));
    let call = post_from(&s, &resend, "192.0.2.1", json!({"challenge": "voice"})).await;
    assert_eq!(call.status, 200, "{:?}", call.body);
    assert_eq!(call.body["challenge"], "voice");
    // Another text message still waits for the resend time.
    let text = post_from(&s, &resend, "192.0.2.1", json!({"challenge": "pin"})).await;
    assert_eq!(text.body["limit"], "resend-wait");
}

/// A request from the loopback proxy with `headers`.
async fn via_proxy(s: &TestServer, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    let mut r = s.http.post(s.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    Reply::from(r.json(&body).send().await.unwrap()).await
}

#[tokio::test]
async fn clients_behind_proxies_are_found_from_the_right_and_proxies_are_never_allowed() {
    // Ports and brackets go; entries a client wrote itself, left of what the proxy appended,
    // do not count.
    let s = server(|c| c.settings.abuse.start.ip = rate("1/1h")).await;
    let start = |headers: &'static [(&'static str, &'static str)], n: u32| {
        let s = &s;
        async move {
            via_proxy(
                s,
                "/v1/verifications",
                headers,
                json!({"phone": it_number(n)}),
            )
            .await
        }
    };
    assert_eq!(
        start(&[("x-forwarded-for", "192.0.2.7:1111")], 0)
            .await
            .status,
        201
    );
    let r = start(&[("x-forwarded-for", "198.51.100.1, 192.0.2.7:2222")], 1).await;
    assert_limited(&r, "ip", Duration::from_secs(3600));
    assert_eq!(
        start(&[("x-forwarded-for", "[2001:db8::1]:4711")], 2)
            .await
            .status,
        201
    );
    let r = start(&[("x-forwarded-for", "2001:db8::1")], 3).await;
    assert_limited(&r, "ip", Duration::from_secs(3600));
    // An entry that names no address stops the walk: the proxy stands in (and is limited).
    assert_eq!(
        start(&[("x-forwarded-for", "192.0.2.8, unknown")], 4)
            .await
            .status,
        201
    );
    let r = start(&[("x-forwarded-for", "192.0.2.9, garbage")], 5).await;
    assert_limited(&r, "ip", Duration::from_secs(3600));

    // RFC 7239 Forwarded, when the proxies are configured to set it; then X-Forwarded-For, which
    // a client could send itself, is not read.
    let s = server(|c| {
        c.settings.abuse.start.ip = rate("1/1h");
        c.proxy_header = kontalk_registrar::config::ProxyHeader::Forwarded;
    })
    .await;
    let r = via_proxy(
        &s,
        "/v1/verifications",
        &[("forwarded", "for=\"[2001:db8::2]:80\";proto=https")],
        json!({"phone": it_number(6)}),
    )
    .await;
    assert_eq!(r.status, 201);
    let r = via_proxy(
        &s,
        "/v1/verifications",
        &[
            ("forwarded", "for=192.0.2.66, for=2001:db8::2"),
            ("x-forwarded-for", "203.0.113.1"),
        ],
        json!({"phone": it_number(7)}),
    )
    .await;
    assert_limited(&r, "ip", Duration::from_secs(3600));

    // The proxy's own address never satisfies an allow-list: not the login check's, not
    // abuse.trusted_ips.
    let s = server(|c| {
        c.settings.abuse.start.ip = rate("1/1h");
        c.settings.abuse.lists.trusted_ips = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    for headers in [&[][..], &[("x-forwarded-for", "127.0.0.1")][..]] {
        let login = via_proxy(&s, "/v1/login-certificates/verify", headers, json!({})).await;
        assert_eq!(login.status, 401, "{headers:?}: {:?}", login.body);
    }
    assert_eq!(
        via_proxy(&s, "/v1/verifications", &[], json!({"phone": it_number(8)}))
            .await
            .status,
        201
    );
    let r = via_proxy(&s, "/v1/verifications", &[], json!({"phone": it_number(9)})).await;
    assert_limited(&r, "ip", Duration::from_secs(3600));
    // A client the proxy names is judged by its own address.
    let s = server(|c| c.login.allowed_ips = vec!["192.0.2.50/32".parse().unwrap()]).await;
    let login = via_proxy(
        &s,
        "/v1/login-certificates/verify",
        &[("x-forwarded-for", "192.0.2.50")],
        json!({}),
    )
    .await;
    assert_eq!(
        login.status, 403,
        "allowed, and the certificate refused: {:?}",
        login.body
    );
}
