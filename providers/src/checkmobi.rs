//! CheckMobi: missed call ("reverse CLI"), SMS and IVR (voice) validations, checked by CheckMobi.
//!
//! CheckMobi publishes no machine-readable API description; the shapes used here come from its
//! REST API reference (<https://checkmobi.com/documentation/api-reference/>), its missed-call
//! guideline and its official SDKs (see `tests/fixtures/checkmobi/README.md`, which also lists what
//! could not be confirmed).
//!
//! * Every request carries the secret key as the `Authorization` header; bodies are JSON.
//! * `POST {base}/v1/validation/request` with `{"number": "+E164", "type": ...}` starts a
//!   validation: `reverse_cli` (a missed call whose caller number ends in the 4-digit pin),
//!   `sms`, or `ivr` (a call reading the pin). The answer's `id` is the delivery's reference.
//!   `cli` (the user calls CheckMobi) is never used: a caller id can be spoofed.
//! * `POST {base}/v1/validation/verify` with `{"id", "pin"}` answers `{"validated": bool}`.
//! * Errors are `{"code": N, "error": "..."}` with an HTTP 4xx status.
//!
//! For a missed call the client is told the caller number with `?` for each digit to type
//! (`+44-7xxx????`), built from what the answer reveals of the calling number.
//!
//! CheckMobi does not sign its status callbacks: a callback is accepted only when its URL carries
//! the configured `callback_token` (`?token=...`), which this provider appends to the
//! `notification_callback` URL it gives CheckMobi.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::http;
use crate::http::scrub_numbers;
use crate::secret::constant_time_eq;
use crate::{
    Challenge, Credential, DeliveredCode, Delivery, DeliveryState, ErrorKind, Outgoing, Provider,
    ProviderError, Receipt, ReceiptError, ReceiptRequest, Secret,
};

/// Default API base URL (the API version, `v1`, is part of each path).
pub const DEFAULT_BASE_URL: &str = "https://api.checkmobi.com";
/// Sender shown to the client for SMS and IVR when none is configured.
pub const DEFAULT_SENDER: &str = "CheckMobi";
/// Digits of the caller number the user types after a missed call (the missed-call guideline:
/// "the last 4 digits from the incoming call number").
pub const MISSED_CALL_DIGITS: usize = 4;
/// The sender shown for a missed call when CheckMobi's answer says nothing of the caller number.
pub const UNKNOWN_CALLER_MASK: &str = "+xx-xxxxxx????";

// Error codes of CheckMobi's error bodies (as enumerated by its Android SDK, `ErrorCode.java`).
const ERR_INVALID_API_KEY: i64 = 1;
const ERR_INVALID_PHONE_NUMBER: i64 = 2;
const ERR_INVALID_REQUEST_ID: i64 = 3;
const ERR_INVALID_VALIDATION_TYPE: i64 = 4;
const ERR_NOT_AVAILABLE_IN_REGION: i64 = 8;

fn default_name() -> String {
    "checkmobi".into()
}
fn default_base_url() -> String {
    DEFAULT_BASE_URL.into()
}
fn default_challenges() -> Vec<Challenge> {
    vec![Challenge::MissedCall, Challenge::Pin]
}

/// One `[[providers]]` entry of kind `checkmobi`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckMobiConfig {
    /// Name in logs and routing.
    #[serde(default = "default_name")]
    pub name: String,
    /// The secret key (inline or `{ env = "VAR" }`), sent as the `Authorization` header.
    pub secret_key: Credential,
    /// API base URL (default `https://api.checkmobi.com`).
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Challenges offered: `missedcall` (reverse_cli), `pin` (sms), `voice` (ivr); default
    /// `[missedcall, pin]`.
    #[serde(default = "default_challenges")]
    pub challenges: Vec<Challenge>,
    /// Timeout of one API call in seconds (default 10).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// The `platform` field of validation requests (`ios`, `android`, `web`, `desktop`), for
    /// CheckMobi's analytics.
    #[serde(default)]
    pub platform: Option<String>,
    /// Sender shown to the client for `pin` and `voice` (default `CheckMobi`).
    #[serde(default)]
    pub sender: Option<String>,
    /// Receipts URL given to CheckMobi as `notification_callback`; needs `callback_token`.
    #[serde(default)]
    pub status_callback: Option<String>,
    /// Token appended to `status_callback` as `token=...` and required on every callback.
    #[serde(default)]
    pub callback_token: Option<Credential>,
}

