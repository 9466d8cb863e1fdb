//! The Twilio provider against a mock of Twilio's API (wiremock). Every call is matched on its
//! method, path, Basic-auth header and complete form body; the answers are the fixtures in
//! `tests/fixtures/twilio/` (see the README there for where each comes from). The form fields
//! sent are also checked against Twilio's OpenAPI descriptions (the operations we call, in `tests/fixtures/twilio/spec`).

use std::collections::BTreeSet;
use std::time::Duration;

use registrar_providers::twilio::{
    TwilioConfig, TwilioMode, TwilioProvider, request_signature, voice_twiml,
};
use registrar_providers::{
    Challenge, Credential, DeliveredCode, DeliveryState, ErrorKind, Outgoing, Provider,
    ProviderError, ReceiptError, ReceiptRequest, Secret,
};
use serde_json::Value;
use wiremock::matchers::{header, method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

const ACCOUNT: &str = "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const TOKEN: &str = "secret-token-9f8e7d6c5b4a";
/// `Basic ` + base64("ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:secret-token-9f8e7d6c5b4a"), computed
/// outside Rust (Python's base64) so that the test does not share code with the provider.
const BASIC: &str =
    "Basic QUNhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYTpzZWNyZXQtdG9rZW4tOWY4ZTdkNmM1YjRh";
const SERVICE: &str = "VAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const MESSAGING_SERVICE: &str = "MGaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const FROM: &str = "+14155552345";
const TO: &str = "+15017122661";
const CALLBACK: &str = "https://registrar.example.org/receipts/twilio";
const MESSAGES: &str = "/2010-04-01/Accounts/ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/Messages.json";
const CALLS: &str = "/2010-04-01/Accounts/ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/Calls.json";
const VERIFICATIONS: &str = "/v2/Services/VAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/Verifications";
const VERIFICATION_CHECK: &str =
    "/v2/Services/VAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/VerificationCheck";
const VERIFICATION_SID: &str = "VEaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/twilio/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn reply(status: u16, fixture_name: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(fixture(fixture_name), "application/json")
}

fn messaging(server: &MockServer) -> TwilioConfig {
    TwilioConfig {
        name: "twilio".into(),
        account_sid: ACCOUNT.into(),
        auth_token: Credential::Value(Secret::new(TOKEN)),
        mode: TwilioMode::Messaging,
        from: Some(FROM.into()),
        messaging_service_sid: None,
        verify_service_sid: None,
        challenges: None,
        base_url: Some(server.uri()),
        status_callback: Some(CALLBACK.into()),
        timeout_seconds: Some(5),
    }
}

fn verify(server: &MockServer) -> TwilioConfig {
    TwilioConfig {
        mode: TwilioMode::Verify,
        from: None,
        verify_service_sid: Some(SERVICE.into()),
        status_callback: None,
        ..messaging(server)
    }
}

fn provider(config: TwilioConfig) -> TwilioProvider {
    TwilioProvider::new(config).expect("valid configuration")
}

fn outgoing(challenge: Challenge) -> Outgoing {
    Outgoing {
        to: TO.into(),
        challenge,
        code: "481592".into(),
        text: "Your Kontalk code is 481592".into(),
        reference: "ver-1".into(),
        valid_for: Duration::from_secs(600),
        locale: None,
    }
}

/// Matches a form-encoded body whose fields are exactly `expected` (in any order).
struct FormIs(Vec<(String, String)>);

fn form_is(fields: &[(&str, &str)]) -> FormIs {
    FormIs(
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn parse_form(request: &Request) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(&request.body).expect("form body")
}

impl Match for FormIs {
    fn matches(&self, request: &Request) -> bool {
        let form_type = request
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let mut got = parse_form(request);
        let mut want = self.0.clone();
        got.sort();
        want.sort();
        form_type && got == want
    }
}

/// A POST to `at` with our Basic credentials and exactly the form `fields`.
fn expect_post(at: &str, fields: &[(&str, &str)]) -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path(at))
        .and(header("authorization", BASIC))
        .and(form_is(fields))
}

fn sms_fields(validity: &str) -> Vec<(&'static str, String)> {
    vec![
        ("To", TO.into()),
        ("From", FROM.into()),
        ("Body", "Your Kontalk code is 481592".into()),
        ("ValidityPeriod", validity.into()),
        ("StatusCallback", CALLBACK.into()),
    ]
}

