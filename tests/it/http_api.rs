//! The JSON API end to end: every flow and every bad input the foundation issue lists.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kontalk_registrar::openpgp;
use kontalk_registrar::registrar::ports::Store;
use registrar_providers::{
    CapturingProvider, Challenge, Delivery, ErrorKind, Outgoing, Provider, ProviderError,
};
use serde_json::json;

use crate::harness::*;

fn id_of(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

fn jid() -> String {
    format!("{EMULATOR_ACCOUNT}@localhost")
}

async fn store_of(server: &TestServer) -> Box<dyn Store> {
    open_store(&server.db_url).await
}

#[tokio::test]
async fn happy_path_registers_and_certifies_the_key() {
    let s = TestServer::start().await;
    let now = s.clock_now();
    let started = s.start_verification("+1 555-521-5554", false).await;
    let id = id_of(&started);
    let b = &started.body;
    assert_eq!(id.len(), 32);
    assert_eq!(b["account"], jid());
    assert_eq!(b["challenge"], "pin");
    assert_eq!(b["sender"], "12345");
    assert_eq!(b["code_length"], 6);
    assert_eq!(b["attempts_left"], 5);
    assert_eq!(b["status"], "pending");
    assert!(b["instructions"].as_str().unwrap().contains("6-digit"));
    let expires = chrono::DateTime::parse_from_rfc3339(b["expires_at"].as_str().unwrap()).unwrap();
    let resend =
        chrono::DateTime::parse_from_rfc3339(b["next_resend_at"].as_str().unwrap()).unwrap();
    assert!((expires.timestamp() - now.timestamp() - 600).abs() <= 1);
    assert!((resend.timestamp() - now.timestamp() - 60).abs() <= 1);

    let sent = s.provider.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, EMULATOR);
    assert_eq!(sent[0].challenge, Challenge::Pin);
    assert_eq!(sent[0].reference, id);
    assert!(sent[0].text.contains(&sent[0].code));
    assert!(sent[0].valid_for <= Duration::from_secs(600));

    let key = user_key(&jid());
    let reply = s.submit(&id, &s.code_for(EMULATOR), &public(&key)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["account"], jid());
    assert_eq!(reply.body["fingerprint"], key.fingerprint().to_hex());
    let certified =
        openpgp::parse_cert(&unb64(reply.body["public_key"].as_str().unwrap())).unwrap();
    assert!(!certified.is_tsk(), "no secret material is returned");

    let server_key = s.http.get(s.url("/v1/server-key")).send().await.unwrap();
    assert_eq!(server_key.headers()["content-type"], "application/pgp-keys");
    let server_cert = openpgp::parse_cert(&server_key.bytes().await.unwrap()).unwrap();
    assert!(openpgp::has_certification(&certified, &server_cert, &jid()));
    assert!(!openpgp::has_certification(
        &public_cert(&key),
        &server_cert,
        &jid()
    ));

    let status = s.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(status.body["status"], "verified");
    let account = store_of(&s)
        .await
        .account(&EMULATOR_ACCOUNT.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.fingerprint, key.fingerprint().to_hex());
}

fn public_cert(key: &sequoia_openpgp::Cert) -> sequoia_openpgp::Cert {
    openpgp::parse_cert(&public(key)).unwrap()
}

#[tokio::test]
async fn armored_keys_are_accepted_too() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let key = user_key(&jid());
    let armored = String::from_utf8(openpgp::public_armored(&key).unwrap()).unwrap();
    let reply = s
        .post(
            &format!("/v1/verifications/{id}/code"),
            json!({"code": s.code_for(EMULATOR), "public_key": armored}),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

#[tokio::test]
async fn conflict_then_force_replaces_the_key() {
    let s = TestServer::start().await;
    let (first, reply) = s.register(EMULATOR, false).await;
    assert_eq!(reply.status, 200);

    let again = s.start_verification(EMULATOR, false).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.problem_type(), "conflict");
    assert!(
        again.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("Another user is registered with the same id.")
    );
    assert_eq!(s.provider.sent().len(), 1, "a conflict sends nothing");

    let (second, reply) = s.register(EMULATOR, true).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_ne!(first.fingerprint(), second.fingerprint());
    let account = store_of(&s)
        .await
        .account(&EMULATOR_ACCOUNT.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.fingerprint, second.fingerprint().to_hex());
}