/// The CheckMobi provider.
#[derive(Debug)]
pub struct CheckMobiProvider {
    name: String,
    secret_key: Secret,
    base_url: String,
    challenges: Vec<Challenge>,
    platform: Option<String>,
    sender: String,
    // The notification_callback URL, token included: secret.
    notification_callback: Option<Secret>,
    callback_token: Option<Secret>,
    client: reqwest::Client,
}

impl CheckMobiProvider {
    /// Checks the configuration, reads the credentials and builds the HTTP client.
    pub fn new(config: CheckMobiConfig) -> Result<Self, String> {
        let name = config.name;
        if name.trim().is_empty() {
            return Err("provider checkmobi: name is empty".into());
        }
        let what = |field: &str| format!("provider {name}: {field}");
        let secret_key = config.secret_key.resolve(&what("secret_key"))?;
        if config.challenges.is_empty() {
            return Err(format!("{} is empty", what("challenges")));
        }
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
            return Err(format!("{} must be an http(s) URL", what("base_url")));
        }
        let callback_token = config
            .callback_token
            .map(|t| t.resolve(&what("callback_token")))
            .transpose()?;
        let notification_callback = match (&config.status_callback, &callback_token) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(format!(
                    "{} needs callback_token: CheckMobi does not sign callbacks",
                    what("status_callback")
                ));
            }
            (Some(url), Some(token)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(format!(
                        "{} must be an http(s) URL",
                        what("status_callback")
                    ));
                }
                let query = serde_urlencoded::to_string([("token", token.expose())])
                    .map_err(|e| format!("{}: {e}", what("callback_token")))?;
                let sep = if url.contains('?') { '&' } else { '?' };
                Some(Secret::new(format!("{url}{sep}{query}")))
            }
        };
        let timeout = match config.timeout_seconds {
            None => http::DEFAULT_TIMEOUT,
            Some(0) => return Err(format!("{} must be at least 1", what("timeout_seconds"))),
            Some(s) => Duration::from_secs(s),
        };
        let client = http::client(timeout).map_err(|e| format!("provider {name}: {e}"))?;
        Ok(Self {
            secret_key,
            base_url,
            challenges: config.challenges,
            platform: config.platform.filter(|p| !p.trim().is_empty()),
            sender: config
                .sender
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SENDER.to_owned()),
            notification_callback,
            callback_token,
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
        e.message = e.message.replace(self.secret_key.expose(), "<redacted>");
        if let Some(token) = &self.callback_token {
            e.message = e.message.replace(token.expose(), "<redacted>");
        }
        e.message = scrub_numbers(&e.message);
        e
    }

    /// POSTs `body` to `{base}/v1/{path}`: the JSON object of a successful answer, or the error
    /// ([`CallError::Api`] with CheckMobi's error code when it gave one, for callers that treat
    /// some codes as answers).
    async fn post(&self, path: &str, body: &Value) -> Result<Map<String, Value>, CallError> {
        let response = self
            .client
            .post(format!("{}/v1/{path}", self.base_url))
            .header("Authorization", self.secret_key.expose())
            .json(body)
            .send()
            .await
            .map_err(|e| CallError::Other(http::transport_error(&self.name, e)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| CallError::Other(http::transport_error(&self.name, e)))?;
        let parsed: Option<Map<String, Value>> = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            });
        // An error body: {"code": N, "error": "..."}, normally with a 4xx status.
        let error_code = parsed
            .as_ref()
            .filter(|m| m.contains_key("error") || !status.is_success())
            .and_then(|m| m.get("code"))
            .and_then(|c| {
                c.as_i64()
                    .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
            });
        if !status.is_success() || error_code.is_some() {
            let message = parsed
                .as_ref()
                .and_then(|m| m.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let kind = if http::status_kind(status) == ErrorKind::Transient {
                ErrorKind::Transient
            } else {
                error_code.map_or_else(|| http::status_kind(status), code_kind)
            };
            return Err(CallError::Api {
                code: error_code,
                error: self.redact(self.error(
                    kind,
                    format!(
                        "HTTP {}, error {}: {}",
                        status.as_u16(),
                        error_code.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                        http::excerpt(message)
                    ),
                )),
            });
        }
        // The answer may carry the number: never put it in an error.
        parsed.ok_or_else(|| {
            CallError::Other(self.error(
                ErrorKind::Transient,
                format!(
                    "unreadable answer (HTTP {}, {} bytes)",
                    status.as_u16(),
                    text.len()
                ),
            ))
        })
    }
}

