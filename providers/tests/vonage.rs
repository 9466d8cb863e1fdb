//! The Vonage provider against a wiremock server answering with bodies transcribed from Vonage's
//! OpenAPI files (`tests/fixtures/vonage/`, sources in its README). Every request field sent is
//! checked against the request schema of its operation in a copy of those files.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use registrar_providers::vonage::{SignatureMethod, VonageConfig, VonageMode, VonageProvider};
use registrar_providers::{
    Challenge, Credential, DeliveredCode, DeliveryState, ErrorKind, Outgoing, Provider,
    ReceiptError, ReceiptRequest, Secret,
};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const API_KEY: &str = "abcd1234";
const API_SECRET: &str = "Sup3rS3cr3t0123";
// The secret the signed fixtures were made with (sign_dlr.py).
const SIGNATURE_SECRET: &str = "test-signature-secret-0123456789";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/vonage/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn spec(name: &str) -> String {
    fixture(&format!("spec/{name}"))
}

fn config(mode: VonageMode, base_url: &str) -> VonageConfig {
    VonageConfig {
        name: "vonage".into(),
        api_key: API_KEY.into(),
        api_secret: Credential::Value(Secret::new(API_SECRET)),
        mode,
        from: match mode {
            VonageMode::Sms => Some("Kontalk".into()),
            VonageMode::Verify => None,
        },
        brand: None,
        signature_secret: None,
        signature_method: None,
        base_url: Some(base_url.into()),
        status_callback: None,
        timeout_seconds: Some(5),
        challenges: None,
    }
}

fn outgoing(challenge: Challenge, code: &str) -> Outgoing {
    Outgoing {
        to: "+447700900000".into(),
        challenge,
        code: code.into(),
        text: format!("Your Kontalk code: {code}"),
        reference: "ver-01HZX".into(),
        valid_for: Duration::from_secs(600),
        locale: None,
    }
}

fn json_response(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "application/json")
}

async fn mount(server: &MockServer, at: &str, body: String) {
    Mock::given(method("POST"))
        .and(path(at))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(json_response(body))
        .mount(server)
        .await;
}

/// The form fields of every request the server received, in order.
async fn forms(server: &MockServer) -> Vec<BTreeMap<String, String>> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&r.body).unwrap();
            let map: BTreeMap<String, String> = pairs.iter().cloned().collect();
            assert_eq!(map.len(), pairs.len(), "a field was sent twice");
            map
        })
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---- A minimal reader of the OpenAPI YAML files: enough to find an operation's path, its
// request schema, and that schema's properties. ----

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The full request path of `operation_id` with `{format}` = json: the server URL's path followed
/// by the operation's path key.
fn operation_path(spec: &str, operation_id: &str) -> String {
    let lines: Vec<&str> = spec.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("operationId: {operation_id}"))
        .unwrap_or_else(|| panic!("no operation {operation_id}"));
    // The path key is the nearest line above at indentation 2 under `paths:`.
    let key = lines[..at]
        .iter()
        .rev()
        .find(|l| indent(l) == 2 && l.trim_start().trim_start_matches('"').starts_with('/'))
        .unwrap();
    let key = key.trim().trim_end_matches(':').trim_matches('"');
    let server = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("- url: "))
        .unwrap()
        .trim_matches('"');
    let server_path = &server[server.find("://").unwrap() + 3..];
    let server_path = &server_path[server_path.find('/').unwrap_or(server_path.len())..];
    format!("{server_path}{}", key.replace("{format}", "json"))
}

/// The schema named by the operation's `requestBody`.
fn request_schema(spec: &str, operation_id: &str) -> String {
    let start = spec
        .find(&format!("operationId: {operation_id}"))
        .unwrap_or_else(|| panic!("no operation {operation_id}"));
    let rest = &spec[start..];
    let body = rest.find("requestBody:").unwrap();
    let r = &rest[body..];
    const PREFIX: &str = "$ref: \"#/components/schemas/";
    let reference = r.find(PREFIX).unwrap() + PREFIX.len();
    let end = r[reference..].find('"').unwrap();
    r[reference..reference + end].to_owned()
}

/// The lines of `components.schemas.<schema>` (indentation 4).
fn schema_block<'a>(spec: &'a str, schema: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = spec.lines().collect();
    let start = lines
        .iter()
        .position(|l| indent(l) == 4 && l.trim() == format!("{schema}:"))
        .unwrap_or_else(|| panic!("no schema {schema}"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > 4)
        .copied()
        .collect()
}

