//! Vonage (Nexmo): the SMS API for text messages with our code, and Verify (v1) for codes that
//! Vonage generates, sends and checks itself.
//!
//! Both APIs are described by Vonage's OpenAPI files (`definitions/sms.yml` and
//! `definitions/verify.yml` of Nexmo/api-specification); the request fields sent here are the ones
//! those files declare, and the tests check that against a copy of them.
//!
//! * `mode = "sms"`: `POST {base}/sms/json` (form-encoded: `api_key`, `api_secret`, `from`, `to`
//!   as digits without `+`, `text`, `ttl`, `client-ref`, `callback`, `type = unicode` when the text
//!   is not GSM-7). Vonage answers 200 even when it refuses: `messages[].status` says what
//!   happened (`0` is success; the other codes are the spec's `x-errors`). The code is ours.
//! * `mode = "verify"`: `POST {base}/verify/json` starts a verification with the SMS-only (pin) or
//!   TTS-only (voice) workflow; the answer's `request_id` is kept, and [`Provider::check`] asks
//!   `POST {base}/verify/check/json` whether the user's code is right.
//!
//! Delivery receipts (SMS mode) are authenticated by Vonage's `sig` parameter: the sorted
//! parameters, hashed with the account's signature secret (MD5 hash, or an HMAC with MD5, SHA-1,
//! SHA-256 or SHA-512, as chosen in Vonage's dashboard). Receipts are refused unless a signature
//! secret is configured, so that nobody else can mark our messages delivered or failed.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http;
use crate::http::scrub_numbers;
use crate::secret::constant_time_eq;
use crate::{
    Challenge, Credential, DeliveredCode, Delivery, DeliveryState, ErrorKind, Outgoing, Provider,
    ProviderError, Receipt, ReceiptError, ReceiptRequest, Secret,
};

/// Default base URL of the SMS API (the spec's server is `https://rest.nexmo.com/sms`).
pub const DEFAULT_SMS_BASE_URL: &str = "https://rest.nexmo.com";
/// Default base URL of Verify (the spec's server is `https://api.nexmo.com/verify`).
pub const DEFAULT_VERIFY_BASE_URL: &str = "https://api.nexmo.com";
/// Brand shown in Verify's messages when none is configured.
pub const DEFAULT_BRAND: &str = "Kontalk";
/// Verify's default sender id (the spec's `sender_id` default), shown when `from` is not set.
pub const VERIFY_DEFAULT_SENDER: &str = "VERIFY";

// SMS API `ttl` bounds, in milliseconds (NewMessage.ttl minimum/maximum).
const SMS_TTL_MIN_MS: u128 = 20_000;
const SMS_TTL_MAX_MS: u128 = 604_800_000;
// `client-ref`: "up to 40 characters".
const CLIENT_REF_MAX: usize = 40;
// Verify `pin_expiry` minimum, and `next_event_wait` maximum (seconds). With a single-event
// workflow the request ends after one `next_event_wait`, so that bounds the code's life too.
const VERIFY_WAIT_MIN_S: u64 = 60;
const VERIFY_WAIT_MAX_S: u64 = 900;
// Verify workflows 6 (SMS only) and 7 (TTS only), from Vonage's "Workflows and Events" guide.
const WORKFLOW_SMS: &str = "6";
const WORKFLOW_TTS: &str = "7";
// `brand` maxLength and `sender_id` maxLength in verifyRequest.
const BRAND_MAX: usize = 18;
const SENDER_ID_MAX: usize = 11;

/// Which Vonage API delivers the challenges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VonageMode {
    /// The SMS API sends our text with our code.
    Sms,
    /// Verify (v1) generates, sends and checks its own code.
    Verify,
}

/// How Vonage signs webhooks (the "signature method" chosen in Vonage's dashboard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureMethod {
    /// "MD5 hash": MD5 of the parameter string followed by the secret (Vonage's default).
    Md5hash,
    /// MD5 HMAC keyed with the secret.
    Md5,
    /// SHA-1 HMAC keyed with the secret.
    Sha1,
    /// SHA-256 HMAC keyed with the secret.
    Sha256,
    /// SHA-512 HMAC keyed with the secret.
    Sha512,
}

fn default_name() -> String {
    "vonage".into()
}

