//! One registration over the service's JSON API: `POST /v1/verifications`, the code from the
//! outbox, `POST /v1/verifications/{id}/code` with the key made beforehand.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::outbox::Codes;
use crate::report::{Recorder, WHOLE};

/// A transport error by its innermost cause (the URL left out, so that errors add up).
fn transport(e: reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = &e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    format!("transport: {cause}")
}

async fn post(client: &reqwest::Client, url: String, body: &Value) -> Result<(u16, Value), String> {
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(transport)?;
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Waits until the service answers `/healthz` (it may still be starting).
pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    for tries in 0.. {
        match client.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status().is_success() => return,
            other if tries == 100 => {
                panic!("the service at {base} is not answering /healthz: {other:?}")
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One full registration of `phone` with `key` (base64 of the binary public key).
pub async fn register(
    client: &reqwest::Client,
    base: &str,
    codes: &Codes,
    phone: &str,
    key: &str,
    rec: Recorder<'_>,
) {
    let t0 = Instant::now();
    let started = post(
        client,
        format!("{base}/v1/verifications"),
        &json!({"phone": phone}),
    )
    .await;
    let id = match started {
        Ok((201, body)) => body["id"].as_str().unwrap_or_default().to_owned(),
        Ok((status, body)) => {
            let what = body["limit"]
                .as_str()
                .or(body["type"].as_str())
                .unwrap_or("?");
            return rec.error(format!("start {status} {what}"));
        }
        Err(e) => return rec.error(format!("start {e}")),
    };
    rec.step("start", t0.elapsed());
    let code = match codes.wait(phone).await {
        Ok(c) => c,
        Err(e) => return rec.error(e),
    };
    let t1 = Instant::now();
    let verified = post(
        client,
        format!("{base}/v1/verifications/{id}/code"),
        &json!({"code": code, "public_key": key}),
    )
    .await;
    match verified {
        Ok((200, _)) => {
            rec.step("verify", t1.elapsed());
            rec.step(WHOLE, t0.elapsed());
        }
        Ok((status, body)) => {
            let what = body["type"].as_str().unwrap_or("?");
            rec.error(format!("verify {status} {what}"))
        }
        Err(e) => rec.error(format!("verify {e}")),
    }
}
