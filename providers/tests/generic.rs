//! The generic HTTP gateway against wiremock: body formats, placeholders and their escaping,
//! headers and secret headers, success rules, message ids, failure kinds, validation.

use std::time::Duration;

use registrar_providers::generic::{BodyFormat, GenericConfig, GenericProvider, HttpMethod};
use registrar_providers::{Challenge, DeliveredCode, ErrorKind, Outgoing, Provider};
use serde_json::json;
use wiremock::matchers::{body_json, body_string, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A text with everything that needs escaping somewhere.
const NASTY: &str = "He said \"hi\" & left;\nnew line\r\ttab ünïcødé 🎉 100% a+b=c #frag ?q \\ /";

fn outgoing(text: &str) -> Outgoing {
    Outgoing {
        to: "+15555215554".into(),
        challenge: Challenge::Pin,
        code: "123456".into(),
        text: text.into(),
        reference: "ver-42".into(),
        valid_for: Duration::from_secs(600),
        locale: None,
    }
}

/// A configuration from its TOML-like JSON shape, as the core would deserialize it.
fn config(value: serde_json::Value) -> GenericConfig {
    serde_json::from_value(value).unwrap()
}

fn provider(value: serde_json::Value) -> GenericProvider {
    GenericProvider::new(config(value)).unwrap()
}

async fn only_request(server: &MockServer) -> wiremock::Request {
    let mut requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests.remove(0)
}

#[tokio::test]
async fn json_body_gateway() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/sms"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "to": "+15555215554",
            "from": "KONTALK",
            "message": "Your code is 123456",
            "meta": {"ref": "ver-42", "digits": "15555215554", "code": "123456"},
            "ttl": 600
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "ok",
            "data": {"id": "msg-7"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "local",
        "url": format!("{}/api/sms", server.uri()),
        "body_format": "json",
        "body": r#"{"to": "{to}", "from": "{sender}", "message": "{text}",
                    "meta": {"ref": "{reference}", "digits": "{to_digits}", "code": "{code}"},
                    "ttl": {valid_for_seconds}}"#,
        "sender": "KONTALK",
        "success_pointer": "/status",
        "success_value": "ok",
        "id_pointer": "/data/id"
    }));
    let d = p.send(&outgoing("Your code is 123456")).await.unwrap();
    assert_eq!(d.sender, "KONTALK");
    assert_eq!(d.provider_ref.as_deref(), Some("msg-7"));
    assert_eq!(d.code, DeliveredCode::Ours);
    assert_eq!(d.instructions, None);
    assert_eq!(p.name(), "local");
    assert_eq!(p.challenges(), &[Challenge::Pin]);
}

#[tokio::test]
async fn json_body_keeps_the_template_order_and_layout() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "local",
        "url": server.uri(),
        "body_format": "json",
        "body": r#"{"z": "{code}", "a": ["{to}"]}"#,
        "sender": "1"
    }));
    p.send(&outgoing("x")).await.unwrap();
    let r = only_request(&server).await;
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        r#"{"z": "123456", "a": ["+15555215554"]}"#
    );
}

#[tokio::test]
async fn form_body_gateway() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/send"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string(
            "user=kontalk&to=%2B15555215554&text=Your+code%3A+123456&from=12345",
        ))
        .respond_with(ResponseTemplate::new(202).set_body_string("0: Accepted for delivery"))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "kannel",
        "url": format!("{}/cgi-bin/send", server.uri()),
        "body": "user=kontalk&to={to}&text={text}&from={sender}",
        "sender": "12345"
    }));
    let d = p.send(&outgoing("Your code: 123456")).await.unwrap();
    assert_eq!(d.sender, "12345");
    assert_eq!(d.provider_ref, None);
}