/// One `[[providers]]` entry of kind `vonage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VonageConfig {
    /// Name in logs and routing.
    #[serde(default = "default_name")]
    pub name: String,
    /// The account's API key.
    pub api_key: String,
    /// The account's API secret (inline or `{ env = "VAR" }`).
    pub api_secret: Credential,
    /// `sms` or `verify`.
    pub mode: VonageMode,
    /// Sender id: required in `sms` mode; in `verify` mode the `sender_id` (at most 11
    /// characters), Vonage's default `VERIFY` when unset.
    #[serde(default)]
    pub from: Option<String>,
    /// `verify` mode: the brand named in Vonage's message (at most 18 characters; default
    /// `Kontalk`).
    #[serde(default)]
    pub brand: Option<String>,
    /// The account's signature secret; delivery receipts are refused without it.
    #[serde(default)]
    pub signature_secret: Option<Credential>,
    /// The signature method set in Vonage's dashboard (default `md5hash`).
    #[serde(default)]
    pub signature_method: Option<SignatureMethod>,
    /// API base URL; default `https://rest.nexmo.com` (sms) or `https://api.nexmo.com` (verify).
    #[serde(default)]
    pub base_url: Option<String>,
    /// `sms` mode: where Vonage sends delivery receipts (overrides the dashboard's URL).
    #[serde(default)]
    pub status_callback: Option<String>,
    /// Timeout of one API call in seconds (default 10).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Challenges offered: `pin` (both modes) and `voice` (verify mode only); default `[pin]`.
    #[serde(default)]
    pub challenges: Option<Vec<Challenge>>,
}

/// The Vonage provider.
#[derive(Debug)]
pub struct VonageProvider {
    name: String,
    api_key: String,
    api_secret: Secret,
    mode: VonageMode,
    from: Option<String>,
    brand: String,
    signature: Option<(Secret, SignatureMethod)>,
    base_url: String,
    status_callback: Option<String>,
    challenges: Vec<Challenge>,
    client: reqwest::Client,
}

