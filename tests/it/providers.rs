//! Real providers inside the real service: a Twilio provider talking to a loopback stand-in of
//! Twilio's API (wiremock), and its signed status callback arriving at our receipts endpoint.

use std::sync::Arc;

use registrar_providers::Provider;
use registrar_providers::twilio::{TwilioConfig, TwilioProvider, request_signature};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::harness::*;

const SID: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "test-auth-token";

#[tokio::test]
async fn a_twilio_delivery_and_its_signed_receipt() {
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/2010-04-01/Accounts/{SID}/Messages.json")))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": "SM0123456789abcdef0123456789abcdef",
            "status": "queued"
        })))
        .expect(1)
        .mount(&twilio)
        .await;
    let [port] = free_ports();
    let public = format!("http://127.0.0.1:{port}");
    let callback = format!("{public}/v1/receipts/twilio");
    let config: TwilioConfig = serde_json::from_value(json!({
        "name": "twilio",
        "account_sid": SID,
        "auth_token": TOKEN,
        "mode": "messaging",
        "from": "+15005550006",
        "base_url": twilio.uri(),
        "status_callback": callback,
    }))
    .unwrap();
    let provider: Arc<dyn Provider> = Arc::new(TwilioProvider::new(config).unwrap());
    let s = TestServer::start_on(port, vec![provider], |c| {
        c.public_url = Some(public.clone())
    })
    .await;
    let r = s.start_verification(EMULATOR, false).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["sender"], "+15005550006");
    let id = r.body["id"].as_str().unwrap().to_owned();

    let params = vec![
        (
            "MessageSid".to_owned(),
            "SM0123456789abcdef0123456789abcdef".to_owned(),
        ),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
        ("AccountSid".to_owned(), SID.to_owned()),
    ];
    // Plain ASCII values: no form escaping needed.
    let body = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let post = |signature: String| {
        s.http
            .post(&callback)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(body.clone())
    };
    let forged = post(request_signature("not-the-token", &callback, &params))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["delivery"],
        json!(null)
    );
    let genuine = post(request_signature(TOKEN, &callback, &params))
        .send()
        .await
        .unwrap();
    assert_eq!(genuine.status(), 204);
    assert_eq!(
        s.get(&format!("/v1/verifications/{id}")).await.body["delivery"],
        "delivered"
    );
}

/// A forced re-registration replaces an account's key, so its code must be long and ours: a
/// missed call's caller number (CheckMobi's four digits) or a provider's own code never delivers
/// it. CheckMobi (a loopback stand-in answering as its API does) is routed first; it takes a new
/// number's missed call, and is skipped for the forced start's text message, which the next
/// provider sends with our ten-digit code.
#[tokio::test]
async fn forced_reregistrations_only_use_providers_that_send_our_code() {
    use registrar_providers::CapturingProvider;
    use registrar_providers::checkmobi::{CheckMobiConfig, CheckMobiProvider};
    let checkmobi = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/validation/request"))
        .respond_with(ResponseTemplate::new(200).set_body_string(include_str!(
            "../../providers/tests/fixtures/checkmobi/validation-request-reverse-cli-masked.json"
        )))
        .expect(1)
        .mount(&checkmobi)
        .await;
    let config: CheckMobiConfig = serde_json::from_value(json!({
        "name": "checkmobi",
        "secret_key": "test-secret-key",
        "base_url": checkmobi.uri(),
        "challenges": ["missedcall", "pin"],
    }))
    .unwrap();
    let capture = CapturingProvider::new("capture", "12345")
        .with_challenges(vec![registrar_providers::Challenge::Pin]);
    let providers: Vec<Arc<dyn Provider>> = vec![
        Arc::new(CheckMobiProvider::new(config).unwrap()),
        Arc::new(capture.clone()),
    ];
    let [port] = free_ports();
    let s = TestServer::start_on(port, providers, |_| {}).await;

    // A new account by missed call: CheckMobi's four digits are fine where no key is replaced.
    let r = s
        .post(
            "/v1/verifications",
            json!({"phone": EMULATOR, "challenge": "missedcall"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["code_length"], 4);
    assert_eq!(r.body["sender"], "+44-7xxx????");

    // The number gets an account (registered elsewhere, as far as this test goes).
    crate::harness::execute(
        &s.db_url,
        &format!(
            "INSERT INTO accounts (id, fingerprint, public_key, created_at, updated_at) \
             VALUES ('{EMULATOR_ACCOUNT}', 'AA', '', 0, 0)"
        ),
    )
    .await;
    // Forced, by missed call: nobody can deliver a long code that way.
    s.clock.advance(std::time::Duration::from_secs(601));
    let r = s
        .post(
            "/v1/verifications",
            json!({"phone": EMULATOR, "force": true, "challenge": "missedcall"}),
        )
        .await;
    assert_eq!(r.problem_type(), "no-provider", "{:?}", r.body);
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("10 digits") && detail.contains("pin"),
        "{detail}"
    );

    // Forced, by text message: CheckMobi (first for pin, but checking its own code) is skipped.
    let r = s.start_verification(EMULATOR, true).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["code_length"], 10);
    assert_eq!(r.body["sender"], "12345");
    let code = capture.last_code(EMULATOR).unwrap();
    assert_eq!(code.len(), 10);
    assert!(code.bytes().all(|b| b.is_ascii_digit()));
    let done = s
        .submit(
            r.body["id"].as_str().unwrap(),
            &code,
            &public(&user_key(&format!("{EMULATOR_ACCOUNT}@localhost"))),
        )
        .await;
    assert_eq!(done.status, 200, "{:?}", done.body);
}