#[tokio::test]
async fn get_with_query_placeholders_and_a_secret() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cgi-bin/sendsms"))
        .and(query_param("username", "kontalk"))
        .and(query_param("password", "p&ss=w0rd"))
        .and(query_param("to", "+15555215554"))
        .and(query_param("text", "Your code: 123456"))
        .and(query_param("ref", "ver-42"))
        .respond_with(ResponseTemplate::new(200).set_body_string("0: Accepted"))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "kannel",
        "method": "get",
        "url": format!(
            "{}/cgi-bin/sendsms?username=kontalk&password={{secret:password}}&to={{to}}&text={{text}}&ref={{reference}}",
            server.uri()
        ),
        "secrets": {"password": "p&ss=w0rd"},
        "sender": "12345"
    }));
    p.send(&outgoing("Your code: 123456")).await.unwrap();
    let r = only_request(&server).await;
    assert_eq!(
        r.url.query(),
        Some(
            "username=kontalk&password=p%26ss%3Dw0rd&to=%2B15555215554&text=Your%20code%3A%20123456&ref=ver-42"
        )
    );
    assert!(r.body.is_empty());
    assert!(r.headers.get("content-type").is_none());
    // The secret never prints.
    let shown = format!("{p:?} {:?}", p.config());
    assert!(!shown.contains("p&ss=w0rd"), "{shown}");
}

#[tokio::test]
async fn placeholders_in_the_url_path() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/v1/numbers/15555215554/messages/ver-42"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "put",
        "method": "put",
        "url": format!("{}/v1/numbers/{{to_digits}}/messages/{{reference}}", server.uri()),
        "body_format": "raw",
        "body": "{text}",
        "sender": "1"
    }));
    p.send(&outgoing("hello")).await.unwrap();
    let r = only_request(&server).await;
    assert_eq!(r.body, b"hello");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "text/plain; charset=utf-8"
    );
}

#[tokio::test]
async fn headers_and_secret_headers_arrive_and_secrets_never_print() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer s3cr3t-t0ken"))
        .and(header("x-api-key", "k3y-v4lue"))
        .and(header("x-reference", "ver-42"))
        .and(header("x-sender", "KONTALK"))
        .and(header("content-type", "application/vnd.gateway+json"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let cfg = config(json!({
        "name": "hdr",
        "url": server.uri(),
        "headers": {
            "X-Reference": "{reference}",
            "X-Sender": "{sender}",
            "Content-Type": "application/vnd.gateway+json"
        },
        "secret_headers": {
            "Authorization": "Bearer s3cr3t-t0ken",
            "X-Api-Key": "k3y-v4lue"
        },
        "body_format": "json",
        "body": r#"{"text": "{text}"}"#,
        "sender": "KONTALK"
    }));
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("k3y-v4lue"),
        "{shown}"
    );
    let p = GenericProvider::new(cfg).unwrap();
    let shown = format!("{p:?}");
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("k3y-v4lue"),
        "{shown}"
    );
    assert!(shown.contains("X-Reference"), "{shown}");
    p.send(&outgoing("hi")).await.unwrap();
}

#[tokio::test]
async fn header_values_become_one_line() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("x-text", "line one line two"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "hdr",
        "url": server.uri(),
        "headers": {"X-Text": "{text}"},
        "sender": "1"
    }));
    p.send(&outgoing("line one\nline two")).await.unwrap();
}

#[test]
fn secret_from_an_unset_variable_is_refused_by_name() {
    let e = GenericProvider::new(config(json!({
        "name": "env",
        "url": "http://127.0.0.1:1/",
        "secret_headers": {
            "Authorization": {"env": "REGISTRAR_GENERIC_TEST_SURELY_UNSET"}
        },
        "sender": "1"
    })))
    .unwrap_err();
    assert!(e.contains("REGISTRAR_GENERIC_TEST_SURELY_UNSET"), "{e}");
    assert!(e.contains("secret_headers.Authorization"), "{e}");
}

