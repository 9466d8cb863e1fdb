//! The CheckMobi provider against a wiremock server answering with bodies transcribed from
//! CheckMobi's API reference and SDKs (`tests/fixtures/checkmobi/`, sources and unconfirmed
//! shapes in its README).

use std::time::Duration;

use registrar_providers::checkmobi::{
    CheckMobiConfig, CheckMobiProvider, DEFAULT_BASE_URL, UNKNOWN_CALLER_MASK,
};
use registrar_providers::{
    Challenge, Credential, DeliveredCode, DeliveryState, ErrorKind, Outgoing, Provider,
    ReceiptError, ReceiptRequest, Secret,
};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET_KEY: &str = "CHECKMOBI-SECRET-5f1c2e9a";
const TOKEN: &str = "cb-token-7d1e0a3b9c";
const REQUEST_PATH: &str = "/v1/validation/request";
const VERIFY_PATH: &str = "/v1/validation/verify";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/checkmobi/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn config(base_url: &str) -> CheckMobiConfig {
    CheckMobiConfig {
        name: "checkmobi".into(),
        secret_key: Credential::Value(Secret::new(SECRET_KEY)),
        base_url: base_url.into(),
        challenges: vec![Challenge::MissedCall, Challenge::Pin, Challenge::Voice],
        timeout_seconds: Some(5),
        platform: None,
        sender: None,
        status_callback: None,
        callback_token: None,
    }
}

fn outgoing(challenge: Challenge) -> Outgoing {
    Outgoing {
        to: "+447700900000".into(),
        challenge,
        code: "1234".into(),
        text: "Your Kontalk code: 1234".into(),
        reference: "ver-01HZX".into(),
        valid_for: Duration::from_secs(600),
        locale: Some("en".into()),
    }
}

async fn answer(server: &MockServer, at: &str, status: u16, body: String) {
    Mock::given(method("POST"))
        .and(path(at))
        .and(header("authorization", SECRET_KEY))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(status).set_body_raw(body, "application/json"))
        .mount(server)
        .await;
}

/// The JSON bodies the server received, after checking each one's method, path and key.
async fn bodies(server: &MockServer, at: &str) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r.method.as_str(), "POST");
            assert_eq!(r.url.path(), at);
            let auth: Vec<_> = r.headers.get_all("authorization").iter().collect();
            assert_eq!(auth.len(), 1);
            assert_eq!(auth[0].to_str().unwrap(), SECRET_KEY);
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn missed_call_requests_reverse_cli_and_masks_the_caller() {
    let server = MockServer::start().await;
    answer(
        &server,
        REQUEST_PATH,
        200,
        fixture("validation-request-reverse-cli-masked.json"),
    )
    .await;
    let mut c = config(&server.uri());
    c.platform = Some("android".into());
    let p = CheckMobiProvider::new(c).unwrap();
    let d = p.send(&outgoing(Challenge::MissedCall)).await.unwrap();
    assert_eq!(d.sender, "+44-7xxx????");
    assert_eq!(d.code, DeliveredCode::ProviderChecks);
    assert_eq!(
        d.provider_ref.as_deref(),
        Some("RCLI-C4F2A9D6E1B0F3A7C5D8E2F1A0B9C3D4")
    );
    assert_eq!(
        bodies(&server, REQUEST_PATH).await,
        [json!({"number": "+447700900000", "type": "reverse_cli", "platform": "android"})]
    );
}

#[tokio::test]
async fn every_shape_of_caller_information_gives_a_mask() {
    let cases = [
        (
            "validation-request-reverse-cli-full-number.json",
            "+44203807????",
            DeliveredCode::Chosen("9421".into()),
        ),
        (
            "validation-request-reverse-cli-prefix.json",
            "+4420380????",
            DeliveredCode::ProviderChecks,
        ),
        (
            "validation-request-reverse-cli-sdk-sample.json",
            UNKNOWN_CALLER_MASK,
            DeliveredCode::ProviderChecks,
        ),
    ];
    for (name, sender, code) in cases {
        let server = MockServer::start().await;
        answer(&server, REQUEST_PATH, 200, fixture(name)).await;
        let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
        let d = p.send(&outgoing(Challenge::MissedCall)).await.unwrap();
        assert_eq!(d.sender, sender, "{name}");
        assert_eq!(d.code, code, "{name}");
        assert!(d.sender.ends_with("????"));
        let body = &bodies(&server, REQUEST_PATH).await[0];
        assert_eq!(
            body,
            &json!({"number": "+447700900000", "type": "reverse_cli"})
        );
    }
}