/// The property names of a schema, and the required ones.
fn schema_properties(spec: &str, schema: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let block = schema_block(spec, schema);
    let mut properties = BTreeSet::new();
    let mut required = BTreeSet::new();
    let mut section = "";
    for line in block {
        if line.trim().is_empty() {
            continue;
        }
        match (indent(line), line.trim()) {
            (6, "properties:") => section = "properties",
            (6, "required:") => section = "required",
            (6, _) => section = "",
            (8, t) if section == "properties" && t.ends_with(':') => {
                properties.insert(t.trim_end_matches(':').to_owned());
            }
            (8, t) if section == "required" && t.starts_with("- ") => {
                required.insert(t[2..].to_owned());
            }
            _ => {}
        }
    }
    (properties, required)
}

/// The lines of one property of a schema.
fn property_block<'a>(spec: &'a str, schema: &str, property: &str) -> Vec<&'a str> {
    let block = schema_block(spec, schema);
    let start = block
        .iter()
        .position(|l| indent(l) == 8 && l.trim() == format!("{property}:"))
        .unwrap_or_else(|| panic!("no property {schema}.{property}"));
    block[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > 8)
        .copied()
        .collect()
}

fn property_number(spec: &str, schema: &str, property: &str, key: &str) -> u64 {
    property_block(spec, schema, property)
        .iter()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {schema}.{property}"))
        .parse()
        .unwrap()
}

