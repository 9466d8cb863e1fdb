//! Arbitrary input at the JSON API of a running service: every answer is a documented status
//! (never 5xx) with a problem+json body (the harness checks the content type of every error).

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

use crate::harness::*;

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::from),
        "[+0-9 ()-]{0,20}".prop_map(Value::from),
        prop_oneof![
            Just("pin"),
            Just("voice"),
            Just("missedcall"),
            Just("callerid")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("phone".to_owned()),
                    Just("force".to_owned()),
                    Just("challenge".to_owned()),
                    Just("code".to_owned()),
                    Just("public_key".to_owned()),
                    Just("locale".to_owned()),
                    Just("fallback".to_owned()),
                    any::<String>(),
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn sample<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

const DOCUMENTED: [u16; 10] = [200, 201, 400, 403, 404, 409, 413, 422, 429, 502];

#[tokio::test]
async fn arbitrary_json_and_bytes_get_documented_answers() {
    let s = TestServer::start().await;
    let id = s.start_verification(EMULATOR, false).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let paths = [
        "/v1/verifications".to_owned(),
        format!("/v1/verifications/{id}/code"),
        format!("/v1/verifications/{id}/resend"),
    ];
    for (i, body) in sample(any_json(), 300).into_iter().enumerate() {
        let path = &paths[i % paths.len()];
        let r = s.post(path, body.clone()).await;
        assert!(
            DOCUMENTED.contains(&r.status),
            "{path} {body}: {} {:?}",
            r.status,
            r.body
        );
    }
    for (i, bytes) in sample(proptest::collection::vec(any::<u8>(), 0..512), 200)
        .into_iter()
        .enumerate()
    {
        let path = &paths[i % paths.len()];
        let r = s.post_raw(path, bytes.clone()).await;
        assert!(
            DOCUMENTED.contains(&r.status),
            "{path} {bytes:?}: {}",
            r.status
        );
    }
    // The service is still whole afterwards.
    assert_eq!(s.get("/readyz").await.status, 200);
}