#[tokio::test]
async fn pin_and_voice_use_sms_and_ivr_never_cli() {
    let server = MockServer::start().await;
    answer(
        &server,
        REQUEST_PATH,
        200,
        fixture("validation-request-sms.json"),
    )
    .await;
    let mut c = config(&server.uri());
    c.sender = Some("Kontalk".into());
    let p = CheckMobiProvider::new(c).unwrap();
    let d = p.send(&outgoing(Challenge::Pin)).await.unwrap();
    assert_eq!(d.sender, "Kontalk");
    assert_eq!(d.code, DeliveredCode::ProviderChecks);
    assert_eq!(
        d.provider_ref.as_deref(),
        Some("SMS-E2F1A0B9C3D4C4F2A9D6E1B0F3A7C5D8")
    );
    p.send(&outgoing(Challenge::Voice)).await.unwrap();
    p.send(&outgoing(Challenge::MissedCall)).await.unwrap();
    let sent = bodies(&server, REQUEST_PATH).await;
    assert_eq!(
        sent,
        [
            json!({"number": "+447700900000", "type": "sms"}),
            json!({"number": "+447700900000", "type": "ivr"}),
            json!({"number": "+447700900000", "type": "reverse_cli"}),
        ]
    );
    assert!(sent.iter().all(|b| b["type"] != "cli"));
    // The default sender.
    let server = MockServer::start().await;
    answer(
        &server,
        REQUEST_PATH,
        200,
        fixture("validation-request-ivr.json"),
    )
    .await;
    let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
    let d = p.send(&outgoing(Challenge::Voice)).await.unwrap();
    assert_eq!(d.sender, "CheckMobi");
}

#[tokio::test]
async fn the_callback_url_carries_the_token() {
    let server = MockServer::start().await;
    answer(
        &server,
        REQUEST_PATH,
        200,
        fixture("validation-request-sms.json"),
    )
    .await;
    let mut c = config(&server.uri());
    c.status_callback = Some("https://registrar.example/receipts/checkmobi".into());
    c.callback_token = Some(Credential::Value(Secret::new(TOKEN)));
    let p = CheckMobiProvider::new(c).unwrap();
    p.send(&outgoing(Challenge::Pin)).await.unwrap();
    assert_eq!(
        bodies(&server, REQUEST_PATH).await,
        [json!({
            "number": "+447700900000",
            "type": "sms",
            "notification_callback": format!("https://registrar.example/receipts/checkmobi?token={TOKEN}"),
        })]
    );
}

#[tokio::test]
async fn error_bodies_map_to_kinds() {
    let cases = [
        (
            400,
            "error-invalid-phone-number.json",
            ErrorKind::InvalidNumber,
        ),
        (
            400,
            "error-not-available-in-region.json",
            ErrorKind::Blocked,
        ),
        (
            400,
            "error-invalid-validation-type.json",
            ErrorKind::Unsupported,
        ),
        (401, "error-invalid-api-key.json", ErrorKind::Permanent),
        (403, "error-invalid-api-key.json", ErrorKind::Permanent),
        // A 200 carrying an error body is still an error.
        (
            200,
            "error-invalid-phone-number.json",
            ErrorKind::InvalidNumber,
        ),
        // 429 and 5xx are transient whatever the body says.
        (429, "error-invalid-phone-number.json", ErrorKind::Transient),
        (500, "error-invalid-api-key.json", ErrorKind::Transient),
    ];
    for (status, name, kind) in cases {
        let server = MockServer::start().await;
        answer(&server, REQUEST_PATH, status, fixture(name)).await;
        let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
        let e = p.send(&outgoing(Challenge::MissedCall)).await.unwrap_err();
        assert_eq!(e.kind, kind, "HTTP {status} {name}: {e}");
        let text = e.to_string();
        assert!(
            !text.contains(SECRET_KEY) && !text.contains("7700900000"),
            "{text}"
        );
    }
    for status in [502, 503] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(REQUEST_PATH))
            .respond_with(ResponseTemplate::new(status).set_body_string("<html>down</html>"))
            .mount(&server)
            .await;
        let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
        let e = p.send(&outgoing(Challenge::Pin)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "HTTP {status}");
    }
    // An answer without an id is not a delivery.
    let server = MockServer::start().await;
    answer(&server, REQUEST_PATH, 200, "{}".into()).await;
    let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
    let e = p.send(&outgoing(Challenge::Pin)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
}