/// A failed API call.
enum CallError {
    /// CheckMobi answered with an error (status, and error code when the body gave one).
    Api {
        code: Option<i64>,
        error: ProviderError,
    },
    /// No usable answer (transport failure, unreadable body).
    Other(ProviderError),
}

impl CallError {
    fn into_error(self) -> ProviderError {
        match self {
            CallError::Api { error, .. } | CallError::Other(error) => error,
        }
    }
}

/// What a CheckMobi error code means.
fn code_kind(code: i64) -> ErrorKind {
    match code {
        ERR_INVALID_PHONE_NUMBER => ErrorKind::InvalidNumber,
        ERR_NOT_AVAILABLE_IN_REGION => ErrorKind::Blocked,
        ERR_INVALID_VALIDATION_TYPE => ErrorKind::Unsupported,
        // 1 invalid API key, 3 invalid request id, 5 insufficient funds, 6 insufficient CLI
        // validations, 7 invalid request payload, 9 invalid notification URL, 10 invalid event
        // payload, and codes not known here.
        ERR_INVALID_API_KEY | ERR_INVALID_REQUEST_ID => ErrorKind::Permanent,
        _ => ErrorKind::Permanent,
    }
}

/// The validation id, given as a string (or, leniently, a number).
fn id_of(answer: &Map<String, Value>) -> Option<String> {
    match answer.get("id")? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What the validation answer says of the calling number: `(sender mask, code)`.
///
/// * `pin_info.number`, a full number (digits and separators only): the mask hides its last 4
///   digits, and the code is known (those digits).
/// * `pin_info.number` already masked (`+44-7xxx????`, `+447XXXXXXXX`): the last 4 digit places
///   become `?`, other hidden places `x`; CheckMobi checks the code.
/// * `cli_prefix`, the calling number without its last digits: followed by `????`.
/// * nothing: [`UNKNOWN_CALLER_MASK`].
fn missed_call_sender(answer: &Map<String, Value>) -> (String, Option<String>) {
    let caller = answer
        .get("pin_info")
        .and_then(|p| p.get("number"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty());
    if let Some(caller) = caller {
        let is_separator = |c: char| matches!(c, ' ' | '-' | '(' | ')' | '.');
        let full = caller
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_digit() || is_separator(c) || (i == 0 && c == '+'));
        let digits: String = caller.chars().filter(char::is_ascii_digit).collect();
        if full && digits.len() > MISSED_CALL_DIGITS {
            let code = digits[digits.len() - MISSED_CALL_DIGITS..].to_owned();
            return (
                crate::missed_call_mask(&format!("+{digits}"), MISSED_CALL_DIGITS),
                Some(code),
            );
        }
        if !full {
            return (mask_tail(caller), None);
        }
    }
    if let Some(prefix) = answer
        .get("cli_prefix")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        return (format!("{prefix}{}", "?".repeat(MISSED_CALL_DIGITS)), None);
    }
    (UNKNOWN_CALLER_MASK.to_owned(), None)
}