#[tokio::test]
async fn wrong_codes_lock_the_verification_until_it_expires() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let right = s.code_for(EMULATOR);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    let key = public(&user_key(&jid()));
    for left in (0..5).rev() {
        let r = s.submit(&id, wrong, &key).await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert_eq!(r.problem_type(), "wrong-code");
        assert_eq!(r.body["attempts_left"], left);
    }
    // Locked: even the right code is refused now.
    let r = s.submit(&id, &right, &key).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.problem_type(), "locked");
    let retry = r.retry_after().unwrap();
    assert!((595..=600).contains(&retry), "{retry}");
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["status"],
        "locked"
    );
    // A new start for the number cannot get around the lock, nor can a resend.
    s.clock.advance(Duration::from_secs(120));
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!((r.status, r.problem_type()), (429, "locked"));
    let r = s
        .post(&format!("/v1/verifications/{id}/resend"), json!({}))
        .await;
    assert_eq!((r.status, r.problem_type()), (429, "locked"));
    // Once it expired, the number can start again.
    s.clock.advance(Duration::from_secs(481));
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test]
async fn a_successful_submission_replays_and_nothing_else_does() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let code = s.code_for(EMULATOR);
    let key = public(&user_key(&jid()));
    let first = s.submit(&id, &code, &key).await;
    assert_eq!(first.status, 200);
    let again = s.submit(&id, &code, &key).await;
    assert_eq!(again.status, 200);
    assert_eq!(first.body, again.body, "the stored result comes back");

    let other_key = public(&user_key(&jid()));
    let r = s.submit(&id, &code, &other_key).await;
    assert_eq!((r.status, r.problem_type()), (409, "already-verified"));
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let r = s.submit(&id, wrong, &key).await;
    assert_eq!((r.status, r.problem_type()), (409, "already-verified"));
    // Once the verification expired, the replay is gone too.
    s.clock.advance(Duration::from_secs(601));
    let r = s.submit(&id, &code, &key).await;
    assert_eq!((r.status, r.problem_type()), (404, "not-found"));
}

#[tokio::test]
async fn resend_waits_then_sends_a_fresh_code() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let old = s.code_for(EMULATOR);
    let path = format!("/v1/verifications/{id}/resend");
    let r = s.post(&path, json!({})).await;
    assert_eq!((r.status, r.problem_type()), (429, "rate-limited"));
    assert_eq!(r.retry_after(), Some(60));
    assert!(r.body["retry_at"].is_string());
    s.clock.advance(Duration::from_secs(30));
    let r = s.post_raw(&path, "").await;
    assert_eq!(r.status, 429, "an empty body is a resend with no options");
    assert_eq!(r.retry_after(), Some(30));
    assert_eq!(s.provider.sent().len(), 1);

    s.clock.advance(Duration::from_secs(31));
    let r = s.post(&path, json!({"challenge": "voice"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["id"], id);
    assert_eq!(r.body["challenge"], "voice");
    let sent = s.provider.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].challenge, Challenge::Voice);
    let fresh = s.code_for(EMULATOR);
    let key = public(&user_key(&jid()));
    if fresh != old {
        let r = s.submit(&id, &old, &key).await;
        assert_eq!(r.problem_type(), "wrong-code", "the old code is void");
    }
    let r = s.submit(&id, &fresh, &key).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = s.post(&path, json!({})).await;
    assert_eq!(r.status, 409, "nothing to resend after completion");
}