fn property_enum(spec: &str, schema: &str, property: &str) -> Vec<String> {
    property_block(spec, schema, property)
        .iter()
        .skip_while(|l| l.trim() != "enum:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .map(|v| v.trim_matches('"').to_owned())
        .collect()
}

/// Asserts that every field of `form` is a property of the operation's request schema and that
/// every required property is sent.
fn assert_declared(spec_text: &str, operation_id: &str, form: &BTreeMap<String, String>) {
    let schema = request_schema(spec_text, operation_id);
    let (properties, required) = schema_properties(spec_text, &schema);
    assert!(!properties.is_empty(), "no properties found for {schema}");
    for field in form.keys() {
        assert!(
            properties.contains(field),
            "{field} is not a property of {schema} ({properties:?})"
        );
    }
    for field in &required {
        assert!(
            form.contains_key(field),
            "required {schema}.{field} not sent"
        );
    }
}

#[test]
fn the_yaml_reader_reads_the_specs() {
    let sms = spec("sms.yml");
    assert_eq!(operation_path(&sms, "send-an-sms"), "/sms/json");
    assert_eq!(request_schema(&sms, "send-an-sms"), "NewMessage");
    let (props, required) = schema_properties(&sms, "NewMessage");
    assert!(props.contains("client-ref") && props.contains("ttl") && props.len() > 20);
    assert_eq!(required, ["api_key", "from", "to"].map(String::from).into());
    assert_eq!(
        property_number(&sms, "NewMessage", "ttl", "maximum"),
        604800000
    );
    let verify = spec("verify.yml");
    assert_eq!(operation_path(&verify, "verifyRequest"), "/verify/json");
    assert_eq!(operation_path(&verify, "verifyCheck"), "/verify/check/json");
    assert_eq!(request_schema(&verify, "verifyCheck"), "checkRequest");
    assert_eq!(
        property_enum(&verify, "verifyRequest", "code_length"),
        ["4", "6"]
    );
    assert_eq!(property_enum(&verify, "verifyRequest", "lg").len(), 39);
}

#[test]
fn the_declared_check_catches_undeclared_and_missing_fields() {
    let sms = spec("sms.yml");
    let ok = map(&[("api_key", "k"), ("from", "f"), ("to", "1234567")]);
    assert_declared(&sms, "send-an-sms", &ok);
    let mut undeclared = ok.clone();
    undeclared.insert("reference".into(), "x".into());
    assert!(
        std::panic::catch_unwind(|| assert_declared(&sms, "send-an-sms", &undeclared)).is_err()
    );
    let mut missing = ok.clone();
    missing.remove("to");
    assert!(std::panic::catch_unwind(|| assert_declared(&sms, "send-an-sms", &missing)).is_err());
    let verify = spec("verify.yml");
    let check = map(&[
        ("api_key", "k"),
        ("api_secret", "s"),
        ("request_id", "r"),
        ("pin", "1234"),
    ]);
    assert!(std::panic::catch_unwind(|| assert_declared(&verify, "verifyCheck", &check)).is_err());
}

// ---- SMS API ----

#[tokio::test]
async fn sms_sends_the_spec_fields_and_reads_the_message_id() {
    let server = MockServer::start().await;
    let sms_path = operation_path(&spec("sms.yml"), "send-an-sms");
    mount(&server, &sms_path, fixture("sms-send-success.json")).await;
    let mut c = config(VonageMode::Sms, &server.uri());
    c.status_callback = Some("https://registrar.example/receipts/vonage".into());
    let p = VonageProvider::new(c).unwrap();
    let d = p.send(&outgoing(Challenge::Pin, "123456")).await.unwrap();
    assert_eq!(d.sender, "Kontalk");
    assert_eq!(d.provider_ref.as_deref(), Some("0A0000000123ABCD1"));
    assert_eq!(d.code, DeliveredCode::Ours);
    let form = &forms(&server).await[0];
    assert_eq!(
        form,
        &map(&[
            ("api_key", API_KEY),
            ("api_secret", API_SECRET),
            ("from", "Kontalk"),
            ("to", "447700900000"),
            ("text", "Your Kontalk code: 123456"),
            ("ttl", "600000"),
            ("client-ref", "ver-01HZX"),
            ("callback", "https://registrar.example/receipts/vonage"),
        ])
    );
    assert_declared(&spec("sms.yml"), "send-an-sms", form);
}

#[tokio::test]
async fn sms_unicode_text_and_ttl_bounds_follow_the_spec() {
    let server = MockServer::start().await;
    mount(&server, "/sms/json", fixture("sms-send-success.json")).await;
    let p = VonageProvider::new(config(VonageMode::Sms, &server.uri())).unwrap();
    let mut m = outgoing(Challenge::Pin, "123456");
    m.text = "Il tuo codice Kontalk è 123456 — grazie".into();
    m.valid_for = Duration::from_secs(5);
    p.send(&m).await.unwrap();
    m.text = "Your code: 123456".into();
    m.valid_for = Duration::from_secs(30 * 86400);
    m.reference = "r".repeat(60);
    p.send(&m).await.unwrap();
    let sent = forms(&server).await;
    let sms = spec("sms.yml");
    let min = property_number(&sms, "NewMessage", "ttl", "minimum").to_string();
    let max = property_number(&sms, "NewMessage", "ttl", "maximum").to_string();
    assert_eq!(sent[0]["type"], "unicode");
    assert!(property_enum(&sms, "NewMessage", "type").contains(&sent[0]["type"]));
    assert_eq!(sent[0]["ttl"], min);
    assert!(!sent[1].contains_key("type"));
    assert_eq!(sent[1]["ttl"], max);
    assert_eq!(
        sent[1]["client-ref"].len(),
        40,
        "client-ref: up to 40 characters"
    );
    for form in &sent {
        assert_declared(&sms, "send-an-sms", form);
    }
}

#[tokio::test]
async fn sms_statuses_map_to_error_kinds() {
    let cases = [
        ("1", ErrorKind::Transient),
        ("2", ErrorKind::Permanent),
        ("4", ErrorKind::Permanent),
        ("5", ErrorKind::Transient),
        ("6", ErrorKind::InvalidNumber),
        ("7", ErrorKind::Blocked),
        ("29", ErrorKind::Blocked),
    ];
    for (status, kind) in cases {
        let server = MockServer::start().await;
        mount(
            &server,
            "/sms/json",
            fixture(&format!("sms-send-status-{status}.json")),
        )
        .await;
        let p = VonageProvider::new(config(VonageMode::Sms, &server.uri())).unwrap();
        let e = p
            .send(&outgoing(Challenge::Pin, "123456"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, kind, "status {status}: {e}");
        assert!(e.message.contains(&format!("status {status}")), "{e}");
        let text = e.to_string();
        assert!(
            !text.contains(API_SECRET) && !text.contains("7700900000"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn http_failures_and_timeouts_are_transient() {
    for status in [429, 500, 503] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/sms/json"))
            .respond_with(ResponseTemplate::new(status).set_body_string("busy"))
            .mount(&server)
            .await;
        let p = VonageProvider::new(config(VonageMode::Sms, &server.uri())).unwrap();
        let e = p
            .send(&outgoing(Challenge::Pin, "123456"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "HTTP {status}: {e}");
    }
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/json"))
        .respond_with(
            json_response(fixture("sms-send-success.json")).set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let mut c = config(VonageMode::Sms, &server.uri());
    c.timeout_seconds = Some(1);
    let p = VonageProvider::new(c).unwrap();
    let started = std::time::Instant::now();
    let e = p
        .send(&outgoing(Challenge::Pin, "123456"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(started.elapsed() < Duration::from_millis(2500));
    // Verify's check call too.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/verify/check/json"))
        .respond_with(ResponseTemplate::new(502))
        .mount(&server)
        .await;
    let p = VonageProvider::new(config(VonageMode::Verify, &server.uri())).unwrap();
    let e = p
        .check("abcdef0123456789abcdef0123456789", "1234")
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
}

#[tokio::test]
async fn a_garbled_answer_is_transient_and_does_not_leak_the_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/json"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>447700900000</html>"))
        .mount(&server)
        .await;
    let p = VonageProvider::new(config(VonageMode::Sms, &server.uri())).unwrap();
    let e = p
        .send(&outgoing(Challenge::Pin, "123456"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient);
    assert!(!e.message.contains("447700900000"), "{e}");
}

#[tokio::test]
async fn a_destination_vonage_cannot_take_is_refused_without_a_call() {
    let server = MockServer::start().await;
    mount(&server, "/sms/json", fixture("sms-send-success.json")).await;
    let p = VonageProvider::new(config(VonageMode::Sms, &server.uri())).unwrap();
    let mut m = outgoing(Challenge::Pin, "123456");
    m.to = "+44 7700 900000".into();
    let e = p.send(&m).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidNumber);
    let e = p
        .send(&outgoing(Challenge::Voice, "123456"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    let e = p.check("x", "1234").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(server.received_requests().await.unwrap().is_empty());
    assert_eq!(p.challenges(), [Challenge::Pin]);
}

// ---- Verify ----

#[tokio::test]
async fn verify_request_sends_the_spec_fields_and_keeps_the_request_id() {
    let server = MockServer::start().await;
    let verify = spec("verify.yml");
    mount(
        &server,
        &operation_path(&verify, "verifyRequest"),
        fixture("verify-request-success.json"),
    )
    .await;
    let p = VonageProvider::new(config(VonageMode::Verify, &server.uri())).unwrap();
    let mut m = outgoing(Challenge::Pin, "1234");
    m.locale = Some("it".into());
    let d = p.send(&m).await.unwrap();
    assert_eq!(d.code, DeliveredCode::ProviderChecks);
    assert_eq!(
        d.provider_ref.as_deref(),
        Some("abcdef0123456789abcdef0123456789")
    );
    assert_eq!(d.sender, "VERIFY");
    let form = &forms(&server).await[0];
    assert_eq!(
        form,
        &map(&[
            ("api_key", API_KEY),
            ("api_secret", API_SECRET),
            ("number", "447700900000"),
            ("brand", "Kontalk"),
            ("workflow_id", "6"),
            ("pin_expiry", "600"),
            ("next_event_wait", "600"),
            ("code_length", "4"),
            ("lg", "it-it"),
        ])
    );
    assert_declared(&verify, "verifyRequest", form);
}

#[tokio::test]
async fn verify_values_stay_within_the_spec() {
    let server = MockServer::start().await;
    mount(
        &server,
        "/verify/json",
        fixture("verify-request-success.json"),
    )
    .await;
    let mut c = config(VonageMode::Verify, &server.uri());
    c.challenges = Some(vec![Challenge::Pin, Challenge::Voice]);
    c.from = Some("Kontalk".into());
    c.brand = Some("Kontalk Test".into());
    let p = VonageProvider::new(c).unwrap();
    let mut m = outgoing(Challenge::Voice, "12345");
    m.valid_for = Duration::from_secs(10);
    m.locale = Some("pt-BR".into());
    let d = p.send(&m).await.unwrap();
    assert_eq!(d.sender, "Kontalk");
    let mut m = outgoing(Challenge::Pin, "654321");
    m.valid_for = Duration::from_secs(7200);
    m.locale = Some("tlh".into());
    p.send(&m).await.unwrap();
    let sent = forms(&server).await;
    let verify = spec("verify.yml");
    let workflows = property_enum(&verify, "verifyRequest", "workflow_id");
    let languages = property_enum(&verify, "verifyRequest", "lg");
    let lengths = property_enum(&verify, "verifyRequest", "code_length");
    let pin_min = property_number(&verify, "verifyRequest", "pin_expiry", "minimum");
    let pin_max = property_number(&verify, "verifyRequest", "pin_expiry", "maximum");
    let wait_min = property_number(&verify, "verifyRequest", "next_event_wait", "minimum");
    let wait_max = property_number(&verify, "verifyRequest", "next_event_wait", "maximum");
    assert_eq!(sent[0]["workflow_id"], "7", "voice: the TTS-only workflow");
    assert_eq!(sent[0]["sender_id"], "Kontalk");
    assert_eq!(sent[0]["brand"], "Kontalk Test");
    assert_eq!(sent[0]["lg"], "pt-br");
    assert!(
        !sent[0].contains_key("code_length"),
        "5 digits: not a Verify length"
    );
    assert_eq!(sent[0]["pin_expiry"], pin_min.to_string());
    assert_eq!(sent[1]["workflow_id"], "6");
    assert_eq!(sent[1]["code_length"], "6");
    assert!(!sent[1].contains_key("lg"));
    assert_eq!(sent[1]["next_event_wait"], wait_max.to_string());
    for form in &sent {
        assert_declared(&verify, "verifyRequest", form);
        assert!(workflows.contains(&form["workflow_id"]));
        if let Some(lg) = form.get("lg") {
            assert!(languages.contains(lg), "{lg}");
        }
        if let Some(n) = form.get("code_length") {
            assert!(lengths.contains(n));
        }
        let pin: u64 = form["pin_expiry"].parse().unwrap();
        let wait: u64 = form["next_event_wait"].parse().unwrap();
        assert!((pin_min..=pin_max).contains(&pin));
        assert!((wait_min..=wait_max).contains(&wait));
        assert_eq!(
            pin % wait,
            0,
            "pin_expiry must be a multiple of next_event_wait"
        );
        assert!(form["brand"].chars().count() <= 18);
    }
}

#[tokio::test]
async fn verify_request_statuses_map_to_error_kinds() {
    let cases = [
        ("verify-request-throttled.json", ErrorKind::Transient),
        (
            "verify-request-invalid-param.json",
            ErrorKind::InvalidNumber,
        ),
        ("verify-request-invalid-creds.json", ErrorKind::Permanent),
        (
            "verify-request-cannot-process.json",
            ErrorKind::InvalidNumber,
        ),
        ("verify-request-blacklist.json", ErrorKind::Blocked),
        ("verify-request-concurrent.json", ErrorKind::Transient),
        ("verify-request-rejected.json", ErrorKind::Blocked),
        ("verify-request-not-permitted.json", ErrorKind::Blocked),
    ];
    for (name, kind) in cases {
        let server = MockServer::start().await;
        mount(&server, "/verify/json", fixture(name)).await;
        let p = VonageProvider::new(config(VonageMode::Verify, &server.uri())).unwrap();
        let e = p.send(&outgoing(Challenge::Pin, "1234")).await.unwrap_err();
        assert_eq!(e.kind, kind, "{name}: {e}");
        assert!(!e.to_string().contains(API_SECRET));
    }
}

#[tokio::test]
async fn verify_check_right_and_wrong_codes() {
    let verify = spec("verify.yml");
    let check_path = operation_path(&verify, "verifyCheck");
    let cases = [
        ("verify-check-success.json", Some(true)),
        ("verify-check-incorrect-code.json", Some(false)),
        ("verify-check-too-many-fails.json", Some(false)),
        ("verify-check-unknown-requestid.json", Some(false)),
        ("verify-check-throttled.json", None),
        ("verify-check-invalid-creds.json", None),
    ];
    for (name, expected) in cases {
        let server = MockServer::start().await;
        mount(&server, &check_path, fixture(name)).await;
        let p = VonageProvider::new(config(VonageMode::Verify, &server.uri())).unwrap();
        let got = p.check("abcdef0123456789abcdef0123456789", "1234").await;
        match expected {
            Some(v) => assert_eq!(got.unwrap(), v, "{name}"),
            None => {
                let e = got.unwrap_err();
                let kind = if name.contains("throttled") {
                    ErrorKind::Transient
                } else {
                    ErrorKind::Permanent
                };
                assert_eq!(e.kind, kind, "{name}");
            }
        }
        let form = &forms(&server).await[0];
        assert_eq!(
            form,
            &map(&[
                ("api_key", API_KEY),
                ("api_secret", API_SECRET),
                ("request_id", "abcdef0123456789abcdef0123456789"),
                ("code", "1234"),
            ])
        );
        assert_declared(&verify, "verifyCheck", form);
    }
    // A code Verify cannot have generated (checkRequest.code: 4 to 6 characters) is wrong
    // without asking.
    let server = MockServer::start().await;
    let p = VonageProvider::new(config(VonageMode::Verify, &server.uri())).unwrap();
    assert!(
        !p.check("abcdef0123456789abcdef0123456789", "123")
            .await
            .unwrap()
    );
    assert!(server.received_requests().await.unwrap().is_empty());
}

// ---- Delivery receipts ----

fn signed_config(method: SignatureMethod) -> VonageConfig {
    let mut c = config(VonageMode::Sms, "http://127.0.0.1:9");
    c.signature_secret = Some(Credential::Value(Secret::new(SIGNATURE_SECRET)));
    c.signature_method = Some(method);
    c
}

fn fixture_params(name: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&fixture(name)).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

const RECEIPTS_URL: &str = "https://registrar.example/receipts/vonage";

fn get_request(query: &str) -> (String, Vec<(String, String)>) {
    (format!("{RECEIPTS_URL}?{query}"), Vec::new())
}

#[test]
fn signed_receipts_are_accepted_by_every_method_and_encoding() {
    let methods = [
        ("md5hash", SignatureMethod::Md5hash),
        ("md5", SignatureMethod::Md5),
        ("sha1", SignatureMethod::Sha1),
        ("sha256", SignatureMethod::Sha256),
        ("sha512", SignatureMethod::Sha512),
    ];
    for (name, m) in methods {
        let p = VonageProvider::new(signed_config(m)).unwrap();
        let params = fixture_params(&format!("dlr-signed-{name}.json"));
        let query = serde_urlencoded::to_string(&params).unwrap();
        // GET with the parameters in the query.
        let (url, headers) = get_request(&query);
        let r = p
            .parse_receipt(&ReceiptRequest {
                method: "GET",
                url: &url,
                headers: &headers,
                body: b"",
            })
            .unwrap_or_else(|e| panic!("{name} GET: {e}"));
        assert_eq!(r.provider_ref, "0A0000001234567B");
        assert_eq!(r.state, DeliveryState::Delivered);
        // POST, form-encoded.
        let form_headers = vec![(
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        )];
        let r = p
            .parse_receipt(&ReceiptRequest {
                method: "POST",
                url: RECEIPTS_URL,
                headers: &form_headers,
                body: query.as_bytes(),
            })
            .unwrap_or_else(|e| panic!("{name} POST form: {e}"));
        assert_eq!(r.state, DeliveryState::Delivered);
        // POST, JSON (the spec's callback content type).
        let json_headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        let body = fixture(&format!("dlr-signed-{name}.json"));
        let r = p
            .parse_receipt(&ReceiptRequest {
                method: "POST",
                url: RECEIPTS_URL,
                headers: &json_headers,
                body: body.as_bytes(),
            })
            .unwrap_or_else(|e| panic!("{name} POST JSON: {e}"));
        assert_eq!(r.provider_ref, "0A0000001234567B");
        // The signature in the other case is the same signature.
        let flipped: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| {
                let v = if k == "sig" {
                    if v.chars().any(|c| c.is_ascii_lowercase()) {
                        v.to_ascii_uppercase()
                    } else {
                        v.to_ascii_lowercase()
                    }
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let (url, headers) = get_request(&serde_urlencoded::to_string(&flipped).unwrap());
        assert!(
            p.parse_receipt(&ReceiptRequest {
                method: "GET",
                url: &url,
                headers: &headers,
                body: b"",
            })
            .is_ok(),
            "{name}: hex case"
        );
    }
}

fn parse_get(
    p: &VonageProvider,
    params: &[(String, String)],
) -> Result<DeliveryState, ReceiptError> {
    let (url, headers) = get_request(&serde_urlencoded::to_string(params).unwrap());
    p.parse_receipt(&ReceiptRequest {
        method: "GET",
        url: &url,
        headers: &headers,
        body: b"",
    })
    .map(|r| r.state)
}

fn set(params: &mut Vec<(String, String)>, key: &str, value: &str) {
    params.retain(|(k, _)| k != key);
    params.push((key.to_owned(), value.to_owned()));
}

fn resign(params: &mut Vec<(String, String)>, method: SignatureMethod) {
    params.retain(|(k, _)| k != "sig");
    let map: BTreeMap<String, String> = params.iter().cloned().collect();
    let sig = hex::encode_upper(registrar_providers::vonage::signature(
        &map,
        SIGNATURE_SECRET,
        method,
    ));
    params.push(("sig".into(), sig));
}

#[test]
fn forged_or_unsigned_receipts_are_refused() {
    let p = VonageProvider::new(signed_config(SignatureMethod::Sha256)).unwrap();
    let good = fixture_params("dlr-signed-sha256.json");
    assert_eq!(parse_get(&p, &good), Ok(DeliveryState::Delivered));
    // Tampered status.
    let mut tampered = good.clone();
    set(&mut tampered, "status", "failed");
    assert_eq!(parse_get(&p, &tampered), Err(ReceiptError::Unauthenticated));
    // Tampered message id.
    let mut tampered = good.clone();
    set(&mut tampered, "messageId", "0A0000001234567C");
    assert_eq!(parse_get(&p, &tampered), Err(ReceiptError::Unauthenticated));
    // No signature.
    let mut unsigned = good.clone();
    unsigned.retain(|(k, _)| k != "sig");
    assert_eq!(parse_get(&p, &unsigned), Err(ReceiptError::Unauthenticated));
    // Garbage signature.
    let mut garbage = good.clone();
    set(&mut garbage, "sig", "not hex at all");
    assert_eq!(parse_get(&p, &garbage), Err(ReceiptError::Unauthenticated));
    // Signed with another secret.
    let mut other = good.clone();
    other.retain(|(k, _)| k != "sig");
    let map: BTreeMap<String, String> = other.iter().cloned().collect();
    let sig = hex::encode_upper(registrar_providers::vonage::signature(
        &map,
        "another-secret",
        SignatureMethod::Sha256,
    ));
    other.push(("sig".into(), sig));
    assert_eq!(parse_get(&p, &other), Err(ReceiptError::Unauthenticated));
    // The right secret but the dashboard's method differs from ours.
    let p512 = VonageProvider::new(signed_config(SignatureMethod::Sha512)).unwrap();
    assert_eq!(parse_get(&p512, &good), Err(ReceiptError::Unauthenticated));
    // A validly signed receipt of another API key.
    let mut foreign = good.clone();
    set(&mut foreign, "api-key", "ffff0000");
    resign(&mut foreign, SignatureMethod::Sha256);
    assert_eq!(parse_get(&p, &foreign), Err(ReceiptError::Unauthenticated));
    // Without a configured signature secret nothing is accepted, not even the guide's example.
    let unsigned_provider =
        VonageProvider::new(config(VonageMode::Sms, "http://127.0.0.1:9")).unwrap();
    assert_eq!(
        parse_get(&unsigned_provider, &good),
        Err(ReceiptError::Unauthenticated)
    );
    let body = fixture("dlr-guide-example.json");
    let headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    for provider in [&p, &unsigned_provider] {
        assert_eq!(
            provider
                .parse_receipt(&ReceiptRequest {
                    method: "POST",
                    url: RECEIPTS_URL,
                    headers: &headers,
                    body: body.as_bytes(),
                })
                .unwrap_err(),
            ReceiptError::Unauthenticated
        );
    }
    // Verify mode has no receipts.
    let verify = VonageProvider::new(config(VonageMode::Verify, "http://127.0.0.1:9")).unwrap();
    assert_eq!(parse_get(&verify, &good), Err(ReceiptError::Unsupported));
}

#[test]
fn receipt_statuses_map_to_states() {
    let p = VonageProvider::new(signed_config(SignatureMethod::Md5hash)).unwrap();
    let cases = [
        ("delivered", DeliveryState::Delivered),
        ("failed", DeliveryState::Failed),
        ("rejected", DeliveryState::Failed),
        ("expired", DeliveryState::Failed),
        ("accepted", DeliveryState::Pending),
        ("buffered", DeliveryState::Pending),
        ("unknown", DeliveryState::Pending),
    ];
    for (status, state) in cases {
        let mut params = fixture_params("dlr-signed-md5hash.json");
        set(&mut params, "status", status);
        resign(&mut params, SignatureMethod::Md5hash);
        assert_eq!(parse_get(&p, &params), Ok(state), "{status}");
    }
    // Signed but without a message id.
    let mut params = fixture_params("dlr-signed-md5hash.json");
    params.retain(|(k, _)| k != "messageId");
    resign(&mut params, SignatureMethod::Md5hash);
    assert!(matches!(
        parse_get(&p, &params),
        Err(ReceiptError::Malformed(_))
    ));
}

// ---- Configuration and secrets ----

#[tokio::test]
async fn secrets_never_show_in_debug_or_errors() {
    let server = MockServer::start().await;
    // An answer that echoes the credentials.
    Mock::given(method("POST"))
        .and(path("/sms/json"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_string(format!("bad api_secret {API_SECRET} / {SIGNATURE_SECRET}")),
        )
        .mount(&server)
        .await;
    let mut c = signed_config(SignatureMethod::Sha256);
    c.base_url = Some(server.uri());
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(API_SECRET) && !debug.contains(SIGNATURE_SECRET),
        "{debug}"
    );
    let p = VonageProvider::new(c).unwrap();
    let debug = format!("{p:?}");
    assert!(
        !debug.contains(API_SECRET) && !debug.contains(SIGNATURE_SECRET),
        "{debug}"
    );
    let e = p
        .send(&outgoing(Challenge::Pin, "123456"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(API_SECRET) && !text.contains(SIGNATURE_SECRET),
        "{text}"
    );
    assert!(!text.contains("123456"), "{text}");
}

#[test]
fn configuration_is_checked() {
    let parsed: VonageConfig = serde_json::from_value(json!({
        "api_key": API_KEY,
        "api_secret": {"env": "REGISTRAR_PROVIDERS_TEST_VONAGE_UNSET"},
        "mode": "verify",
        "signature_method": "sha512",
    }))
    .unwrap();
    assert_eq!(parsed.name, "vonage");
    assert_eq!(parsed.mode, VonageMode::Verify);
    assert_eq!(parsed.signature_method, Some(SignatureMethod::Sha512));
    let round: VonageConfig =
        serde_json::from_value(serde_json::to_value(&parsed).unwrap()).unwrap();
    assert_eq!(round, parsed);
    let e = VonageProvider::new(parsed).unwrap_err();
    assert!(e.contains("REGISTRAR_PROVIDERS_TEST_VONAGE_UNSET"), "{e}");
    assert!(
        serde_json::from_value::<VonageConfig>(json!({
            "api_key": API_KEY, "api_secret": "x", "mode": "sms", "form": "typo",
        }))
        .is_err(),
        "unknown fields are refused"
    );
    assert!(
        serde_json::from_value::<VonageConfig>(json!({
            "api_key": API_KEY, "api_secret": "x", "mode": "whatsapp",
        }))
        .is_err()
    );

    let base = "http://127.0.0.1:9";
    let mut c = config(VonageMode::Sms, base);
    c.from = None;
    assert!(VonageProvider::new(c).unwrap_err().contains("from"));
    let mut c = config(VonageMode::Sms, base);
    c.challenges = Some(vec![Challenge::Pin, Challenge::Voice]);
    assert!(VonageProvider::new(c).unwrap_err().contains("challenges"));
    let mut c = config(VonageMode::Verify, base);
    c.challenges = Some(vec![Challenge::MissedCall]);
    assert!(VonageProvider::new(c).unwrap_err().contains("challenges"));
    let mut c = config(VonageMode::Verify, base);
    c.brand = Some("A brand far too long for Verify".into());
    assert!(VonageProvider::new(c).unwrap_err().contains("brand"));
    let mut c = config(VonageMode::Verify, base);
    c.from = Some("TwelveChars!".into());
    assert!(VonageProvider::new(c).unwrap_err().contains("from"));
    let mut c = config(VonageMode::Verify, base);
    c.status_callback = Some("https://x.example/r".into());
    assert!(
        VonageProvider::new(c)
            .unwrap_err()
            .contains("status_callback")
    );
    let mut c = config(VonageMode::Sms, base);
    c.signature_method = Some(SignatureMethod::Sha256);
    assert!(
        VonageProvider::new(c)
            .unwrap_err()
            .contains("signature_method")
    );
    let mut c = config(VonageMode::Sms, base);
    c.timeout_seconds = Some(0);
    assert!(
        VonageProvider::new(c)
            .unwrap_err()
            .contains("timeout_seconds")
    );
    let mut c = config(VonageMode::Sms, base);
    c.base_url = Some("ftp://x".into());
    assert!(VonageProvider::new(c).unwrap_err().contains("base_url"));
    let mut c = config(VonageMode::Verify, base);
    c.challenges = Some(vec![Challenge::Voice, Challenge::Pin]);
    let p = VonageProvider::new(c).unwrap();
    assert_eq!(p.challenges(), [Challenge::Voice, Challenge::Pin]);
    assert_eq!(p.name(), "vonage");
}

#[test]
fn only_the_sms_api_sends_our_code() {
    let sms = VonageProvider::new(config(VonageMode::Sms, "http://127.0.0.1:9")).unwrap();
    let verify = VonageProvider::new(config(VonageMode::Verify, "http://127.0.0.1:9")).unwrap();
    assert!(sms.sends_our_code(Challenge::Pin));
    assert!(
        !verify.sends_our_code(Challenge::Pin),
        "Verify chooses and checks its code"
    );
}