#[tokio::test]
async fn custom_success_status() {
    let server = MockServer::start().await;
    Mock::given(path("/created"))
        .respond_with(ResponseTemplate::new(201))
        .mount(&server)
        .await;
    Mock::given(path("/ok"))
        .respond_with(ResponseTemplate::new(200).set_body_string("queued later"))
        .mount(&server)
        .await;
    let with = |p: &str| {
        provider(json!({
            "name": "st",
            "url": format!("{}{p}", server.uri()),
            "sender": "1",
            "success_status": [201]
        }))
    };
    with("/created").send(&outgoing("x")).await.unwrap();
    let e = with("/ok").send(&outgoing("x")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(
        e.message.contains("HTTP 200") && e.message.contains("queued later"),
        "{e}"
    );
}

#[tokio::test]
async fn success_pointer_match_and_mismatch() {
    let server = MockServer::start().await;
    Mock::given(path("/good"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": {"code": 0}})))
        .mount(&server)
        .await;
    Mock::given(path("/bad"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"result": {"code": 17, "error": "insufficient credit"}})),
        )
        .mount(&server)
        .await;
    Mock::given(path("/missing"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"other": true})))
        .mount(&server)
        .await;
    Mock::given(path("/html"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"))
        .mount(&server)
        .await;
    let with = |p: &str| {
        provider(json!({
            "name": "ptr",
            "url": format!("{}{p}", server.uri()),
            "sender": "1",
            "success_pointer": "/result/code",
            // A string against a number: gateways are not consistent.
            "success_value": "0"
        }))
    };
    with("/good").send(&outgoing("x")).await.unwrap();

    let e = with("/bad").send(&outgoing("x")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("/result/code is 17"), "{e}");
    assert!(e.message.contains("insufficient credit"), "{e}");

    let e = with("/missing").send(&outgoing("x")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("missing"), "{e}");

    let e = with("/html").send(&outgoing("x")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(
        e.message.contains("not JSON") && e.message.contains("maintenance"),
        "{e}"
    );
}

#[tokio::test]
async fn id_pointer_gives_the_provider_ref() {
    let server = MockServer::start().await;
    Mock::given(path("/num"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"messages": [{"id": 991}]})))
        .mount(&server)
        .await;
    Mock::given(path("/none"))
        .respond_with(ResponseTemplate::new(200).set_body_string("OK"))
        .mount(&server)
        .await;
    let with = |p: &str| {
        provider(json!({
            "name": "ids",
            "url": format!("{}{p}", server.uri()),
            "sender": "1",
            "id_pointer": "/messages/0/id"
        }))
    };
    let d = with("/num").send(&outgoing("x")).await.unwrap();
    assert_eq!(d.provider_ref.as_deref(), Some("991"));
    // Accepted without an id: still delivered.
    let d = with("/none").send(&outgoing("x")).await.unwrap();
    assert_eq!(d.provider_ref, None);
}

#[tokio::test]
async fn statuses_map_to_error_kinds() {
    let server = MockServer::start().await;
    for (status, body) in [
        (429, "slow down"),
        (500, "boom"),
        (503, "maintenance"),
        (400, "invalid destination"),
        (401, "bad key"),
    ] {
        Mock::given(path(format!("/{status}")))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .mount(&server)
            .await;
    }
    for (status, kind) in [
        (429, ErrorKind::Transient),
        (500, ErrorKind::Transient),
        (503, ErrorKind::Transient),
        (400, ErrorKind::Permanent),
        (401, ErrorKind::Permanent),
    ] {
        let p = provider(json!({
            "name": "st",
            "url": format!("{}/{status}", server.uri()),
            "sender": "1"
        }));
        let e = p.send(&outgoing("x")).await.unwrap_err();
        assert_eq!(e.kind, kind, "{status}: {e}");
        assert!(e.message.contains(&format!("HTTP {status}")), "{e}");
        assert_eq!(e.provider, "st");
    }
}