#[tokio::test]
async fn expired_verifications_are_gone_and_purged() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let code = s.code_for(EMULATOR);
    s.clock.advance(Duration::from_secs(599));
    assert_eq!(s.get(&format!("/v1/verifications/{id}")).await.status, 200);
    s.clock.advance(Duration::from_secs(1));
    let key = public(&user_key(&jid()));
    for r in [
        s.submit(&id, &code, &key).await,
        s.get(&format!("/v1/verifications/{id}")).await,
        s.post(&format!("/v1/verifications/{id}/resend"), json!({}))
            .await,
        s.delete(&format!("/v1/verifications/{id}")).await,
    ] {
        assert_eq!((r.status, r.problem_type()), (404, "not-found"));
    }
    let store = store_of(&s).await;
    assert_eq!(store.purge_expired(s.clock_now()).await.unwrap(), 1);
    assert!(
        store
            .verification_by_account(&EMULATOR_ACCOUNT.parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    // A new verification for the number starts normally.
    assert_eq!(s.start_verification(EMULATOR, false).await.status, 201);
}

#[tokio::test]
async fn cancel_removes_the_verification() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let r = s.delete(&format!("/v1/verifications/{id}")).await;
    assert_eq!(r.status, 204);
    let key = public(&user_key(&jid()));
    let r = s.submit(&id, &s.code_for(EMULATOR), &key).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        s.delete(&format!("/v1/verifications/{id}")).await.status,
        404
    );
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_not_found() {
    let s = TestServer::start().await;
    let key = public(&user_key(&jid()));
    for id in [
        "0123456789abcdef0123456789abcdef",
        "..%2F..%2Fetc",
        "x",
        "ABCDEF0123456789ABCDEF0123456789",
    ] {
        assert_eq!(s.get(&format!("/v1/verifications/{id}")).await.status, 404);
        let r = s.submit(id, "123456", &key).await;
        assert_eq!((r.status, r.problem_type()), (404, "not-found"), "{id}");
        assert_eq!(
            s.post(&format!("/v1/verifications/{id}/resend"), json!({}))
                .await
                .status,
            404
        );
    }
}