impl VonageProvider {
    /// Checks the configuration, reads the credentials and builds the HTTP client.
    pub fn new(config: VonageConfig) -> Result<Self, String> {
        let name = config.name;
        let what = |field: &str| format!("provider {name}: {field}");
        if name.trim().is_empty() {
            return Err("provider vonage: name is empty".into());
        }
        if config.api_key.trim().is_empty() {
            return Err(format!("{} is empty", what("api_key")));
        }
        let api_secret = config.api_secret.resolve(&what("api_secret"))?;
        let challenges = config.challenges.unwrap_or_else(|| vec![Challenge::Pin]);
        if challenges.is_empty() {
            return Err(format!("{} is empty", what("challenges")));
        }
        let from = config.from.filter(|f| !f.trim().is_empty());
        match config.mode {
            VonageMode::Sms => {
                if from.is_none() {
                    return Err(format!("{} is required in sms mode", what("from")));
                }
                if let Some(c) = challenges.iter().find(|c| **c != Challenge::Pin) {
                    return Err(format!(
                        "{}: the SMS API delivers only pin, not {c}",
                        what("challenges")
                    ));
                }
                if config.brand.is_some() {
                    return Err(format!("{} is used in verify mode only", what("brand")));
                }
            }
            VonageMode::Verify => {
                if let Some(c) = challenges.iter().find(|c| **c == Challenge::MissedCall) {
                    return Err(format!(
                        "{}: Verify delivers pin and voice, not {c}",
                        what("challenges")
                    ));
                }
                if config.status_callback.is_some() {
                    return Err(format!(
                        "{} is used in sms mode only (Verify v1 has no callback)",
                        what("status_callback")
                    ));
                }
                if let Some(f) = &from
                    && f.chars().count() > SENDER_ID_MAX
                {
                    return Err(format!(
                        "{} is longer than Verify's {SENDER_ID_MAX} characters",
                        what("from")
                    ));
                }
            }
        }
        let brand = config.brand.unwrap_or_else(|| DEFAULT_BRAND.to_owned());
        if brand.trim().is_empty() || brand.chars().count() > BRAND_MAX {
            return Err(format!(
                "{} must have 1 to {BRAND_MAX} characters",
                what("brand")
            ));
        }
        let signature = match (config.signature_secret, config.signature_method) {
            (Some(secret), method) => Some((
                secret.resolve(&what("signature_secret"))?,
                method.unwrap_or(SignatureMethod::Md5hash),
            )),
            (None, Some(_)) => {
                return Err(format!(
                    "{} is set without signature_secret",
                    what("signature_method")
                ));
            }
            (None, None) => None,
        };
        let base_url = config
            .base_url
            .unwrap_or_else(|| {
                match config.mode {
                    VonageMode::Sms => DEFAULT_SMS_BASE_URL,
                    VonageMode::Verify => DEFAULT_VERIFY_BASE_URL,
                }
                .to_owned()
            })
            .trim_end_matches('/')
            .to_owned();
        if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
            return Err(format!("{} must be an http(s) URL", what("base_url")));
        }
        let timeout = match config.timeout_seconds {
            None => http::DEFAULT_TIMEOUT,
            Some(0) => return Err(format!("{} must be at least 1", what("timeout_seconds"))),
            Some(s) => Duration::from_secs(s),
        };
        let client = http::client(timeout).map_err(|e| format!("provider {name}: {e}"))?;
        Ok(Self {
            api_key: config.api_key,
            api_secret,
            mode: config.mode,
            from,
            brand,
            signature,
            base_url,
            status_callback: config.status_callback,
            challenges,
            client,
            name,
        })
    }

    fn error(&self, kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError::new(&self.name, kind, message)
    }

    /// Removes the credentials, and anything that looks like a phone number, from an error
    /// whose text may quote an answer.
    fn redact(&self, mut e: ProviderError) -> ProviderError {
        e.message = e.message.replace(self.api_secret.expose(), "<redacted>");
        if let Some((secret, _)) = &self.signature {
            e.message = e.message.replace(secret.expose(), "<redacted>");
        }
        e.message = scrub_numbers(&e.message);
        e
    }

    /// POSTs a form and returns the JSON answer of a 2xx response.
    async fn post_form(&self, url: &str, form: &[(&str, String)]) -> Result<Value, ProviderError> {
        let response = self
            .client
            .post(url)
            .form(form)
            .send()
            .await
            .map_err(|e| http::transport_error(&self.name, e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| http::transport_error(&self.name, e))?;
        if !status.is_success() {
            return Err(http::status_error(&self.name, status, &body));
        }
        // The body echoes the destination number: never put it in an error.
        serde_json::from_str(&body).map_err(|_| {
            self.error(
                ErrorKind::Transient,
                format!(
                    "unreadable answer (HTTP {}, {} bytes)",
                    status.as_u16(),
                    body.len()
                ),
            )
        })
    }

    async fn send_sms(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        let to = digits_only(&message.to).ok_or_else(|| {
            self.error(
                ErrorKind::InvalidNumber,
                "the destination is not an E.164 number of 7 to 15 digits",
            )
        })?;
        let from = self.from.clone().unwrap_or_default();
        let ttl = message
            .valid_for
            .as_millis()
            .clamp(SMS_TTL_MIN_MS, SMS_TTL_MAX_MS);
        let mut form: Vec<(&str, String)> = vec![
            ("api_key", self.api_key.clone()),
            ("api_secret", self.api_secret.expose().to_owned()),
            ("from", from.clone()),
            ("to", to),
            ("text", message.text.clone()),
            ("ttl", ttl.to_string()),
            (
                "client-ref",
                message.reference.chars().take(CLIENT_REF_MAX).collect(),
            ),
        ];
        if !is_gsm7(&message.text) {
            form.push(("type", "unicode".into()));
        }
        if let Some(callback) = &self.status_callback {
            form.push(("callback", callback.clone()));
        }
        let answer = self
            .post_form(&format!("{}/sms/json", self.base_url), &form)
            .await?;
        let messages = answer
            .get("messages")
            .and_then(Value::as_array)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| self.error(ErrorKind::Transient, "answer without messages"))?;
        for m in messages {
            let status = m.get("status").and_then(as_code).unwrap_or_default();
            if status != "0" {
                let text = m.get("error-text").and_then(Value::as_str).unwrap_or("");
                return Err(self.error(
                    sms_status_kind(&status),
                    format!("SMS API status {status}: {}", http::excerpt(text)),
                ));
            }
        }
        let provider_ref = messages
            .first()
            .and_then(|m| m.get("message-id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Delivery {
            sender: from,
            instructions: None,
            provider_ref,
            code: DeliveredCode::Ours,
        })
    }

    async fn send_verify(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        let number = digits_only(&message.to).ok_or_else(|| {
            self.error(
                ErrorKind::InvalidNumber,
                "the destination is not an E.164 number of 7 to 15 digits",
            )
        })?;
        let wait = message
            .valid_for
            .as_secs()
            .clamp(VERIFY_WAIT_MIN_S, VERIFY_WAIT_MAX_S)
            .to_string();
        let workflow = match message.challenge {
            Challenge::Voice => WORKFLOW_TTS,
            _ => WORKFLOW_SMS,
        };
        let mut form: Vec<(&str, String)> = vec![
            ("api_key", self.api_key.clone()),
            ("api_secret", self.api_secret.expose().to_owned()),
            ("number", number),
            ("brand", self.brand.clone()),
            ("workflow_id", workflow.into()),
            ("pin_expiry", wait.clone()),
            ("next_event_wait", wait),
        ];
        if matches!(message.code.len(), 4 | 6) {
            form.push(("code_length", message.code.len().to_string()));
        }
        if let Some(lg) = message.locale.as_deref().and_then(verify_language) {
            form.push(("lg", lg.into()));
        }
        if let Some(from) = &self.from {
            form.push(("sender_id", from.clone()));
        }
        let answer = self
            .post_form(&format!("{}/verify/json", self.base_url), &form)
            .await?;
        let status = answer.get("status").and_then(as_code).unwrap_or_default();
        if status != "0" {
            let text = answer
                .get("error_text")
                .and_then(Value::as_str)
                .unwrap_or("");
            return Err(self.error(
                verify_request_status_kind(&status, text),
                format!("Verify status {status}: {}", http::excerpt(text)),
            ));
        }
        let request_id = answer
            .get("request_id")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                self.error(ErrorKind::Transient, "Verify answered without request_id")
            })?;
        Ok(Delivery {
            sender: self
                .from
                .clone()
                .unwrap_or_else(|| VERIFY_DEFAULT_SENDER.to_owned()),
            instructions: None,
            provider_ref: Some(request_id.to_owned()),
            code: DeliveredCode::ProviderChecks,
        })
    }
}