#[tokio::test]
async fn a_slow_api_times_out_as_transient() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(REQUEST_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(fixture("validation-request-sms.json"), "application/json")
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let mut c = config(&server.uri());
    c.timeout_seconds = Some(1);
    let p = CheckMobiProvider::new(c).unwrap();
    let started = std::time::Instant::now();
    let e = p.send(&outgoing(Challenge::Pin)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(started.elapsed() < Duration::from_millis(2500));
}

#[tokio::test]
async fn check_asks_validation_verify() {
    let cases = [
        (200, "validation-verify-validated.json", Some(true)),
        (200, "validation-verify-not-validated.json", Some(false)),
        // An unknown or expired validation id: the code cannot be right.
        (400, "error-invalid-request-id.json", Some(false)),
        (401, "error-invalid-api-key.json", None),
    ];
    for (status, name, expected) in cases {
        let server = MockServer::start().await;
        answer(&server, VERIFY_PATH, status, fixture(name)).await;
        let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
        let got = p
            .check("RCLI-C4F2A9D6E1B0F3A7C5D8E2F1A0B9C3D4", "9421")
            .await;
        match expected {
            Some(v) => assert_eq!(got.unwrap(), v, "{name}"),
            None => assert_eq!(got.unwrap_err().kind, ErrorKind::Permanent, "{name}"),
        }
        assert_eq!(
            bodies(&server, VERIFY_PATH).await,
            [json!({"id": "RCLI-C4F2A9D6E1B0F3A7C5D8E2F1A0B9C3D4", "pin": "9421"})]
        );
    }
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(VERIFY_PATH))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let p = CheckMobiProvider::new(config(&server.uri())).unwrap();
    let e = p.check("x", "1234").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
}

// ---- Status callbacks ----

fn receipt_provider(token: Option<&str>) -> CheckMobiProvider {
    let mut c = config("http://127.0.0.1:9");
    if let Some(t) = token {
        c.callback_token = Some(Credential::Value(Secret::new(t)));
        c.status_callback = Some("https://registrar.example/receipts/checkmobi".into());
    }
    CheckMobiProvider::new(c).unwrap()
}

fn post(
    p: &CheckMobiProvider,
    url: &str,
    body: &str,
) -> Result<(String, DeliveryState), ReceiptError> {
    let headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    p.parse_receipt(&ReceiptRequest {
        method: "POST",
        url,
        headers: &headers,
        body: body.as_bytes(),
    })
    .map(|r| (r.provider_ref, r.state))
}

#[test]
fn callbacks_need_the_token() {
    let url = format!("https://registrar.example/receipts/checkmobi?token={TOKEN}");
    let p = receipt_provider(Some(TOKEN));
    assert_eq!(
        post(&p, &url, &fixture("callback-validated.json")),
        Ok((
            "RCLI-C4F2A9D6E1B0F3A7C5D8E2F1A0B9C3D4".into(),
            DeliveryState::Delivered
        ))
    );
    let body = fixture("callback-failed.json");
    for bad in [
        "https://registrar.example/receipts/checkmobi".to_owned(),
        "https://registrar.example/receipts/checkmobi?token=".to_owned(),
        "https://registrar.example/receipts/checkmobi?token=cb-token-7d1e0a3b9d".to_owned(),
        format!("https://registrar.example/receipts/checkmobi?token={TOKEN}x"),
        format!("https://registrar.example/receipts/checkmobi?token={TOKEN}&token=evil"),
        format!("https://registrar.example/receipts/checkmobi?tok={TOKEN}"),
    ] {
        assert_eq!(
            post(&p, &bad, &body),
            Err(ReceiptError::Unauthenticated),
            "{bad}"
        );
    }
    // Without a configured token nothing is accepted.
    let open = receipt_provider(None);
    assert_eq!(post(&open, &url, &body), Err(ReceiptError::Unauthenticated));
    // Authenticated but shapeless.
    assert!(matches!(
        post(&p, &url, "{\"status\": \"delivered\"}"),
        Err(ReceiptError::Malformed(_))
    ));
    assert!(matches!(
        post(&p, &url, ""),
        Err(ReceiptError::Malformed(_))
    ));
}

#[test]
fn callback_statuses_map_to_states() {
    let url = format!("https://registrar.example/receipts/checkmobi?token={TOKEN}&x=1");
    let p = receipt_provider(Some(TOKEN));
    let cases = [
        ("callback-validated.json", DeliveryState::Delivered),
        ("callback-delivered.json", DeliveryState::Delivered),
        ("callback-failed.json", DeliveryState::Failed),
    ];
    for (name, state) in cases {
        assert_eq!(
            post(&p, &url, &fixture(name)).map(|r| r.1),
            Ok(state),
            "{name}"
        );
    }
    for (status, state) in [
        ("expired", DeliveryState::Failed),
        ("rejected", DeliveryState::Failed),
        ("queued", DeliveryState::Pending),
        ("ringing", DeliveryState::Pending),
    ] {
        let body = json!({"id": "SMS-1", "status": status}).to_string();
        assert_eq!(post(&p, &url, &body).map(|r| r.1), Ok(state), "{status}");
    }
}