#[tokio::test]
async fn malformed_requests_are_400_and_huge_ones_413() {
    let s = TestServer::start().await;
    for body in [
        "{not json",
        "[]",
        "{\"phone\": 5}",
        "{\"force\": true}",
        "{\"phone\": \"+15555215554\", \"challenge\": \"callerid\"}",
        "{\"phone\": \"+15555215554\", \"force\": \"yes\"}",
        "\u{0}\u{1}",
    ] {
        let r = s.post_raw("/v1/verifications", body).await;
        assert_eq!(
            (r.status, r.problem_type()),
            (400, "bad-request"),
            "{body:?}: {:?}",
            r.body
        );
    }
    // A body that is not an object is refused as such, even when its values would fit the
    // members in order; unknown members are refused by name. Nothing is sent.
    for (body, said) in [
        (r#"["+15555215554"]"#, "must be a JSON object"),
        (r#"["+15555215554", true, "pin"]"#, "not an array"),
        (r#""+15555215554""#, "not a string"),
        (
            r#"{"phone": "+15555215554", "forse": true}"#,
            "unknown field `forse`",
        ),
    ] {
        let r = s.post_raw("/v1/verifications", body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains(said), "{body}: {detail}");
        assert!(!detail.contains("struct"), "{body}: {detail}");
    }
    assert!(s.provider.sent().is_empty());
    let huge = format!("{{\"phone\": \"{}\"}}", "1".repeat(100 * 1024));
    let r = s.post_raw("/v1/verifications", huge).await;
    assert_eq!((r.status, r.problem_type()), (413, "payload-too-large"));
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let path = format!("/v1/verifications/{id}/code");
    let r = s.post_raw(&path, "{\"code\": \"123456\"}").await;
    assert_eq!(r.status, 400, "missing public_key");
    let r = s
        .post(&path, json!({"code": "12ab56", "public_key": "AAAA"}))
        .await;
    assert_eq!(r.status, 400, "a code is digits");
    let r = s.post_raw(&path, "x".repeat(70 * 1024)).await;
    assert_eq!(r.status, 413);
    // Nothing above spent a try.
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["attempts_left"],
        5
    );
    // Unknown routes and methods are problems too.
    let r = s.get("/v1/nothing").await;
    assert_eq!((r.status, r.problem_type()), (404, "no-route"));
    let r = Reply::from(s.http.put(s.url("/v1/verifications")).send().await.unwrap()).await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn bad_keys_are_refused_without_spending_a_try() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let code = s.code_for(EMULATOR);
    let path = format!("/v1/verifications/{id}/code");
    let other_account = user_key("0000000000000000000000000000000000000000@localhost");
    let other_domain = user_key(&format!("{EMULATOR_ACCOUNT}@example.org"));
    let secret = openpgp::secret_armored(&user_key(&jid())).unwrap();
    let cases: Vec<String> = vec![
        b64(&public(&other_account)),
        b64(&public(&other_domain)),
        String::from_utf8(secret).unwrap(),
        "!!! not base64".into(),
        b64(b"not an OpenPGP key"),
        String::new(),
        b64(&[public(&user_key(&jid())), public(&user_key(&jid()))].concat()),
    ];
    for key in cases {
        let r = s
            .post(&path, json!({"code": code, "public_key": key}))
            .await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert_eq!(r.problem_type(), "bad-key", "{:?}", r.body);
    }
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["attempts_left"],
        5
    );
    let r = s.submit(&id, &code, &public(&user_key(&jid()))).await;
    assert_eq!(r.status, 200, "the right code and key still work");
}

#[tokio::test]
async fn invalid_numbers_are_422_and_send_nothing() {
    let s = TestServer::start().await;
    for phone in [
        "",
        "garbage",
        "5555215554",
        "+999 1234567",
        "+1 555 CALL NOW",
        "+1",
        "+15555215554;ext=1",
        &"9".repeat(5000),
    ] {
        let r = s.start_verification(phone, false).await;
        assert_eq!(r.status, 422, "{phone:?}: {:?}", r.body);
        assert_eq!(r.problem_type(), "invalid-phone");
    }
    assert!(s.provider.sent().is_empty());
}

#[tokio::test]
async fn production_phone_policy_refuses_fictional_numbers() {
    let s = TestServer::start_with(|c| c.settings.phone_policy.accept_fictional = false).await;
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!((r.status, r.problem_type()), (422, "invalid-phone"));
    let r = s.start_verification("+39 899 123456", false).await;
    assert_eq!(r.status, 422, "premium rate");
    assert!(r.body["detail"].as_str().unwrap().contains("premium_rate"));
    let r = s.start_verification("+44 7911 123456", false).await;
    assert_eq!(r.status, 201, "a real mobile number: {:?}", r.body);
}

#[tokio::test]
async fn closed_registration_and_terms() {
    let s = TestServer::start_with(|c| c.settings.open = false).await;
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!((r.status, r.problem_type()), (403, "registration-closed"));

    let terms = "https://example.org/terms";
    let s = TestServer::start_with(|c| c.settings.terms_url = Some(terms.into())).await;
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!((r.status, r.problem_type()), (403, "terms-not-accepted"));
    assert_eq!(r.body["terms_url"], terms);
    let r = s
        .post(
            "/v1/verifications",
            json!({"phone": EMULATOR, "accept_terms": true}),
        )
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn provider_failures_map_to_errors_and_leave_the_number_free() {
    let s = TestServer::start().await;
    s.provider.fail_next(ProviderError::new(
        "capture",
        ErrorKind::Transient,
        "gateway timeout",
    ));
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!((r.status, r.problem_type()), (502, "delivery-failed"));
    assert!(
        !r.body.to_string().contains("gateway timeout"),
        "provider internals stay in the log"
    );
    // Nothing was delivered, so the client may start again at once.
    let id = id_of(&s.start_verification(EMULATOR, false).await);

    s.provider.fail_next(ProviderError::new(
        "capture",
        ErrorKind::InvalidNumber,
        "not a number",
    ));
    let r = s.start_verification("+15555215556", false).await;
    assert_eq!((r.status, r.problem_type()), (422, "invalid-phone"));
    s.provider
        .fail_next(ProviderError::new("capture", ErrorKind::Blocked, "blocked"));
    let r = s.start_verification("+15555215556", false).await;
    assert_eq!((r.status, r.problem_type()), (403, "destination-blocked"));

    // A failed resend can be retried at once.
    s.clock.advance(Duration::from_secs(61));
    s.provider
        .fail_next(ProviderError::new("capture", ErrorKind::Transient, "down"));
    let path = format!("/v1/verifications/{id}/resend");
    assert_eq!(s.post(&path, json!({})).await.status, 502);
    let r = s.post(&path, json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test]
async fn a_challenge_no_provider_offers_is_refused() {
    let pin_only = CapturingProvider::new("pin-only", "1").with_challenges(vec![Challenge::Pin]);
    let s = TestServer::start_in(
        tempfile::tempdir().unwrap(),
        kontalk_registrar::clock::ManualClock::new(chrono::Utc::now()),
        vec![Arc::new(pin_only.clone())],
        pin_only,
        |_| {},
    )
    .await;
    let r = s
        .post(
            "/v1/verifications",
            json!({"phone": EMULATOR, "challenge": "missedcall"}),
        )
        .await;
    assert_eq!((r.status, r.problem_type()), (502, "no-provider"));
    assert!(s.provider.sent().is_empty());
}

/// A provider that, while delivering, checks through the API that the verification is already
/// stored: persist first, send second.
struct CheckingProvider {
    base: Arc<std::sync::OnceLock<String>>,
    inner: CapturingProvider,
}

#[async_trait]
impl Provider for CheckingProvider {
    fn name(&self) -> &str {
        "checking"
    }
    async fn send(&self, m: &Outgoing) -> Result<Delivery, ProviderError> {
        let base = self.base.get().expect("server started");
        let r = http_client()
            .get(format!("{base}/v1/verifications/{}", m.reference))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "the verification must be stored before sending"
        );
        self.inner.send(m).await
    }
}

#[tokio::test]
async fn the_verification_is_stored_before_the_provider_is_called() {
    let base = Arc::new(std::sync::OnceLock::new());
    let capture = CapturingProvider::new("c", "1");
    let checking = Arc::new(CheckingProvider {
        base: base.clone(),
        inner: capture.clone(),
    });
    let s = TestServer::start_in(
        tempfile::tempdir().unwrap(),
        kontalk_registrar::clock::ManualClock::new(chrono::Utc::now()),
        vec![checking],
        capture,
        |_| {},
    )
    .await;
    base.set(s.base.clone()).unwrap();
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        s.provider.sent().len(),
        1,
        "the checking provider delivered"
    );
}

/// A provider that records the verification and never returns: the process "crashes" while
/// the message is in flight.
struct HangingProvider(Arc<std::sync::Mutex<Option<String>>>);

#[async_trait]
impl Provider for HangingProvider {
    fn name(&self) -> &str {
        "hanging"
    }
    async fn send(&self, m: &Outgoing) -> Result<Delivery, ProviderError> {
        *self.0.lock().unwrap() = Some(m.reference.clone());
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_crash_between_store_and_send_leaves_a_verification_whose_resend_works() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let clock = kontalk_registrar::clock::ManualClock::new(chrono::Utc::now());
    let s = TestServer::start_in(
        tempfile::tempdir().unwrap(),
        clock.clone(),
        vec![Arc::new(HangingProvider(seen.clone()))],
        CapturingProvider::new("unused", "1"),
        |_| {},
    )
    .await;
    let url = s.url("/v1/verifications");
    let client = s.http.clone();
    let request = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"phone": EMULATOR}))
            .send()
            .await
    });
    let id = loop {
        if let Some(id) = seen.lock().unwrap().clone() {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let dir = s.crash();
    request.abort();

    // The service comes back on the same data directory with a working provider.
    let capture = CapturingProvider::new("capture", "12345");
    let s =
        TestServer::start_in(dir, clock, vec![Arc::new(capture.clone())], capture, |_| {}).await;
    let status = s.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(status.status, 200, "the verification survived the crash");
    s.clock.advance(Duration::from_secs(61));
    let r = s
        .post(&format!("/v1/verifications/{id}/resend"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let reply = s
        .submit(&id, &s.code_for(EMULATOR), &public(&user_key(&jid())))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

#[tokio::test]
async fn concurrent_starts_create_one_verification_and_send_one_message() {
    let s = Arc::new(TestServer::start().await);
    let replies = futures_join(8, |_| {
        let s = s.clone();
        async move { s.start_verification(EMULATOR, false).await }
    })
    .await;
    let created: Vec<_> = replies.iter().filter(|r| r.status == 201).collect();
    assert_eq!(
        created.len(),
        1,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    // The others wait (429 with a time), or, when the first start committed before they were
    // read, get that same verification back as a repeated start of this client (200,
    // Idempotent-Replayed): never a second verification or message.
    let id = &created[0].body["id"];
    for r in replies.iter().filter(|r| r.status != 201) {
        let replayed = r.status == 200
            && r.headers.get("idempotent-replayed").is_some()
            && r.body["id"] == *id;
        assert!(
            replayed || (r.status == 429 && r.retry_after().is_some()),
            "{} {:?}",
            r.status,
            r.body
        );
    }
    assert_eq!(s.provider.sent().len(), 1);
}

#[tokio::test]
async fn concurrent_submissions_create_the_account_once_and_cannot_outrun_the_counter() {
    let s = Arc::new(TestServer::start().await);
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let right = s.code_for(EMULATOR);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    }
    .to_owned();
    let key = public(&user_key(&jid()));
    // Twenty parallel wrong guesses: exactly five are judged, the rest find it locked.
    let replies = futures_join(20, |_| {
        let (s, id, wrong, key) = (s.clone(), id.clone(), wrong.clone(), key.clone());
        async move { s.submit(&id, &wrong, &key).await }
    })
    .await;
    let judged = replies.iter().filter(|r| r.status == 422).count();
    let locked = replies.iter().filter(|r| r.status == 429).count();
    assert_eq!((judged, locked), (5, 15));

    // A fresh number: the right code submitted twelve times at once registers once, and every
    // duplicate gets the same success, also those that found no try left (they wait for the
    // certification in progress instead of being told "locked").
    let phone = "+15555215556";
    let id = id_of(&s.start_verification(phone, false).await);
    let code = s.code_for(phone);
    let account = s.get(&format!("/v1/verifications/{id}")).await.body["account"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = public(&user_key(&account));
    let replies = futures_join(12, |_| {
        let (s, id, code, key) = (s.clone(), id.clone(), code.clone(), key.clone());
        async move { s.submit(&id, &code, &key).await }
    })
    .await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![200; 12],
        "{:?}",
        replies.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    assert!(
        replies.windows(2).all(|w| w[0].body == w[1].body),
        "one stored result"
    );
    // Later duplicates replay the stored result as well.
    let later = s.submit(&id, &code, &key).await;
    assert_eq!(later.body, replies[0].body);
}

async fn futures_join<F, Fut>(n: usize, f: F) -> Vec<Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_restart_keeps_the_server_key_the_secret_and_the_accounts() {
    let s = TestServer::start().await;
    let (_, reply) = s.register(EMULATOR, false).await;
    assert_eq!(reply.status, 200);
    let key_before = s.get_text("/v1/server-key").await;
    // A verification in progress survives a graceful restart too: its code hash was made with
    // the persisted secret.
    let id = id_of(&s.start_verification("+15555215556", false).await);
    let code = s.code_for("+15555215556");
    let clock = s.clock.clone();
    let dir = s.stop().await;

    let capture = CapturingProvider::new("capture", "12345");
    let s =
        TestServer::start_in(dir, clock, vec![Arc::new(capture.clone())], capture, |_| {}).await;
    assert_eq!(s.get_text("/v1/server-key").await, key_before);
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!(r.status, 409, "the account survived");
    let account = s.get(&format!("/v1/verifications/{id}")).await.body["account"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.submit(&id, &code, &public(&user_key(&account))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

async fn two_providers() -> (TestServer, CapturingProvider, CapturingProvider) {
    let first = CapturingProvider::new("first", "111");
    let second = CapturingProvider::new("second", "222");
    let s = TestServer::start_in(
        tempfile::tempdir().unwrap(),
        kontalk_registrar::clock::ManualClock::new(chrono::Utc::now()),
        vec![Arc::new(first.clone()), Arc::new(second.clone())],
        first.clone(),
        |_| {},
    )
    .await;
    (s, first, second)
}

#[tokio::test]
async fn a_transient_failure_of_the_first_provider_is_delivered_by_the_next() {
    let (s, first, second) = two_providers().await;
    first.fail_next(ProviderError::new(
        "first",
        ErrorKind::Transient,
        "gateway down",
    ));
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["sender"], "222", "the second provider delivered");
    assert_eq!((first.sent().len(), second.sent().len()), (0, 1));
    let key = public(&user_key(&jid()));
    let code = second.last_code(EMULATOR).unwrap();
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(s.submit(id, &code, &key).await.status, 200);

    // A permanent failure is not retried elsewhere.
    first.fail_next(ProviderError::new(
        "first",
        ErrorKind::Blocked,
        "premium range",
    ));
    let r = s.start_verification("+15555215556", false).await;
    assert_eq!((r.status, r.problem_type()), (403, "destination-blocked"));
    assert_eq!(second.sent().len(), 1);
}

#[tokio::test]
async fn fallback_uses_the_next_provider() {
    let (s, first, second) = two_providers().await;
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!(r.body["can_fallback"], true);
    assert_eq!(r.body["sender"], "111");
    // The client did not get the code: it asks again through the other provider.
    s.clock.advance(Duration::from_secs(61));
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = s
        .post(
            &format!("/v1/verifications/{id}/resend"),
            json!({"fallback": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["sender"], "222");
    assert_eq!((first.sent().len(), second.sent().len()), (1, 1));
    // A start with fallback goes to the second provider directly.
    let r = s
        .post(
            "/v1/verifications",
            json!({"phone": "+15555215556", "fallback": true}),
        )
        .await;
    assert_eq!(r.body["sender"], "222");
    assert_eq!(r.body["can_fallback"], false);
}

#[tokio::test]
async fn messages_use_the_clients_language() {
    let s = TestServer::start_with(|c| {
        let mut t = std::collections::BTreeMap::new();
        t.insert(
            Challenge::Pin,
            std::collections::BTreeMap::from([(
                "it".to_owned(),
                "{code} è il tuo codice {service}.".to_owned(),
            )]),
        );
        c.settings.templates = kontalk_registrar::registrar::Templates::new(&t).unwrap();
    })
    .await;
    let r = Reply::from(
        s.http
            .post(s.url("/v1/verifications"))
            .header("accept-language", "it-IT,it;q=0.9,en;q=0.5")
            .json(&json!({"phone": EMULATOR}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 201);
    let sent = s.provider.sent();
    assert_eq!(
        sent[0].text,
        format!("{} è il tuo codice Kontalk.", sent[0].code)
    );
    assert_eq!(sent[0].locale.as_deref(), Some("it-IT"));
    let r = s
        .post(
            "/v1/verifications",
            json!({"phone": "+15555215556", "locale": "de"}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(
        s.provider.sent()[1]
            .text
            .ends_with("is your Kontalk verification code.")
    );
}

#[tokio::test]
async fn delivery_receipts_are_authenticated_and_recorded() {
    let s = TestServer::start().await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["delivery"],
        json!(null)
    );
    let receipt = |token: &str, body: serde_json::Value| {
        s.http
            .post(s.url("/v1/receipts/capture"))
            .header("authorization", format!("Bearer {token}"))
            .json(&body)
    };
    let r = receipt("wrong", json!({"ref": "capture-1", "state": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["delivery"],
        json!(null)
    );
    let token = registrar_providers::CAPTURE_RECEIPT_TOKEN;
    let r = receipt(token, json!({"ref": "capture-1", "state": "nonsense"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = receipt(token, json!({"ref": "capture-1", "state": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["delivery"],
        "delivered"
    );
    let r = s
        .http
        .post(s.url("/v1/receipts/nobody"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_failed_receipt_allows_an_immediate_resend_through_another_provider() {
    let (s, first, second) = two_providers().await;
    let r = s.start_verification(EMULATOR, false).await;
    let id = r.body["id"].as_str().unwrap().to_owned();
    let resend = format!("/v1/verifications/{id}/resend");
    assert_eq!(
        s.post(&resend, json!({})).await.status,
        429,
        "inside the wait"
    );
    let r = s
        .http
        .post(s.url("/v1/receipts/first"))
        .header(
            "authorization",
            format!("Bearer {}", registrar_providers::CAPTURE_RECEIPT_TOKEN),
        )
        .json(&json!({"ref": "first-1", "state": "failed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["delivery"],
        "failed"
    );
    let r = s.post(&resend, json!({})).await;
    assert_eq!(
        r.status, 200,
        "the failed message does not hold the client back: {:?}",
        r.body
    );
    assert_eq!(
        r.body["sender"], "222",
        "and the next message goes through the other provider"
    );
    assert_eq!(r.body["delivery"], json!(null));
    assert_eq!((first.sent().len(), second.sent().len()), (1, 1));
    assert_eq!(
        s.post(&resend, json!({})).await.status,
        429,
        "the wait applies again"
    );
}

/// Reads from `stream` until the server closes it (or `limit` passes); what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_bounded() {
    use tokio::io::AsyncWriteExt as _;
    let s = TestServer::start_with(|c| {
        c.http_bounds.header_timeout = Duration::from_secs(1);
        c.http_bounds.request_timeout = Duration::from_secs(1);
        c.http_bounds.max_connections = 3;
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    // A client that never finishes its request head is disconnected.
    let mut slow_head = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let said = read_until_closed(&mut slow_head, Duration::from_secs(10))
        .await
        .expect("a client that never finishes its headers is disconnected");
    assert!(!said.contains("200 OK"), "{said}");
    // A client that trickles its body gets 408 once the request took too long.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /v1/verifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"phone\"",
        )
        .await
        .unwrap();
    let said = read_until_closed(&mut slow_body, Duration::from_secs(10))
        .await
        .expect("a client that trickles its body is answered and disconnected");
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("request-timeout"), "{said}");
    assert!(s.provider.sent().is_empty());

    // Three connections at most: a fourth is closed at once, and served again once one goes.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // Each sends a whole request and keeps the connection alive.
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut refused = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = refused
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        read_until_closed(&mut refused, Duration::from_secs(10)).await
    })
    .await
    .unwrap();
    assert_eq!(
        r.as_deref(),
        Some(""),
        "the fourth connection is closed unanswered"
    );
    drop(held);
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(r) = s.http.get(s.url("/healthz")).send().await
            && r.status() == 200
        {
            ok = Some(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok.is_some(), "served again once connections are free");
}

#[tokio::test]
async fn keys_are_parsed_only_within_the_clients_budget() {
    // Parsing a key checks its signatures: a client that floods junk keys is stopped before
    // they are parsed, with a time to come back.
    let s = TestServer::start_with(|c| {
        c.settings.key_checks_per_client = Some("2/1h".parse().unwrap());
    })
    .await;
    let id = id_of(&s.start_verification(EMULATOR, false).await);
    let path = format!("/v1/verifications/{id}/code");
    let junk = json!({"code": "123456", "public_key": "bm90IGEga2V5"});
    for _ in 0..2 {
        let r = s.post(&path, junk.clone()).await;
        assert_eq!(
            (r.status, r.problem_type()),
            (422, "bad-key"),
            "{:?}",
            r.body
        );
    }
    let r = s.post(&path, junk).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (429, "rate-limited"),
        "{:?}",
        r.body
    );
    assert!(r.retry_after().is_some());
    // The verification itself spent no try on them.
    let status = s.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(status.body["attempts_left"], 5, "{:?}", status.body);
}