#[async_trait]
impl Provider for VonageProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn challenges(&self) -> &[Challenge] {
        &self.challenges
    }

    fn sends_our_code(&self, _: Challenge) -> bool {
        self.mode == VonageMode::Sms
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        if !self.challenges.contains(&message.challenge) {
            return Err(self.error(
                ErrorKind::Unsupported,
                format!("challenge {} is not enabled", message.challenge),
            ));
        }
        match self.mode {
            VonageMode::Sms => self.send_sms(message).await,
            VonageMode::Verify => self.send_verify(message).await,
        }
        .map_err(|e| self.redact(e))
    }

    async fn check(&self, provider_ref: &str, code: &str) -> Result<bool, ProviderError> {
        if self.mode != VonageMode::Verify {
            return Err(self.error(ErrorKind::Unsupported, "the SMS API does not check codes"));
        }
        // checkRequest.code: 4 to 6 characters; anything else cannot be right.
        if !(4..=6).contains(&code.chars().count()) {
            return Ok(false);
        }
        let form: Vec<(&str, String)> = vec![
            ("api_key", self.api_key.clone()),
            ("api_secret", self.api_secret.expose().to_owned()),
            ("request_id", provider_ref.to_owned()),
            ("code", code.to_owned()),
        ];
        let answer = self
            .post_form(&format!("{}/verify/check/json", self.base_url), &form)
            .await
            .map_err(|e| self.redact(e))?;
        let status = answer.get("status").and_then(as_code).unwrap_or_default();
        match status.as_str() {
            "0" => Ok(true),
            // 16: wrong code; 17: too many wrong codes (request terminated); 6: unknown or no
            // longer active request (expired, or verified already).
            "16" | "17" | "6" => Ok(false),
            _ => {
                let text = answer
                    .get("error_text")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                Err(self.redact(self.error(
                    check_status_kind(&status),
                    format!("Verify check status {status}: {}", http::excerpt(text)),
                )))
            }
        }
    }

    fn parse_receipt(&self, request: &ReceiptRequest<'_>) -> Result<Receipt, ReceiptError> {
        if self.mode != VonageMode::Sms {
            return Err(ReceiptError::Unsupported);
        }
        let Some((secret, method)) = &self.signature else {
            return Err(ReceiptError::Unauthenticated);
        };
        let params = receipt_params(request)?;
        let sig = params
            .get("sig")
            .ok_or(ReceiptError::Unauthenticated)?
            .trim();
        if !verify_signature(&params, secret.expose(), *method, sig) {
            return Err(ReceiptError::Unauthenticated);
        }
        // The signature covers `api-key`; a receipt of another account is not ours.
        if let Some(key) = params.get("api-key")
            && key != &self.api_key
        {
            return Err(ReceiptError::Unauthenticated);
        }
        let message_id = params
            .get("messageId")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ReceiptError::Malformed("no messageId".into()))?;
        let status = params
            .get("status")
            .ok_or_else(|| ReceiptError::Malformed("no status".into()))?;
        Ok(Receipt {
            provider_ref: message_id.clone(),
            state: dlr_state(status),
        })
    }
}

