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