/// A masked caller number with its last [`MISSED_CALL_DIGITS`] digit places turned into `?`
/// and any other hidden place into `x`.
fn mask_tail(masked: &str) -> String {
    let is_place = |c: char| c.is_ascii_digit() || matches!(c, 'x' | 'X' | '*' | '#' | '?');
    let mut out: Vec<char> = masked.chars().collect();
    let mut remaining = MISSED_CALL_DIGITS;
    for c in out.iter_mut().rev() {
        if is_place(*c) {
            if remaining > 0 {
                *c = '?';
                remaining -= 1;
            } else if !c.is_ascii_digit() {
                *c = 'x';
            }
        }
    }
    out.into_iter().collect()
}

#[async_trait]
impl Provider for CheckMobiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn challenges(&self) -> &[Challenge] {
        &self.challenges
    }

    /// CheckMobi checks its SMS and voice codes and chooses the missed call's caller number.
    fn sends_our_code(&self, _: Challenge) -> bool {
        false
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        if !self.challenges.contains(&message.challenge) {
            return Err(self.error(
                ErrorKind::Unsupported,
                format!("challenge {} is not enabled", message.challenge),
            ));
        }
        let kind = match message.challenge {
            Challenge::MissedCall => "reverse_cli",
            Challenge::Pin => "sms",
            Challenge::Voice => "ivr",
        };
        let mut body = json!({ "number": message.to, "type": kind });
        if let Some(platform) = &self.platform {
            body["platform"] = json!(platform);
        }
        if let Some(callback) = &self.notification_callback {
            body["notification_callback"] = json!(callback.expose());
        }
        let answer = self
            .post("validation/request", &body)
            .await
            .map_err(CallError::into_error)?;
        let id = id_of(&answer)
            .ok_or_else(|| self.error(ErrorKind::Transient, "answer without a validation id"))?;
        let (sender, code) = match message.challenge {
            Challenge::MissedCall => {
                let (mask, code) = missed_call_sender(&answer);
                (
                    mask,
                    code.map_or(DeliveredCode::ProviderChecks, DeliveredCode::Chosen),
                )
            }
            Challenge::Pin | Challenge::Voice => {
                (self.sender.clone(), DeliveredCode::ProviderChecks)
            }
        };
        Ok(Delivery {
            sender,
            instructions: None,
            provider_ref: Some(id),
            code,
        })
    }

    async fn check(&self, provider_ref: &str, code: &str) -> Result<bool, ProviderError> {
        let body = json!({ "id": provider_ref, "pin": code });
        match self.post("validation/verify", &body).await {
            Ok(answer) => answer
                .get("validated")
                .and_then(Value::as_bool)
                .ok_or_else(|| self.error(ErrorKind::Transient, "answer without validated")),
            // An unknown (or expired) validation id: the code cannot be right.
            Err(CallError::Api {
                code: Some(ERR_INVALID_REQUEST_ID),
                error,
            }) if !error.is_transient() => Ok(false),
            Err(e) => Err(e.into_error()),
        }
    }

    fn parse_receipt(&self, request: &ReceiptRequest<'_>) -> Result<Receipt, ReceiptError> {
        let Some(expected) = &self.callback_token else {
            return Err(ReceiptError::Unauthenticated);
        };
        let query = request
            .url
            .split_once('?')
            .map(|(_, q)| q.split('#').next().unwrap_or(""))
            .unwrap_or("");
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|_| ReceiptError::Unauthenticated)?;
        let mut tokens = pairs.iter().filter(|(k, _)| k == "token");
        let (Some((_, token)), None) = (tokens.next(), tokens.next()) else {
            return Err(ReceiptError::Unauthenticated);
        };
        if !constant_time_eq(token.as_bytes(), expected.expose().as_bytes()) {
            return Err(ReceiptError::Unauthenticated);
        }
        let fields = callback_fields(request)?;
        let id = id_of(&fields).ok_or_else(|| ReceiptError::Malformed("no id".into()))?;
        Ok(Receipt {
            provider_ref: id,
            state: callback_state(&fields),
        })
    }
}