/// The E.164 number as Vonage wants it: 7 to 15 digits, no `+` (NewMessage.to `\d{7,15}`).
fn digits_only(e164: &str) -> Option<String> {
    let digits = e164.strip_prefix('+').unwrap_or(e164);
    (digits.len() >= 7 && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.to_owned())
}

/// A status code given as a string (as the specs say) or, leniently, as a number.
fn as_code(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What an SMS API `status` (the spec's `x-errors`) means.
fn sms_status_kind(status: &str) -> ErrorKind {
    match status {
        // 1 throttled, 5 internal error, 10 too many existing binds ("back-off and retry").
        "1" | "5" | "10" => ErrorKind::Transient,
        // 6 invalid message ("an un-recognized number prefix"), 33 number de-activated.
        "6" | "33" => ErrorKind::InvalidNumber,
        // 7 number barred, 29 non-whitelisted destination (demo account).
        "7" | "29" => ErrorKind::Blocked,
        // 2 missing parameters, 3 invalid parameters, 4 invalid credentials, 8 account barred,
        // 9 quota, 11 not enabled for HTTP, 12 too long, 14 invalid signature, 15 invalid sender,
        // 22 invalid network code, 23 invalid callback, 32 signature and secret: configuration.
        _ => ErrorKind::Permanent,
    }
}

/// What a Verify request `status` (requestErrorResponse) means.
fn verify_request_status_kind(status: &str, error_text: &str) -> ErrorKind {
    match status {
        // 1 throttled, 5 internal error, 10 concurrent verifications to the same number (the
        // earlier one must end first: another provider, or later, can deliver).
        "1" | "5" | "10" => ErrorKind::Transient,
        // 3 invalid parameter: the spec's example is "Invalid value for number".
        "3" if error_text.to_ascii_lowercase().contains("number") => ErrorKind::InvalidNumber,
        // 6 "The request could not be routed".
        "6" => ErrorKind::InvalidNumber,
        // 7 blacklisted number, 15 destination not in a supported network, 29 non-permitted
        // destination (demo account).
        "7" | "15" | "29" => ErrorKind::Blocked,
        _ => ErrorKind::Permanent,
    }
}

/// What a Verify check `status` other than 0, 6, 16 and 17 means.
fn check_status_kind(status: &str) -> ErrorKind {
    match status {
        "1" | "5" => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    }
}

/// A delivery receipt's `status` (DeliveryReceipt.status x-possible-values).
fn dlr_state(status: &str) -> DeliveryState {
    match status.trim().to_ascii_lowercase().as_str() {
        "delivered" => DeliveryState::Delivered,
        "failed" | "rejected" | "expired" => DeliveryState::Failed,
        // accepted, buffered, unknown, and anything new.
        _ => DeliveryState::Pending,
    }
}

/// Languages of Verify's `lg` (verifyRequest.lg enum).
const VERIFY_LANGUAGES: &[&str] = &[
    "ar-xa", "cs-cz", "cy-cy", "cy-gb", "da-dk", "de-de", "el-gr", "en-au", "en-gb", "en-in",
    "en-us", "es-es", "es-mx", "es-us", "fi-fi", "fil-ph", "fr-ca", "fr-fr", "hi-in", "hu-hu",
    "id-id", "is-is", "it-it", "ja-jp", "ko-kr", "nb-no", "nl-nl", "pl-pl", "pt-br", "pt-pt",
    "ro-ro", "ru-ru", "sv-se", "th-th", "tr-tr", "vi-vn", "yue-cn", "zh-cn", "zh-tw",
];

/// Verify's `lg` for a client locale (`it`, `pt-BR`, `en_GB`), when Verify has that language.
pub fn verify_language(locale: &str) -> Option<&'static str> {
    let locale = locale.trim().replace('_', "-").to_ascii_lowercase();
    let find = |tag: &str| VERIFY_LANGUAGES.iter().copied().find(|l| *l == tag);
    if let Some(l) = find(&locale) {
        return Some(l);
    }
    let mut parts = locale.split('-');
    let language = parts.next().filter(|l| !l.is_empty())?;
    if language == "zh" && parts.any(|p| p == "tw" || p == "hant") {
        return find("zh-tw");
    }
    let preferred = match language {
        "en" => "en-us",
        "es" => "es-es",
        "fr" => "fr-fr",
        "pt" => "pt-pt",
        "zh" => "zh-cn",
        "ar" => "ar-xa",
        "cy" => "cy-gb",
        "nb" | "no" | "nn" => "nb-no",
        "fil" | "tl" => "fil-ph",
        _ => "",
    };
    if !preferred.is_empty() {
        return find(preferred);
    }
    if let Some(l) = find(&format!("{language}-{language}")) {
        return Some(l);
    }
    let mut same = VERIFY_LANGUAGES
        .iter()
        .copied()
        .filter(|l| l.split('-').next() == Some(language));
    match (same.next(), same.next()) {
        (Some(l), None) => Some(l),
        _ => None,
    }
}

/// Whether `text` fits the GSM 03.38 alphabet (basic set and extension table), i.e. can go with
/// the SMS API's default `type = text`.
fn is_gsm7(text: &str) -> bool {
    const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                         ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const EXTENSION: &str = "\u{c}^{}\\[~]|€";
    text.chars()
        .all(|c| BASIC.contains(c) || EXTENSION.contains(c))
}

/// The parameters of a delivery receipt: the query of a GET; the form or JSON body of a POST
/// (its query when the body is empty).
fn receipt_params(request: &ReceiptRequest<'_>) -> Result<BTreeMap<String, String>, ReceiptError> {
    let pairs: Vec<(String, String)> = if request.method.eq_ignore_ascii_case("GET")
        || request.body.iter().all(u8::is_ascii_whitespace)
    {
        let query = request
            .url
            .split_once('?')
            .map(|(_, q)| q.split('#').next().unwrap_or(""))
            .unwrap_or("");
        serde_urlencoded::from_str(query)
            .map_err(|_| ReceiptError::Malformed("unreadable query".into()))?
    } else if request
        .header("content-type")
        .is_some_and(|t| t.to_ascii_lowercase().contains("json"))
    {
        let value: Value = serde_json::from_slice(request.body)
            .map_err(|_| ReceiptError::Malformed("unreadable JSON body".into()))?;
        let Value::Object(map) = value else {
            return Err(ReceiptError::Malformed("the body is not an object".into()));
        };
        map.into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect()
    } else {
        serde_urlencoded::from_bytes(request.body)
            .map_err(|_| ReceiptError::Malformed("unreadable form body".into()))?
    };
    let mut params = BTreeMap::new();
    for (k, v) in pairs {
        if params.insert(k, v).is_some() {
            return Err(ReceiptError::Malformed("a parameter is repeated".into()));
        }
    }
    Ok(params)
}

/// The string Vonage signs: `&key=value` for every parameter but `sig`, sorted by key, with `&`
/// and `=` in values replaced by `_` ("Signing Messages", manual generation, step 1).
fn signing_string(params: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (k, v) in params.iter().filter(|(k, _)| k.as_str() != "sig") {
        s.push('&');
        s.push_str(k);
        s.push('=');
        s.push_str(&v.replace(['&', '='], "_"));
    }
    s
}

/// The signature of `params` with `secret`, as bytes (Vonage sends them in hexadecimal).
pub fn signature(
    params: &BTreeMap<String, String>,
    secret: &str,
    method: SignatureMethod,
) -> Vec<u8> {
    use md5::Digest;
    let data = signing_string(params);
    fn hmac<M: Mac + hmac::digest::KeyInit>(key: &str, data: &str) -> Vec<u8> {
        match <M as hmac::digest::KeyInit>::new_from_slice(key.as_bytes()) {
            Ok(mut mac) => {
                mac.update(data.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            // HMAC takes keys of any length.
            Err(_) => Vec::new(),
        }
    }
    match method {
        SignatureMethod::Md5hash => {
            let mut h = md5::Md5::new();
            h.update(data.as_bytes());
            h.update(secret.as_bytes());
            h.finalize().to_vec()
        }
        SignatureMethod::Md5 => hmac::<Hmac<md5::Md5>>(secret, &data),
        SignatureMethod::Sha1 => hmac::<Hmac<sha1::Sha1>>(secret, &data),
        SignatureMethod::Sha256 => hmac::<Hmac<sha2::Sha256>>(secret, &data),
        SignatureMethod::Sha512 => hmac::<Hmac<sha2::Sha512>>(secret, &data),
    }
}

/// Whether `sig` (hexadecimal, either case) is the signature of `params`; constant-time.
fn verify_signature(
    params: &BTreeMap<String, String>,
    secret: &str,
    method: SignatureMethod,
    sig: &str,
) -> bool {
    let Ok(given) = hex::decode(sig) else {
        return false;
    };
    let expected = signature(params, secret, method);
    !expected.is_empty() && constant_time_eq(&expected, &given)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_lose_the_plus_and_must_be_digits() {
        assert_eq!(
            digits_only("+447700900000").as_deref(),
            Some("447700900000")
        );
        assert_eq!(digits_only("+1234"), None);
        assert_eq!(digits_only("+44 7700 900000"), None);
        assert_eq!(digits_only("+1234567890123456"), None);
    }

    #[test]
    fn gsm7_detection() {
        assert!(is_gsm7("Your Kontalk code: 123456 [ok] €5 àèìòù"));
        assert!(!is_gsm7("Il tuo codice è 123456 — grazie"));
        assert!(!is_gsm7("Код 123456"));
    }

    #[test]
    fn languages_map_to_the_spec_enum() {
        assert_eq!(verify_language("it"), Some("it-it"));
        assert_eq!(verify_language("pt-BR"), Some("pt-br"));
        assert_eq!(verify_language("pt"), Some("pt-pt"));
        assert_eq!(verify_language("en"), Some("en-us"));
        assert_eq!(verify_language("en_GB"), Some("en-gb"));
        assert_eq!(verify_language("es-AR"), Some("es-es"));
        assert_eq!(verify_language("zh-Hant-TW"), Some("zh-tw"));
        assert_eq!(verify_language("ja"), Some("ja-jp"));
        assert_eq!(verify_language("cs"), Some("cs-cz"));
        assert_eq!(verify_language("he"), None);
        assert_eq!(verify_language(""), None);
    }

    #[test]
    fn every_language_is_in_the_spec_enum() {
        let spec = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vonage/spec/verify.yml"
        ))
        .unwrap();
        // The verifyRequest lg enum starts at "ar-xa" and ends at "zh-tw".
        let start = spec.find("            - ar-xa").unwrap();
        let end = start + spec[start..].find("            - zh-tw").unwrap();
        let listed: Vec<&str> = spec[start..end + 20]
            .lines()
            .map(|l| l.trim().trim_start_matches("- "))
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(listed, VERIFY_LANGUAGES);
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(sms_status_kind("1"), ErrorKind::Transient);
        assert_eq!(sms_status_kind("6"), ErrorKind::InvalidNumber);
        assert_eq!(sms_status_kind("7"), ErrorKind::Blocked);
        assert_eq!(sms_status_kind("29"), ErrorKind::Blocked);
        assert_eq!(sms_status_kind("4"), ErrorKind::Permanent);
        assert_eq!(
            verify_request_status_kind("3", "Invalid value for number"),
            ErrorKind::InvalidNumber
        );
        assert_eq!(
            verify_request_status_kind("3", "Invalid value for brand"),
            ErrorKind::Permanent
        );
        assert_eq!(verify_request_status_kind("15", ""), ErrorKind::Blocked);
        assert_eq!(check_status_kind("1"), ErrorKind::Transient);
    }

    #[test]
    fn signing_string_sorts_and_sanitises() {
        let params: BTreeMap<String, String> = [
            ("text", "You & Me = Love"),
            ("api_key", "abcd1234"),
            ("sig", "ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            signing_string(&params),
            "&api_key=abcd1234&text=You _ Me _ Love"
        );
    }
}