fn borrowed<'a>(fields: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    fields.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Asserts that nothing secret or personal leaked into an error.
fn assert_clean(e: &ProviderError, number: &str) {
    let text = format!("{e} {e:?}");
    assert!(!text.contains(TOKEN), "token in {text}");
    assert!(!text.contains(number), "number in {text}");
    assert!(
        !text.contains(number.trim_start_matches('+')),
        "number in {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn configuration_parses_with_defaults_and_refuses_unknown_fields() {
    let config: TwilioConfig = serde_json::from_value(serde_json::json!({
        "account_sid": ACCOUNT,
        "auth_token": {"env": "REGISTRAR_TWILIO_TEST_TOKEN_UNSET"},
        "mode": "verify",
        "verify_service_sid": SERVICE,
    }))
    .unwrap();
    assert_eq!(config.name, "twilio");
    assert_eq!(config.mode, TwilioMode::Verify);
    assert_eq!(config.challenges, None);
    let e = TwilioProvider::new(config).unwrap_err();
    assert!(e.contains("REGISTRAR_TWILIO_TEST_TOKEN_UNSET"), "{e}");

    let unknown = serde_json::from_value::<TwilioConfig>(serde_json::json!({
        "account_sid": ACCOUNT, "auth_token": TOKEN, "mode": "messaging", "form": FROM,
    }));
    assert!(unknown.is_err());
    let mode = serde_json::from_value::<TwilioConfig>(serde_json::json!({
        "account_sid": ACCOUNT, "auth_token": TOKEN, "mode": "Messaging",
    }));
    assert!(mode.is_err(), "modes are snake_case");
}

#[tokio::test]
async fn construction_checks_mode_requirements() {
    let server = MockServer::start().await;
    let defaults = provider(messaging(&server));
    assert_eq!(defaults.challenges(), &[Challenge::Pin, Challenge::Voice]);
    assert_eq!(defaults.name(), "twilio");
    assert_eq!(
        provider(verify(&server)).challenges(),
        &[Challenge::Pin, Challenge::Voice]
    );

    let cases = [
        (
            TwilioConfig {
                from: None,
                ..messaging(&server)
            },
            "from",
        ),
        (
            TwilioConfig {
                from: None,
                messaging_service_sid: Some(MESSAGING_SERVICE.into()),
                ..messaging(&server)
            },
            "voice",
        ),
        (
            TwilioConfig {
                verify_service_sid: None,
                ..verify(&server)
            },
            "verify_service_sid",
        ),
        (
            TwilioConfig {
                challenges: Some(vec![Challenge::Pin, Challenge::MissedCall]),
                ..messaging(&server)
            },
            "missedcall",
        ),
        (
            TwilioConfig {
                challenges: Some(vec![]),
                ..messaging(&server)
            },
            "empty",
        ),
        (
            TwilioConfig {
                timeout_seconds: Some(0),
                ..messaging(&server)
            },
            "timeout",
        ),
        (
            TwilioConfig {
                account_sid: "AC/../x".into(),
                ..messaging(&server)
            },
            "account_sid",
        ),
        (
            TwilioConfig {
                auth_token: Credential::Value(Secret::new("")),
                ..messaging(&server)
            },
            "auth_token",
        ),
    ];
    for (config, needle) in cases {
        let e = TwilioProvider::new(config).unwrap_err();
        assert!(e.contains(needle), "{e} should mention {needle}");
        assert!(!e.contains(TOKEN), "{e}");
    }

    // SMS through a Messaging Service alone is fine when voice is not offered.
    let sms_only = TwilioConfig {
        from: None,
        messaging_service_sid: Some(MESSAGING_SERVICE.into()),
        challenges: Some(vec![Challenge::Pin]),
        ..messaging(&server)
    };
    assert!(TwilioProvider::new(sms_only).is_ok());
}

#[tokio::test]
async fn debug_output_never_shows_the_token() {
    let server = MockServer::start().await;
    let config = messaging(&server);
    let p = provider(config.clone());
    let text = format!("{p:?} {config:?}");
    assert!(!text.contains(TOKEN), "{text}");
    assert!(text.contains("redacted"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Messaging: SMS and voice

#[tokio::test]
async fn sms_is_posted_to_messages_with_basic_auth() {
    let server = MockServer::start().await;
    expect_post(MESSAGES, &borrowed(&sms_fields("600")))
        .respond_with(reply(201, "message_created.json"))
        .expect(1)
        .mount(&server)
        .await;
    let d = provider(messaging(&server))
        .send(&outgoing(Challenge::Pin))
        .await
        .unwrap();
    assert_eq!(d.sender, FROM);
    assert_eq!(
        d.provider_ref.as_deref(),
        Some("SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    );
    assert_eq!(d.code, DeliveredCode::Ours);
    assert_eq!(d.instructions, None);
}

#[tokio::test]
async fn sms_through_a_messaging_service_names_no_sender() {
    let server = MockServer::start().await;
    expect_post(
        MESSAGES,
        &[
            ("To", TO),
            ("MessagingServiceSid", MESSAGING_SERVICE),
            ("Body", "Your Kontalk code is 481592"),
            ("ValidityPeriod", "600"),
        ],
    )
    .respond_with(reply(201, "message_created.json"))
    .expect(1)
    .mount(&server)
    .await;
    let p = provider(TwilioConfig {
        messaging_service_sid: Some(MESSAGING_SERVICE.into()),
        status_callback: None,
        ..messaging(&server)
    });
    let d = p.send(&outgoing(Challenge::Pin)).await.unwrap();
    assert_eq!(d.sender, "Twilio");
}

#[tokio::test]
async fn validity_period_never_outlives_the_code() {
    let server = MockServer::start().await;
    // 90.9 s rounds down (never up), 20 h is capped at Twilio's maximum of 36000 s.
    for (valid_for, expected) in [
        (Duration::from_millis(90_900), "90"),
        (Duration::from_secs(20 * 3600), "36000"),
        (Duration::from_secs(1), "1"),
    ] {
        expect_post(MESSAGES, &borrowed(&sms_fields(expected)))
            .respond_with(reply(201, "message_created.json"))
            .expect(1)
            .mount(&server)
            .await;
        let mut m = outgoing(Challenge::Pin);
        m.valid_for = valid_for;
        provider(messaging(&server)).send(&m).await.unwrap();
        for r in server.received_requests().await.unwrap_or_default() {
            let form = parse_form(&r);
            let period: u64 = form
                .iter()
                .find(|(k, _)| k == "ValidityPeriod")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap();
            assert!((1..=36000).contains(&period));
        }
        assert!(
            expected.parse::<u64>().unwrap() <= valid_for.as_secs(),
            "{expected} > {valid_for:?}"
        );
        server.verify().await;
        server.reset().await;
    }

    // A code valid for under a second cannot be sent without outliving it: nothing is posted.
    let mut m = outgoing(Challenge::Pin);
    m.valid_for = Duration::from_millis(500);
    let e = provider(messaging(&server)).send(&m).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn voice_call_reads_the_digits_twice() {
    let server = MockServer::start().await;
    let said = "Your Kontalk code is 4, 8, 1, 5, 9, 2";
    let twiml =
        format!("<Response><Say>{said}</Say><Pause length=\"1\"/><Say>{said}</Say></Response>");
    expect_post(
        CALLS,
        &[
            ("To", TO),
            ("From", FROM),
            ("Twiml", &twiml),
            ("Timeout", "30"),
            ("TimeLimit", "60"),
            ("StatusCallback", CALLBACK),
        ],
    )
    .respond_with(reply(201, "call_created.json"))
    .expect(1)
    .mount(&server)
    .await;
    let d = provider(messaging(&server))
        .send(&outgoing(Challenge::Voice))
        .await
        .unwrap();
    assert_eq!(d.sender, FROM);
    assert_eq!(
        d.provider_ref.as_deref(),
        Some("CAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    );
    assert_eq!(d.code, DeliveredCode::Ours);
    assert_eq!(twiml.matches("4, 8, 1, 5, 9, 2").count(), 2);
    assert!(!twiml.contains("481592"));
}

#[test]
fn twiml_is_escaped() {
    let twiml = voice_twiml("Code <b>&\"1234\"", "1234");
    assert_eq!(
        twiml,
        "<Response><Say>Code &lt;b&gt;&amp;&quot;1, 2, 3, 4&quot;</Say><Pause length=\"1\"/>\
         <Say>Code &lt;b&gt;&amp;&quot;1, 2, 3, 4&quot;</Say></Response>"
    );
    // A text that does not quote the code still ends with it, digit by digit.
    assert!(voice_twiml("Your code:", "987").contains("<Say>Your code: 9, 8, 7</Say>"));
}

#[tokio::test]
async fn missed_calls_and_disabled_challenges_are_unsupported() {
    let server = MockServer::start().await;
    let p = provider(messaging(&server));
    let e = p.send(&outgoing(Challenge::MissedCall)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    let v = provider(verify(&server));
    let e = v.send(&outgoing(Challenge::MissedCall)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    let pin_only = provider(TwilioConfig {
        challenges: Some(vec![Challenge::Pin]),
        ..messaging(&server)
    });
    let e = pin_only
        .send(&outgoing(Challenge::Voice))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    // Messaging mode sends our own code: there is nothing for Twilio to check.
    let e = p.check(VERIFICATION_SID, "481592").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(server.received_requests().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Verify

#[tokio::test]
async fn verify_sends_by_sms_and_by_call() {
    let server = MockServer::start().await;
    expect_post(
        VERIFICATIONS,
        &[("To", TO), ("Channel", "sms"), ("Locale", "it")],
    )
    .respond_with(reply(201, "verification_created.json"))
    .expect(1)
    .mount(&server)
    .await;
    expect_post(VERIFICATIONS, &[("To", TO), ("Channel", "call")])
        .respond_with(reply(201, "verification_created.json"))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(verify(&server));
    let mut sms = outgoing(Challenge::Pin);
    sms.locale = Some("it".into());
    let d = p.send(&sms).await.unwrap();
    assert_eq!(d.code, DeliveredCode::ProviderChecks);
    assert_eq!(d.provider_ref.as_deref(), Some(VERIFICATION_SID));
    assert!(!d.sender.is_empty());
    let d = p.send(&outgoing(Challenge::Voice)).await.unwrap();
    assert_eq!(d.code, DeliveredCode::ProviderChecks);
}

#[tokio::test]
async fn verify_retries_without_a_locale_it_refuses() {
    let server = MockServer::start().await;
    expect_post(
        VERIFICATIONS,
        &[("To", TO), ("Channel", "sms"), ("Locale", "eo")],
    )
    .respond_with(reply(400, "error_60200_invalid_locale.json"))
    .expect(1)
    .mount(&server)
    .await;
    expect_post(VERIFICATIONS, &[("To", TO), ("Channel", "sms")])
        .respond_with(reply(201, "verification_created.json"))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = outgoing(Challenge::Pin);
    m.locale = Some("eo".into());
    let d = provider(verify(&server)).send(&m).await.unwrap();
    assert_eq!(d.provider_ref.as_deref(), Some(VERIFICATION_SID));
}

#[tokio::test]
async fn verify_check_approves_the_right_code() {
    let server = MockServer::start().await;
    expect_post(
        VERIFICATION_CHECK,
        &[("VerificationSid", VERIFICATION_SID), ("Code", "123456")],
    )
    .respond_with(reply(201, "verification_check_approved.json"))
    .expect(1)
    .mount(&server)
    .await;
    assert!(
        provider(verify(&server))
            .check(VERIFICATION_SID, "123456")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn verify_check_refuses_a_wrong_code() {
    let server = MockServer::start().await;
    expect_post(
        VERIFICATION_CHECK,
        &[("VerificationSid", VERIFICATION_SID), ("Code", "000000")],
    )
    .respond_with(reply(200, "verification_check_pending.json"))
    .expect(1)
    .mount(&server)
    .await;
    assert!(
        !provider(verify(&server))
            .check(VERIFICATION_SID, "000000")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn verify_check_of_a_gone_or_exhausted_verification_is_false() {
    let server = MockServer::start().await;
    expect_post(
        VERIFICATION_CHECK,
        &[("VerificationSid", VERIFICATION_SID), ("Code", "111111")],
    )
    .respond_with(reply(404, "error_20404_verification_not_found.json"))
    .expect(1)
    .mount(&server)
    .await;
    expect_post(
        VERIFICATION_CHECK,
        &[("VerificationSid", VERIFICATION_SID), ("Code", "222222")],
    )
    .respond_with(reply(429, "error_60202_max_check_attempts.json"))
    .expect(1)
    .mount(&server)
    .await;
    let p = provider(verify(&server));
    assert!(!p.check(VERIFICATION_SID, "111111").await.unwrap());
    assert!(!p.check(VERIFICATION_SID, "222222").await.unwrap());
    // Codes Verify could never have generated are refused without spending an attempt.
    assert!(!p.check(VERIFICATION_SID, "12").await.unwrap());
    assert!(!p.check(VERIFICATION_SID, "12 34 56").await.unwrap());
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn verify_check_outage_is_transient() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(VERIFICATION_CHECK))
        .respond_with(reply(500, "error_20500_internal.json"))
        .mount(&server)
        .await;
    let e = provider(verify(&server))
        .check(VERIFICATION_SID, "123456")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
}

// ---------------------------------------------------------------------------------------------
// Errors

async fn sms_error(status: u16, fixture_name: &str, to: &str) -> ProviderError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(header("authorization", BASIC))
        .respond_with(reply(status, fixture_name))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = outgoing(Challenge::Pin);
    m.to = to.into();
    let e = provider(messaging(&server)).send(&m).await.unwrap_err();
    assert_eq!(e.provider, "twilio");
    assert_clean(&e, to);
    e
}

async fn verify_error(status: u16, fixture_name: &str, to: &str) -> ProviderError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(VERIFICATIONS))
        .and(header("authorization", BASIC))
        .respond_with(reply(status, fixture_name))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = outgoing(Challenge::Pin);
    m.to = to.into();
    let e = provider(verify(&server)).send(&m).await.unwrap_err();
    assert_clean(&e, to);
    e
}

#[tokio::test]
async fn invalid_numbers_are_reported_as_such_without_the_number() {
    // Twilio quotes the number in its message: it must be masked.
    let e = sms_error(400, "error_21211_invalid_to.json", "+15005550001").await;
    assert_eq!(e.kind, ErrorKind::InvalidNumber);
    assert!(e.message.contains("21211"), "{e}");
    assert!(e.message.contains("not a valid phone number"), "{e}");
    let e = verify_error(400, "error_60200_invalid_to.json", "+15005550001").await;
    assert_eq!(e.kind, ErrorKind::InvalidNumber);
    // 60200 naming another parameter is a configuration problem, not the user's number.
    let e = verify_error(400, "error_60200_invalid_locale.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Permanent);
}

#[tokio::test]
async fn refused_destinations_are_blocked() {
    let e = sms_error(400, "error_21408_no_permission.json", "+15005550003").await;
    assert_eq!(e.kind, ErrorKind::Blocked);
    assert!(e.message.contains("21408"), "{e}");
    let e = sms_error(400, "error_21610_unsubscribed.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Blocked);
    let e = verify_error(403, "error_60605_blocked.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Blocked);
}

#[tokio::test]
async fn rate_limits_and_outages_are_transient() {
    let e = sms_error(429, "error_20429_too_many_requests.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Transient);
    let e = verify_error(429, "error_60203_max_send_attempts.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Transient);
    let e = sms_error(500, "error_20500_internal.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Transient);

    // A 503 with a body that is not Twilio's JSON (a load balancer's page) is transient too.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(503).set_body_string("<html>Service Unavailable</html>"),
        )
        .mount(&server)
        .await;
    let e = provider(messaging(&server))
        .send(&outgoing(Challenge::Pin))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
}

#[tokio::test]
async fn refused_credentials_are_permanent_and_not_echoed() {
    let e = sms_error(401, "error_20003_authenticate.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("credentials refused"), "{e}");
    let e = verify_error(401, "error_20003_authenticate.json", TO).await;
    assert_eq!(e.kind, ErrorKind::Permanent);
}

#[tokio::test]
async fn a_slow_twilio_times_out_as_transient() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(reply(201, "message_created.json").set_delay(Duration::from_secs(3)))
        .mount(&server)
        .await;
    let p = provider(TwilioConfig {
        timeout_seconds: Some(1),
        ..messaging(&server)
    });
    let started = std::time::Instant::now();
    let e = p.send(&outgoing(Challenge::Pin)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(started.elapsed() < Duration::from_millis(2900));
    assert_clean(&e, TO);
}

#[tokio::test]
async fn an_unreachable_twilio_is_transient() {
    // Bind then drop a listener: nothing answers on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = MockServer::start().await;
    let p = provider(TwilioConfig {
        base_url: Some(format!("http://127.0.0.1:{port}")),
        ..messaging(&server)
    });
    let e = p.send(&outgoing(Challenge::Pin)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
    assert_clean(&e, TO);
}

// ---------------------------------------------------------------------------------------------
// Receipts (status callbacks)

#[test]
fn signature_matches_twilios_documented_example() {
    let params: Vec<(String, String)> = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(
        request_signature(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &params
        ),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
    // The order in which parameters arrive does not matter.
    let mut reversed = params.clone();
    reversed.reverse();
    assert_eq!(
        request_signature(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &reversed
        ),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
}

fn receipt_provider(token: &str) -> TwilioProvider {
    provider(TwilioConfig {
        name: "twilio".into(),
        account_sid: ACCOUNT.into(),
        auth_token: Credential::Value(Secret::new(token)),
        mode: TwilioMode::Messaging,
        from: Some(FROM.into()),
        messaging_service_sid: None,
        verify_service_sid: None,
        challenges: None,
        base_url: None,
        status_callback: Some(CALLBACK.into()),
        timeout_seconds: None,
    })
}

fn headers(signature: Option<&str>) -> Vec<(String, String)> {
    let mut h = vec![(
        "content-type".to_owned(),
        "application/x-www-form-urlencoded".to_owned(),
    )];
    if let Some(s) = signature {
        h.push(("x-twilio-signature".to_owned(), s.to_owned()));
    }
    h
}

#[test]
fn status_callbacks_are_authenticated_and_mapped() {
    let cases: Value = serde_json::from_str(&fixture("status_callbacks.json")).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let p = receipt_provider(case["auth_token"].as_str().unwrap());
        let url = case["url"].as_str().unwrap();
        let body = case["body"].as_str().unwrap().as_bytes();
        let method = case["method"].as_str().unwrap();
        let signature = case["signature"].as_str().unwrap();
        let h = headers(Some(signature));
        let request = ReceiptRequest {
            method,
            url,
            headers: &h,
            body,
        };
        let result = p.parse_receipt(&request);
        if case["expect"]["malformed"] == Value::Bool(true) {
            // Authentic (else it would be Unauthenticated) but not a status callback.
            assert!(
                matches!(result, Err(ReceiptError::Malformed(_))),
                "{name}: {result:?}"
            );
        } else {
            let receipt = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                receipt.provider_ref,
                case["expect"]["provider_ref"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                receipt.state.as_str(),
                case["expect"]["state"].as_str().unwrap(),
                "{name}"
            );
        }

        // Missing, wrong or foreign signatures, and tampered bodies, are all refused.
        let unauthenticated = |headers: &[(String, String)], url: &str, body: &[u8]| {
            let r = ReceiptRequest {
                method,
                url,
                headers,
                body,
            };
            assert_eq!(
                p.parse_receipt(&r),
                Err(ReceiptError::Unauthenticated),
                "{name}"
            );
        };
        unauthenticated(&headers(None), url, body);
        unauthenticated(&headers(Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA=")), url, body);
        unauthenticated(&headers(Some("not base64!")), url, body);
        unauthenticated(&headers(Some(&signature[..signature.len() - 4])), url, body);
        let other_token = receipt_provider("another-token");
        let r = ReceiptRequest {
            method,
            url,
            headers: &h,
            body,
        };
        assert_eq!(
            other_token.parse_receipt(&r),
            Err(ReceiptError::Unauthenticated),
            "{name}"
        );
        if method == "POST" {
            let mut tampered = body.to_vec();
            tampered.extend_from_slice(b"&Extra=1");
            unauthenticated(&h, url, &tampered);
        } else {
            unauthenticated(&h, &format!("{url}&Extra=1"), body);
        }
    }
}

#[test]
fn status_callback_states() {
    let p = receipt_provider(TOKEN);
    let expectations = [
        (
            "MessageSid",
            "MessageStatus",
            "delivered",
            DeliveryState::Delivered,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "failed",
            DeliveryState::Failed,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "undelivered",
            DeliveryState::Failed,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "queued",
            DeliveryState::Pending,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "sending",
            DeliveryState::Pending,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "sent",
            DeliveryState::Pending,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "accepted",
            DeliveryState::Pending,
        ),
        (
            "MessageSid",
            "MessageStatus",
            "scheduled",
            DeliveryState::Pending,
        ),
        (
            "CallSid",
            "CallStatus",
            "completed",
            DeliveryState::Delivered,
        ),
        ("CallSid", "CallStatus", "busy", DeliveryState::Failed),
        ("CallSid", "CallStatus", "failed", DeliveryState::Failed),
        ("CallSid", "CallStatus", "no-answer", DeliveryState::Failed),
        ("CallSid", "CallStatus", "canceled", DeliveryState::Failed),
        ("CallSid", "CallStatus", "queued", DeliveryState::Pending),
        ("CallSid", "CallStatus", "ringing", DeliveryState::Pending),
        (
            "CallSid",
            "CallStatus",
            "in-progress",
            DeliveryState::Pending,
        ),
    ];
    for (sid_name, status_name, status, state) in expectations {
        let params = vec![
            (sid_name.to_owned(), "XX0123".to_owned()),
            (status_name.to_owned(), status.to_owned()),
        ];
        let body = serde_urlencoded::to_string(&params).unwrap();
        let h = headers(Some(&request_signature(TOKEN, CALLBACK, &params)));
        let r = ReceiptRequest {
            method: "POST",
            url: CALLBACK,
            headers: &h,
            body: body.as_bytes(),
        };
        let receipt = p.parse_receipt(&r).unwrap();
        assert_eq!(receipt.state, state, "{status}");
        assert_eq!(receipt.provider_ref, "XX0123");
    }
    // Authentic but neither kind of status callback.
    let params = vec![("Foo".to_owned(), "bar".to_owned())];
    let h = headers(Some(&request_signature(TOKEN, CALLBACK, &params)));
    let r = ReceiptRequest {
        method: "POST",
        url: CALLBACK,
        headers: &h,
        body: b"Foo=bar",
    };
    assert!(matches!(
        p.parse_receipt(&r),
        Err(ReceiptError::Malformed(_))
    ));
}

#[test]
fn the_configured_callback_url_is_what_is_signed() {
    // Behind a proxy the receipts endpoint may see another URL than the one Twilio called; the
    // configured status_callback is checked as well.
    let p = receipt_provider(TOKEN);
    let params = vec![
        ("MessageSid".to_owned(), "SM1".to_owned()),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
    ];
    let h = headers(Some(&request_signature(TOKEN, CALLBACK, &params)));
    let r = ReceiptRequest {
        method: "POST",
        url: "http://10.0.0.5:8080/receipts/twilio",
        headers: &h,
        body: b"MessageSid=SM1&MessageStatus=delivered",
    };
    assert_eq!(p.parse_receipt(&r).unwrap().state, DeliveryState::Delivered);
    // A signature for some other URL is not accepted.
    let h = headers(Some(&request_signature(
        TOKEN,
        "https://evil.example/receipts/twilio",
        &params,
    )));
    let r = ReceiptRequest {
        method: "POST",
        url: "http://10.0.0.5:8080/receipts/twilio",
        headers: &h,
        body: b"MessageSid=SM1&MessageStatus=delivered",
    };
    assert_eq!(p.parse_receipt(&r), Err(ReceiptError::Unauthenticated));
}

// ---------------------------------------------------------------------------------------------
// The requests against Twilio's OpenAPI descriptions

/// The request bodies of the operations we call, extracted from Twilio's OpenAPI description
/// into `tests/fixtures/twilio/spec/` (see the README there).
fn spec(file: &str) -> Option<Value> {
    let path = format!(
        "{}/tests/fixtures/twilio/spec/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Some(serde_json::from_str(&text).expect("spec JSON"))
}

/// The declared and required form fields of the POST operation on `spec_path`.
fn request_schema(spec: &Value, spec_path: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let schema = &spec["paths"][spec_path]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
        ["schema"];
    let declared: BTreeSet<String> = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no request schema for {spec_path}"))
        .keys()
        .cloned()
        .collect();
    let required = schema["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (declared, required)
}

#[tokio::test]
async fn every_form_field_sent_is_declared_in_the_openapi_description() {
    let (Some(api), Some(verify_spec)) =
        (spec("twilio_api_v2010.json"), spec("twilio_verify_v2.json"))
    else {
        return;
    };
    let server = MockServer::start().await;
    for (at, body) in [
        (MESSAGES, "message_created.json"),
        (CALLS, "call_created.json"),
        (VERIFICATIONS, "verification_created.json"),
        (VERIFICATION_CHECK, "verification_check_approved.json"),
    ] {
        Mock::given(method("POST"))
            .and(path(at))
            .respond_with(reply(201, body))
            .mount(&server)
            .await;
    }
    let messaging_provider = provider(messaging(&server));
    let service_provider = provider(TwilioConfig {
        messaging_service_sid: Some(MESSAGING_SERVICE.into()),
        ..messaging(&server)
    });
    let verify_provider = provider(verify(&server));
    messaging_provider
        .send(&outgoing(Challenge::Pin))
        .await
        .unwrap();
    service_provider
        .send(&outgoing(Challenge::Pin))
        .await
        .unwrap();
    messaging_provider
        .send(&outgoing(Challenge::Voice))
        .await
        .unwrap();
    let mut localised = outgoing(Challenge::Pin);
    localised.locale = Some("pt-BR".into());
    verify_provider.send(&localised).await.unwrap();
    verify_provider
        .send(&outgoing(Challenge::Voice))
        .await
        .unwrap();
    assert!(
        verify_provider
            .check(VERIFICATION_SID, "123456")
            .await
            .unwrap()
    );

    let operations = [
        (
            MESSAGES,
            &api,
            "/2010-04-01/Accounts/{AccountSid}/Messages.json",
        ),
        (CALLS, &api, "/2010-04-01/Accounts/{AccountSid}/Calls.json"),
        (
            VERIFICATIONS,
            &verify_spec,
            "/v2/Services/{ServiceSid}/Verifications",
        ),
        (
            VERIFICATION_CHECK,
            &verify_spec,
            "/v2/Services/{ServiceSid}/VerificationCheck",
        ),
    ];
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 6);
    let mut seen = BTreeSet::new();
    for request in &requests {
        let (_, spec, spec_path) = operations
            .iter()
            .find(|(at, _, _)| request.url.path() == *at)
            .unwrap_or_else(|| panic!("unexpected request to {}", request.url));
        seen.insert(*spec_path);
        let (declared, required) = request_schema(spec, spec_path);
        let sent: BTreeSet<String> = parse_form(request).into_iter().map(|(k, _)| k).collect();
        let undeclared: Vec<_> = sent.difference(&declared).collect();
        assert!(
            undeclared.is_empty(),
            "{spec_path}: fields {undeclared:?} are not in the request schema"
        );
        let missing: Vec<_> = required.difference(&sent).collect();
        assert!(
            missing.is_empty(),
            "{spec_path}: required {missing:?} not sent"
        );
        // Each operation names its server and authenticates with HTTP Basic.
        let operation = &spec["paths"][*spec_path];
        assert_eq!(
            operation["post"]["security"][0]["accountSid_authToken"],
            serde_json::json!([])
        );
    }
    assert_eq!(seen.len(), 4, "every operation exercised");

    // The defaults point at the servers the descriptions name.
    assert_eq!(
        api["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["servers"][0]["url"],
        registrar_providers::twilio::DEFAULT_API_BASE
    );
    assert_eq!(
        verify_spec["paths"]["/v2/Services/{ServiceSid}/Verifications"]["servers"][0]["url"],
        registrar_providers::twilio::DEFAULT_VERIFY_BASE
    );
    // The operation's documented ValidityPeriod range, which the provider relies on.
    let validity = api["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["post"]
        ["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]["properties"]
        ["ValidityPeriod"]["description"]
        .as_str()
        .unwrap();
    assert!(validity.contains("`1` to `36000`"), "{validity}");
}

#[tokio::test]
async fn only_the_messaging_mode_sends_our_code() {
    let server = MockServer::start().await;
    let messaging = provider(messaging(&server));
    let verify = provider(verify(&server));
    for c in [Challenge::Pin, Challenge::Voice] {
        assert!(messaging.sends_our_code(c));
        assert!(
            !verify.sends_our_code(c),
            "Verify chooses and checks its code"
        );
    }
}