#[tokio::test]
async fn errors_never_quote_the_message_its_code_or_the_number() {
    // Gateways often echo the request in their errors; those texts reach operators' logs.
    let server = MockServer::start().await;
    Mock::given(path("/echo"))
        .respond_with(
            ResponseTemplate::new(400).set_body_string(
                "rejected to=15555215554 text=Your code is 123456 (for +15555215554)",
            ),
        )
        .mount(&server)
        .await;
    Mock::given(path("/echo-json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"status": "failed", "to": "+15555215554", "text": "Your code is 123456"}),
        ))
        .mount(&server)
        .await;
    for (p, extra) in [
        ("/echo", json!({})),
        (
            "/echo-json",
            json!({"success_pointer": "/status", "success_value": "queued"}),
        ),
    ] {
        let mut c = json!({"name": "echo", "url": format!("{}{p}", server.uri()), "sender": "1"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let e = provider(c)
            .send(&outgoing("Your code is 123456"))
            .await
            .unwrap_err();
        for secret in ["123456", "5555215554", "Your code is"] {
            assert!(!e.message.contains(secret), "{p}: {e}");
        }
        assert!(e.message.contains("<number>"), "{p}: {e}");
    }
}

#[tokio::test]
async fn timeout_is_transient() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(4)))
        .mount(&server)
        .await;
    let p = provider(json!({
        "name": "slow",
        "url": server.uri(),
        "sender": "1",
        "timeout_seconds": 1
    }));
    let started = std::time::Instant::now();
    let e = p.send(&outgoing("x")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(e.message.contains("timed out"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn refused_connection_is_transient_and_hides_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = provider(json!({
        "name": "down",
        "url": format!("http://127.0.0.1:{port}/send?key={{secret:k}}&to={{to}}"),
        "secrets": {"k": "hunter2"},
        "sender": "1"
    }));
    let e = p.send(&outgoing("x")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    let shown = format!("{e} {e:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("5215554"),
        "{shown}"
    );
}

#[tokio::test]
async fn disabled_challenge_is_unsupported() {
    let p = provider(json!({
        "name": "sms",
        "url": "http://127.0.0.1:1/",
        "sender": "1"
    }));
    let mut m = outgoing("x");
    m.challenge = Challenge::Voice;
    let e = p.send(&m).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
}

#[test]
fn unknown_placeholders_are_refused_by_name() {
    let e = GenericProvider::new(config(json!({
        "name": "typo",
        "url": "http://gw.example/send?to={phone}&text={text}&x={mesage}",
        "sender": "1"
    })))
    .unwrap_err();
    assert!(e.contains("{phone}") && e.contains("{mesage}"), "{e}");
    assert!(e.contains("provider typo: url"), "{e}");
    assert!(e.contains("known: {to}"), "{e}");

    let e = GenericProvider::new(config(json!({
        "name": "typo",
        "url": "http://gw.example/",
        "body": "to={to}&code={pin}",
        "sender": "1"
    })))
    .unwrap_err();
    assert!(e.contains("{pin}") && e.contains("body"), "{e}");

    let e = GenericProvider::new(config(json!({
        "name": "typo",
        "url": "http://gw.example/",
        "headers": {"X-Id": "{ref}"},
        "sender": "1"
    })))
    .unwrap_err();
    assert!(e.contains("{ref}") && e.contains("headers.X-Id"), "{e}");

    let e = GenericProvider::new(config(json!({
        "name": "typo",
        "url": "http://gw.example/?k={secret:api}",
        "secrets": {"apikey": "x"},
        "sender": "1"
    })))
    .unwrap_err();
    assert!(e.contains("{secret:api}"), "{e}");
}

#[test]
fn invalid_configurations_are_refused() {
    let base = json!({"name": "bad", "url": "http://gw.example/", "sender": "1"});
    let refused = |patch: serde_json::Value, expect: &str| {
        let mut v = base.clone();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        let e = GenericProvider::new(config(v)).unwrap_err();
        assert!(e.contains(expect), "{expect}: {e}");
    };
    refused(
        json!({"body_format": "json", "body": r#"{"to": "{to}""#}),
        "not JSON",
    );
    refused(
        json!({"body_format": "json", "body": r#"{"to": {to}}"#}),
        "inside a JSON string",
    );
    refused(json!({"body": r#"{"to": "{to}"}"#}), "key=value");
    refused(json!({"method": "get", "body": "a=b"}), "GET");
    refused(json!({"url": "not a url/{to}"}), "url: not a valid URL");
    refused(json!({"url": "ftp://gw.example/{to}"}), "http or https");
    refused(json!({"sender": ""}), "sender");
    refused(json!({"success_pointer": "/status"}), "success_value");
    refused(json!({"success_value": "ok"}), "success_pointer");
    refused(
        json!({"success_pointer": "status", "success_value": "ok"}),
        "JSON pointer",
    );
    refused(json!({"id_pointer": "id"}), "JSON pointer");
    refused(json!({"success_status": [99]}), "success_status");
    refused(json!({"timeout_seconds": 0}), "timeout_seconds");
    refused(json!({"challenges": ["missedcall"]}), "missed calls");
    refused(json!({"challenges": []}), "challenges");
    refused(json!({"headers": {"Bad Header": "x"}}), "header name");
    refused(
        json!({"headers": {"Authorization": "x"}, "secret_headers": {"authorization": "y"}}),
        "also given in headers",
    );
}

#[test]
fn configuration_shape_defaults_and_unknown_fields() {
    let c = config(json!({"name": "min", "url": "http://gw.example/", "sender": "KONTALK"}));
    assert_eq!(c.method, HttpMethod::Post);
    assert_eq!(c.body_format, BodyFormat::Form);
    assert_eq!(c.challenges, vec![Challenge::Pin]);
    assert_eq!(c.timeout_seconds, 10);
    assert!(c.success_status.is_empty() && c.headers.is_empty() && c.body.is_none());
    // Round trip.
    let again: GenericConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(again, c);
    assert!(
        serde_json::from_value::<GenericConfig>(
            json!({"name": "x", "url": "http://gw.example/", "sender": "1", "bdy": "x"})
        )
        .is_err()
    );
    assert!(
        serde_json::from_value::<GenericConfig>(
            json!({"url": "http://gw.example/", "sender": "1"})
        )
        .is_err(),
        "name is required"
    );
    let c = config(json!({
        "name": "upper", "url": "http://gw.example/", "sender": "1", "method": "GET",
        "challenges": ["pin", "voice"]
    }));
    assert_eq!(c.method, HttpMethod::Get);
    let p = GenericProvider::new(c).unwrap();
    assert_eq!(p.challenges(), &[Challenge::Pin, Challenge::Voice]);
}

#[tokio::test]
async fn special_characters_survive_every_format() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;

    // JSON: the body parses and the string is the text, byte for byte.
    let p = provider(json!({
        "name": "json", "url": server.uri(), "sender": "1",
        "body_format": "json", "body": r#"{"text": "{text}", "pre": "<{code}>"}"#
    }));
    p.send(&outgoing(NASTY)).await.unwrap();
    // Form: the body decodes to the text, and `&`/`=` in it did not split pairs.
    let p = provider(json!({
        "name": "form", "url": server.uri(), "sender": "1",
        "body": "text={text}&to={to}"
    }));
    p.send(&outgoing(NASTY)).await.unwrap();
    // Raw: as it is.
    let p = provider(json!({
        "name": "raw", "url": server.uri(), "sender": "1",
        "body_format": "raw", "body": "TEXT:{text}:END"
    }));
    p.send(&outgoing(NASTY)).await.unwrap();
    // URL: the query decodes to the text.
    let p = provider(json!({
        "name": "url", "method": "get", "sender": "1",
        "url": format!("{}/q?text={{text}}&to={{to}}", server.uri())
    }));
    p.send(&outgoing(NASTY)).await.unwrap();

    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 4);

    let json: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(json, json!({"text": NASTY, "pre": "<123456>"}));

    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&requests[1].body).unwrap();
    assert_eq!(
        form,
        vec![
            ("text".to_owned(), NASTY.to_owned()),
            ("to".to_owned(), "+15555215554".to_owned())
        ]
    );
    let raw_form = String::from_utf8(requests[1].body.clone()).unwrap();
    assert!(
        raw_form.starts_with("text=He+said+%22hi%22+%26+left%3B%0Anew+line%0D%09tab+"),
        "{raw_form}"
    );
    assert!(raw_form.ends_with("&to=%2B15555215554"), "{raw_form}");

    assert_eq!(
        String::from_utf8(requests[2].body.clone()).unwrap(),
        format!("TEXT:{NASTY}:END")
    );

    let url = &requests[3].url;
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("text".to_owned(), NASTY.to_owned()),
            ("to".to_owned(), "+15555215554".to_owned())
        ]
    );
    assert!(url.fragment().is_none());
    assert_eq!(url.path(), "/q");
}