/// The callback's fields: a JSON object, or (leniently) a form.
fn callback_fields(request: &ReceiptRequest<'_>) -> Result<Map<String, Value>, ReceiptError> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(request.body) {
        return Ok(map);
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(request.body)
        .map_err(|_| ReceiptError::Malformed("unreadable body".into()))?;
    if pairs.is_empty() {
        return Err(ReceiptError::Malformed("empty body".into()));
    }
    Ok(pairs
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect())
}

/// What a callback says: `validated: true` means the user got through; otherwise its `status`.
fn callback_state(fields: &Map<String, Value>) -> DeliveryState {
    let validated = match fields.get("validated") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    };
    if validated {
        return DeliveryState::Delivered;
    }
    let status = fields
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .replace(['-', ' '], "_");
    match status.as_str() {
        "delivered" | "validated" | "completed" | "answered" => DeliveryState::Delivered,
        "failed" | "undelivered" | "rejected" | "expired" | "error" | "canceled" | "cancelled"
        | "invalid" => DeliveryState::Failed,
        _ => DeliveryState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn masks_from_what_the_answer_reveals() {
        let (s, c) =
            missed_call_sender(&answer(json!({"pin_info": {"number": "+44 20 3807 9421"}})));
        assert_eq!((s.as_str(), c.as_deref()), ("+44203807????", Some("9421")));
        let (s, c) = missed_call_sender(&answer(json!({"pin_info": {"number": "+44-7xxx-xxxx"}})));
        assert_eq!((s.as_str(), c), ("+44-7xxx-????", None));
        let (s, _) = missed_call_sender(&answer(json!({"pin_info": {"number": "+447XXXXXXXXX"}})));
        assert_eq!(s, "+447xxxxx????");
        let (s, _) = missed_call_sender(&answer(json!({"cli_prefix": "+4420380"})));
        assert_eq!(s, "+4420380????");
        let (s, c) = missed_call_sender(&answer(json!({"id": "x"})));
        assert_eq!((s.as_str(), c), (UNKNOWN_CALLER_MASK, None));
    }

    #[test]
    fn callback_states() {
        assert_eq!(
            callback_state(&answer(json!({"validated": true}))),
            DeliveryState::Delivered
        );
        assert_eq!(
            callback_state(&answer(json!({"status": "delivered"}))),
            DeliveryState::Delivered
        );
        assert_eq!(
            callback_state(&answer(json!({"status": "failed"}))),
            DeliveryState::Failed
        );
        assert_eq!(
            callback_state(&answer(json!({"status": "queued"}))),
            DeliveryState::Pending
        );
        assert_eq!(callback_state(&answer(json!({}))), DeliveryState::Pending);
    }

    #[test]
    fn numbers_are_scrubbed_but_codes_stay() {
        assert_eq!(
            scrub_numbers("Invalid phone number +447700900000 (code 2, HTTP 400)"),
            "Invalid phone number <number> (code 2, HTTP 400)"
        );
        assert_eq!(scrub_numbers("447700900000"), "<number>");
        assert_eq!(scrub_numbers("a+b 123456"), "a+b 123456");
    }

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(code_kind(2), ErrorKind::InvalidNumber);
        assert_eq!(code_kind(8), ErrorKind::Blocked);
        assert_eq!(code_kind(4), ErrorKind::Unsupported);
        assert_eq!(code_kind(1), ErrorKind::Permanent);
        assert_eq!(code_kind(99), ErrorKind::Permanent);
    }
}