// ---- Configuration and secrets ----

#[tokio::test]
async fn secrets_never_show_in_debug_or_errors() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(REQUEST_PATH))
        .respond_with(
            ResponseTemplate::new(401).set_body_raw(
                json!({"code": 1, "error": format!("Invalid api key {SECRET_KEY} {TOKEN}")})
                    .to_string(),
                "application/json",
            ),
        )
        .mount(&server)
        .await;
    let mut c = config(&server.uri());
    c.callback_token = Some(Credential::Value(Secret::new(TOKEN)));
    c.status_callback = Some("https://registrar.example/receipts/checkmobi".into());
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(SECRET_KEY) && !debug.contains(TOKEN),
        "{debug}"
    );
    let p = CheckMobiProvider::new(c).unwrap();
    let debug = format!("{p:?}");
    assert!(
        !debug.contains(SECRET_KEY) && !debug.contains(TOKEN),
        "{debug}"
    );
    let e = p.send(&outgoing(Challenge::MissedCall)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(SECRET_KEY) && !text.contains(TOKEN),
        "{text}"
    );
}

#[test]
fn configuration_is_checked() {
    let parsed: CheckMobiConfig = serde_json::from_value(json!({
        "secret_key": {"env": "REGISTRAR_PROVIDERS_TEST_CHECKMOBI_UNSET"},
    }))
    .unwrap();
    assert_eq!(parsed.name, "checkmobi");
    assert_eq!(parsed.base_url, DEFAULT_BASE_URL);
    assert_eq!(parsed.challenges, [Challenge::MissedCall, Challenge::Pin]);
    let round: CheckMobiConfig =
        serde_json::from_value(serde_json::to_value(&parsed).unwrap()).unwrap();
    assert_eq!(round, parsed);
    let e = CheckMobiProvider::new(parsed).unwrap_err();
    assert!(
        e.contains("REGISTRAR_PROVIDERS_TEST_CHECKMOBI_UNSET"),
        "{e}"
    );
    assert!(
        serde_json::from_value::<CheckMobiConfig>(json!({"secret_key": "k", "typ": "cli"}))
            .is_err()
    );
    assert!(
        serde_json::from_value::<CheckMobiConfig>(
            json!({"secret_key": "k", "challenges": ["callerid"]})
        )
        .is_err()
    );

    let base = "http://127.0.0.1:9";
    let mut c = config(base);
    c.status_callback = Some("https://registrar.example/receipts/checkmobi".into());
    assert!(
        CheckMobiProvider::new(c)
            .unwrap_err()
            .contains("callback_token")
    );
    let mut c = config(base);
    c.challenges = vec![];
    assert!(
        CheckMobiProvider::new(c)
            .unwrap_err()
            .contains("challenges")
    );
    let mut c = config(base);
    c.timeout_seconds = Some(0);
    assert!(
        CheckMobiProvider::new(c)
            .unwrap_err()
            .contains("timeout_seconds")
    );
    let mut c = config(base);
    c.secret_key = Credential::Value(Secret::new(""));
    assert!(
        CheckMobiProvider::new(c)
            .unwrap_err()
            .contains("secret_key")
    );
    let mut c = config(base);
    c.challenges = vec![Challenge::MissedCall];
    let p = CheckMobiProvider::new(c).unwrap();
    assert_eq!(p.challenges(), [Challenge::MissedCall]);
    assert_eq!(p.name(), "checkmobi");
}

#[tokio::test]
async fn a_challenge_not_enabled_is_unsupported_without_a_call() {
    let server = MockServer::start().await;
    let mut c = config(&server.uri());
    c.challenges = vec![Challenge::MissedCall];
    let p = CheckMobiProvider::new(c).unwrap();
    let e = p.send(&outgoing(Challenge::Pin)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[test]
fn checkmobi_never_sends_our_code() {
    let p = CheckMobiProvider::new(config("http://127.0.0.1:9")).unwrap();
    for c in [Challenge::Pin, Challenge::Voice, Challenge::MissedCall] {
        assert!(
            !p.sends_our_code(c),
            "{c}: CheckMobi checks or chooses the code"
        );
    }
}
