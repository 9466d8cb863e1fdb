//! `kontalk-registrar client register`: the whole registration as a real client does it, over the
//! HTTP API. It starts the verification, generates a key whose User ID names the account, reads
//! the code, submits code and key, checks the returned certification against the server key, and
//! writes the certified key (binary and armored), the secret key, and the bridge certificate to
//! log in with (and its private key) to files.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::openpgp;

/// What to register and where.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// The phone number, as typed.
    pub phone: String,
    /// Base URL of the service (`http://127.0.0.1:8080`).
    pub server: String,
    /// Replace an existing account.
    pub force: bool,
    /// `pin`, `voice` or `missedcall`.
    pub challenge: Option<String>,
    /// The code, if known; otherwise it is read from the terminal.
    pub code: Option<String>,
    /// Directory for the key files.
    pub out_dir: PathBuf,
    /// Generate RSA-2048 (Kontalk's choice) instead of Ed25519.
    pub rsa: bool,
    /// Name part of the User ID.
    pub name: String,
    /// Accept the server's terms of service.
    pub accept_terms: bool,
}

/// Files written by a successful registration.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The account JID.
    pub jid: String,
    /// Key fingerprint.
    pub fingerprint: String,
    /// Certified public key, binary.
    pub public_binary: PathBuf,
    /// Certified public key, armored.
    pub public_armored: PathBuf,
    /// Secret key with the certification, armored (0600).
    pub secret_armored: PathBuf,
    /// The bridge certificate to log in with (PEM).
    pub certificate: PathBuf,
    /// The certificate's private key, PKCS#8 PEM (0600).
    pub certificate_key: PathBuf,
}

fn http_client() -> anyhow::Result<reqwest::Client> {
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

fn read_code(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        bail!("no code given (standard input closed)");
    }
    Ok(line.trim().to_owned())
}

/// Registers `opts.phone` with the service at `opts.server`.
pub async fn register(opts: &RegisterOptions) -> anyhow::Result<Registration> {
    let client = http_client()?;
    let base = opts.server.trim_end_matches('/');
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

    let (name, rsa) = (opts.name.clone(), opts.rsa);
    let email = jid.clone();
    let key = tokio::task::spawn_blocking(move || openpgp::generate_user_key(&name, &email, rsa))
        .await??;
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
    let certified =
        openpgp::parse_cert(&certified_bytes).context("the returned key does not parse")?;
    if certified.fingerprint() != key.fingerprint() {
        bail!("the server returned another key than ours");
    }
    let server_key = client
        .get(format!("{base}/v1/server-key"))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let server_cert = openpgp::parse_cert(&server_key).context("the server key does not parse")?;
    if !openpgp::has_certification(&certified, &server_cert, &jid) {
        bail!("the returned key carries no valid certification by the server key");
    }
    let with_secret = key.merge_public(certified.clone())?;
    write_files(&opts.out_dir, &jid, &certified, &with_secret)
}

fn write_files(
    dir: &Path,
    jid: &str,
    certified: &sequoia_openpgp::Cert,
    with_secret: &sequoia_openpgp::Cert,
) -> anyhow::Result<Registration> {
    std::fs::create_dir_all(dir)?;
    let account = jid.split('@').next().unwrap_or(jid);
    let public_binary = dir.join(format!("{account}.pub.gpg"));
    let public_armored = dir.join(format!("{account}.pub.asc"));
    let secret_armored = dir.join(format!("{account}.key.asc"));
    std::fs::write(&public_binary, openpgp::public_bytes(certified)?)?;
    std::fs::write(&public_armored, openpgp::public_armored(certified)?)?;
    if secret_armored.exists() {
        std::fs::remove_file(&secret_armored)?;
    }
    crate::fsutil::write_private(&secret_armored, &openpgp::secret_armored(with_secret)?)?;
    // The X.509 certificate a Kontalk client logs in with, and its key, as TLS clients take them.
    let bridge = crate::login_cert::build(with_secret, jid, std::time::SystemTime::now())?;
    let certificate = dir.join(format!("{account}.crt.pem"));
    let certificate_key = dir.join(format!("{account}.crt.key.pem"));
    std::fs::write(&certificate, bridge.pem())?;
    if certificate_key.exists() {
        std::fs::remove_file(&certificate_key)?;
    }
    crate::fsutil::write_private(&certificate_key, bridge.private_key_pem().as_bytes())?;
    Ok(Registration {
        jid: jid.to_owned(),
        fingerprint: certified.fingerprint().to_hex(),
        public_binary,
        public_armored,
        secret_armored,
        certificate,
        certificate_key,
    })
}
