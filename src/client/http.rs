//! The registration over the JSON API: start, the code from the user, the code with the public
//! key, and the certification checked against `GET /v1/server-key`.

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use super::{Outcome, RegisterOptions, accept_certified, generate_key, read_code};
use crate::openpgp;

/// The default service address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

pub(super) fn http_client() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default crypto provider: install ring once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")
}

async fn call(request: reqwest::RequestBuilder) -> anyhow::Result<Result<Value, (u16, Value)>> {
    let response = request.send().await.context("cannot reach the server")?;
    let status = response.status();
    let text = response.text().await.context("cannot read the response")?;
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "detail": text }));
    Ok(if status.is_success() {
        Ok(body)
    } else {
        Err((status.as_u16(), body))
    })
}

fn problem_text(status: u16, body: &Value) -> String {
    let detail = body["detail"].as_str().unwrap_or("no detail");
    match body["retry_at"].as_str() {
        Some(at) => format!("{detail} (HTTP {status}; retry after {at})"),
        None => format!("{detail} (HTTP {status})"),
    }
}

/// The server's public key from `GET /v1/server-key` of `base`.
pub(super) async fn server_key(client: &reqwest::Client, base: &str) -> anyhow::Result<Vec<u8>> {
    Ok(client
        .get(format!("{base}/v1/server-key"))
        .send()
        .await
        .with_context(|| format!("cannot reach {base} for the server key"))?
        .error_for_status()?
        .bytes()
        .await?
        .to_vec())
}

pub(super) async fn register(opts: &RegisterOptions) -> anyhow::Result<Outcome> {
    let client = http_client()?;
    let base = opts
        .server
        .as_deref()
        .unwrap_or(DEFAULT_SERVER)
        .trim_end_matches('/');
    let mut start = json!({ "phone": opts.phone, "force": opts.force });
    if let Some(c) = &opts.challenge {
        start["challenge"] = json!(c);
    }
    if opts.accept_terms {
        start["accept_terms"] = json!(true);
    }
    let started = match call(client.post(format!("{base}/v1/verifications")).json(&start)).await? {
        Ok(v) => v,
        Err((409, body)) if body["type"] == "urn:kontalk-registrar:problem:conflict" => {
            bail!("this number already has an account; run again with --force to replace its key")
        }
        Err((status, body)) => bail!("cannot start: {}", problem_text(status, &body)),
    };
    let id = started["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered without a verification id"))?
        .to_owned();
    let jid = started["account"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered without an account"))?
        .to_owned();
    eprintln!(
        "{} (sender: {})",
        started["instructions"].as_str().unwrap_or(""),
        started["sender"].as_str().unwrap_or("")
    );

    let key = generate_key(&opts.name, &jid, opts.rsa).await?;
    let public_b64 = base64::engine::general_purpose::STANDARD.encode(openpgp::public_bytes(&key)?);

    let mut code = match &opts.code {
        Some(c) => c.clone(),
        None => read_code("Verification code: ")?,
    };
    let verified = loop {
        let body = json!({ "code": code, "public_key": public_b64 });
        match call(
            client
                .post(format!("{base}/v1/verifications/{id}/code"))
                .json(&body),
        )
        .await?
        {
            Ok(v) => break v,
            Err((422, body))
                if opts.code.is_none()
                    && body["type"] == "urn:kontalk-registrar:problem:wrong-code"
                    && body["attempts_left"].as_u64().unwrap_or(0) > 0 =>
            {
                code = read_code(&format!(
                    "Wrong code, {} attempts left. Verification code: ",
                    body["attempts_left"]
                ))?;
            }
            Err((status, body)) => bail!("verification failed: {}", problem_text(status, &body)),
        }
    };

    let certified_bytes = base64::engine::general_purpose::STANDARD
        .decode(verified["public_key"].as_str().unwrap_or_default())
        .context("the server returned a key that is not base64")?;
    let server = server_key(&client, base).await?;
    let (certified, with_secret) = accept_certified(&key, &certified_bytes, Some(&server), &jid)?;
    Ok(Outcome {
        jid,
        certified,
        with_secret,
        logged_in_as: None,
    })
}
