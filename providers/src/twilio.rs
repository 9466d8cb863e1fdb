//! Twilio: Programmable Messaging (SMS), Calls (voice PIN with TwiML) and Verify v2.
//!
//! Two modes, chosen in the configuration:
//!
//! * `messaging`: the registrar's own code goes out as an SMS through the Messages resource
//!   (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`) or is read out in a call placed
//!   through the Calls resource with inline TwiML (`.../Calls.json`). Twilio reports delivery to
//!   the optional `status_callback` URL; [`TwilioProvider::parse_receipt`] authenticates those
//!   callbacks with the `X-Twilio-Signature` header.
//! * `verify`: Twilio Verify v2 generates, words and checks the code
//!   (`POST /v2/Services/{ServiceSid}/Verifications`, then `.../VerificationCheck`). The delivery
//!   answers [`DeliveredCode::ProviderChecks`] with the verification sid as reference, and
//!   [`Provider::check`] asks Twilio whether a typed code is right.
//!
//! Every call authenticates with HTTP Basic (account sid, auth token). Twilio's documented error
//! codes are mapped to [`ErrorKind`]s so that the registrar can tell a wrong number from an outage.
//! Error texts carry Twilio's code and message, with phone numbers masked, never the token.
//!
//! References: the OpenAPI descriptions `twilio_api_v2010.json` (operations `CreateMessage`,
//! `CreateCall`) and `twilio_verify_v2.json` (`CreateVerification`, `CreateVerificationCheck`),
//! and Twilio's "Webhooks security" guide for the signature.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha1::Sha1;

use crate::{
    Challenge, Credential, DeliveredCode, Delivery, DeliveryState, ErrorKind, Outgoing, Provider,
    ProviderError, Receipt, ReceiptError, ReceiptRequest, Secret,
};

/// Where the Messages and Calls resources live.
pub const DEFAULT_API_BASE: &str = "https://api.twilio.com";
/// Where Verify v2 lives.
pub const DEFAULT_VERIFY_BASE: &str = "https://verify.twilio.com";
/// The longest `ValidityPeriod` Twilio accepts for a message, in seconds.
pub const MAX_VALIDITY_PERIOD: u64 = 36_000;
/// How long a verification call may ring before Twilio gives up, in seconds. Short enough to
/// hang up before most voicemail answers (Twilio's own advice), long enough to reach a pocket.
pub const CALL_RING_TIMEOUT: u64 = 30;
/// The longest a verification call may last, in seconds: the code read twice fits well within.
pub const CALL_TIME_LIMIT: u64 = 60;
/// The largest TwiML document `CreateCall` accepts inline.
const MAX_TWIML: usize = 4000;

/// Error codes (in the JSON body of a failed call) that mean the destination is not a number
/// Twilio can reach as asked: invalid 'To' (21211), not a mobile number (21614), number does not
/// appear valid (21217); Verify's 60200 "invalid parameter" counts only when it names `To`.
const INVALID_NUMBER_CODES: [u64; 3] = [21211, 21614, 21217];
/// Error codes that mean Twilio or the recipient refuses this destination: region not enabled
/// for SMS (21408), geo permissions refuse the call (21215), unsubscribed recipient (21610),
/// unreachable via SMS (21612), Verify: landline cannot get SMS (60205), blocked by Fraud Guard
/// (60410), blocked by Verify geo permissions (60605).
const BLOCKED_CODES: [u64; 7] = [21408, 21215, 21610, 21612, 60205, 60410, 60605];
/// Error codes that go away with time: too many requests (20429), Verify's max send attempts
/// for one number (60203).
const TRANSIENT_CODES: [u64; 2] = [20429, 60203];
/// Bad account sid or auth token.
const AUTHENTICATION_CODE: u64 = 20003;
/// Verify: an invalid request parameter (which one is in the message).
const INVALID_PARAMETER_CODE: u64 = 60200;
/// Verify: five wrong codes were checked; the verification can no longer be approved.
const MAX_CHECK_ATTEMPTS_CODE: u64 = 60202;

/// Which Twilio products deliver the challenges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TwilioMode {
    /// SMS through the Messages resource and voice PINs through the Calls resource, carrying the
    /// registrar's own code.
    Messaging,
    /// Twilio Verify v2, which generates and checks the code itself.
    Verify,
}

fn default_name() -> String {
    "twilio".to_owned()
}

/// The configuration of a Twilio provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    /// The operator's name for this provider (default `twilio`).
    #[serde(default = "default_name")]
    pub name: String,
    /// The account sid (`AC...`), the Basic-auth user name.
    pub account_sid: String,
    /// The account's auth token: the Basic-auth password and the key of callback signatures.
    pub auth_token: Credential,
    /// Messages and Calls, or Verify.
    pub mode: TwilioMode,
    /// The sender: a Twilio number (E.164) or, for SMS only, an alphanumeric sender id. Required
    /// for voice, and for SMS unless `messaging_service_sid` is set.
    #[serde(default)]
    pub from: Option<String>,
    /// A Messaging Service (`MG...`) to send SMS through instead of `from`; `from` then only
    /// serves calls.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// The Verify service (`VA...`); required in `verify` mode.
    #[serde(default)]
    pub verify_service_sid: Option<String>,
    /// The challenges to offer (default `pin` and `voice`). Twilio cannot place missed calls
    /// whose caller number carries a code, so `missedcall` is refused.
    #[serde(default)]
    pub challenges: Option<Vec<Challenge>>,
    /// The API root, without trailing slash (default `https://api.twilio.com` in messaging mode,
    /// `https://verify.twilio.com` in verify mode). Tests point it at a mock server.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The public URL Twilio should POST delivery status to (messaging mode). It is sent as
    /// `StatusCallback` and is the URL signatures of receipts are checked against.
    #[serde(default)]
    pub status_callback: Option<String>,
    /// Timeout of one API call, in seconds (default 10).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// Twilio's JSON error body: `{"code": 21211, "message": "...", "more_info": "...", "status": 400}`.
#[derive(Debug, Default, Deserialize)]
struct TwilioError {
    #[serde(default)]
    code: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

/// The only field of a created Message, Call or Verification that the registrar needs.
#[derive(Debug, Deserialize)]
struct Created {
    sid: String,
}

/// The answer of a VerificationCheck.
#[derive(Debug, Deserialize)]
struct CheckResult {
    #[serde(default)]
    status: Option<String>,
}

/// Delivers challenges through Twilio. Build it with [`TwilioProvider::new`].
pub struct TwilioProvider {
    name: String,
    account_sid: String,
    auth_token: Secret,
    mode: TwilioMode,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    verify_service_sid: Option<String>,
    challenges: Vec<Challenge>,
    base_url: String,
    status_callback: Option<String>,
    client: reqwest::Client,
}

// Written by hand so that neither the token nor anything derived from it can reach a log.
impl fmt::Debug for TwilioProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwilioProvider")
            .field("name", &self.name)
            .field("account_sid", &self.account_sid)
            .field("auth_token", &self.auth_token)
            .field("mode", &self.mode)
            .field("from", &self.from)
            .field("messaging_service_sid", &self.messaging_service_sid)
            .field("verify_service_sid", &self.verify_service_sid)
            .field("challenges", &self.challenges)
            .field("base_url", &self.base_url)
            .field("status_callback", &self.status_callback)
            .finish_non_exhaustive()
    }
}

/// Sids end up in URL paths: accept only what Twilio sids are made of, so that a configuration
/// mistake cannot change which resource is called.
fn check_sid(what: &str, sid: &str) -> Result<(), String> {
    if sid.is_empty() || !sid.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("{what} must be a Twilio sid (letters and digits)"));
    }
    Ok(())
}

fn check_url(what: &str, url: &str) -> Result<(), String> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(format!("{what} must be an http(s) URL"))
    }
}

/// A non-empty optional setting; an empty string counts as unset.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl TwilioProvider {
    /// Validates `config`, resolves the auth token and builds the HTTP client.
    pub fn new(config: TwilioConfig) -> Result<Self, String> {
        let name = config.name;
        let prefix = |e: String| format!("provider {name}: {e}");
        check_sid("account_sid", &config.account_sid).map_err(prefix)?;
        let auth_token = config
            .auth_token
            .resolve(&format!("provider {name}: auth_token"))?;
        let from = non_empty(config.from);
        let messaging_service_sid = non_empty(config.messaging_service_sid);
        let verify_service_sid = non_empty(config.verify_service_sid);
        let status_callback = non_empty(config.status_callback);

        let mut challenges: Vec<Challenge> = Vec::new();
        for c in config
            .challenges
            .unwrap_or_else(|| vec![Challenge::Pin, Challenge::Voice])
        {
            if !challenges.contains(&c) {
                challenges.push(c);
            }
        }
        if challenges.is_empty() {
            return Err(prefix("challenges is empty".into()));
        }
        if challenges.contains(&Challenge::MissedCall) {
            return Err(prefix(
                "Twilio cannot deliver missedcall challenges (the caller id cannot carry a code)"
                    .into(),
            ));
        }

        match config.mode {
            TwilioMode::Messaging => {
                if let Some(sid) = &messaging_service_sid {
                    check_sid("messaging_service_sid", sid).map_err(prefix)?;
                }
                if challenges.contains(&Challenge::Pin)
                    && from.is_none()
                    && messaging_service_sid.is_none()
                {
                    return Err(prefix(
                        "messaging mode needs `from` or `messaging_service_sid` to send SMS".into(),
                    ));
                }
                if challenges.contains(&Challenge::Voice) && from.is_none() {
                    return Err(prefix(
                        "messaging mode needs `from` (a Twilio number) to place voice calls".into(),
                    ));
                }
            }
            TwilioMode::Verify => match &verify_service_sid {
                Some(sid) => check_sid("verify_service_sid", sid).map_err(prefix)?,
                None => return Err(prefix("verify mode needs `verify_service_sid`".into())),
            },
        }

        let base_url = match non_empty(config.base_url) {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => match config.mode {
                TwilioMode::Messaging => DEFAULT_API_BASE.to_owned(),
                TwilioMode::Verify => DEFAULT_VERIFY_BASE.to_owned(),
            },
        };
        check_url("base_url", &base_url).map_err(prefix)?;
        if let Some(url) = &status_callback {
            check_url("status_callback", url).map_err(prefix)?;
        }
        let timeout = match config.timeout_seconds {
            None => crate::http::DEFAULT_TIMEOUT,
            Some(0) => return Err(prefix("timeout_seconds must be at least 1".into())),
            Some(s) => Duration::from_secs(s),
        };
        let client = crate::http::client(timeout).map_err(prefix)?;

        Ok(Self {
            name,
            account_sid: config.account_sid,
            auth_token,
            mode: config.mode,
            from,
            messaging_service_sid,
            verify_service_sid,
            challenges,
            base_url,
            status_callback,
            client,
        })
    }

    fn error(&self, kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError::new(&self.name, kind, message)
    }

    /// POSTs a form with Basic auth; answers the status and the body text.
    async fn post(
        &self,
        url: &str,
        form: &[(&str, String)],
    ) -> Result<(StatusCode, String), ProviderError> {
        let response = self
            .client
            .post(url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .form(form)
            .send()
            .await
            .map_err(|e| crate::http::transport_error(&self.name, e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| crate::http::transport_error(&self.name, e))?;
        Ok((status, body))
    }

    /// POSTs a create request and answers the new resource's sid.
    async fn create(
        &self,
        url: &str,
        form: &[(&str, String)],
        to: &str,
    ) -> Result<String, ProviderError> {
        let (status, body) = self.post(url, form).await?;
        if !status.is_success() {
            return Err(self.api_error(status, &body, to));
        }
        // Twilio accepted the request: report an unreadable answer as permanent rather than
        // transient, so that the challenge is not delivered twice by a retry.
        serde_json::from_str::<Created>(&body)
            .map(|c| c.sid)
            .map_err(|e| {
                self.error(
                    ErrorKind::Permanent,
                    format!(
                        "unexpected answer (HTTP {}): {e}: {}",
                        status.as_u16(),
                        crate::http::excerpt(&mask_numbers(&body, to))
                    ),
                )
            })
    }

    /// Maps a failed call to an error kind, by Twilio's error code first and HTTP status next.
    fn api_error(&self, status: StatusCode, body: &str, to: &str) -> ProviderError {
        let parsed: TwilioError = serde_json::from_str(body).unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED || parsed.code == Some(AUTHENTICATION_CODE) {
            return self.error(
                ErrorKind::Permanent,
                format!("credentials refused (HTTP {})", status.as_u16()),
            );
        }
        let Some(code) = parsed.code else {
            return crate::http::status_error(&self.name, status, &mask_numbers(body, to));
        };
        let message = parsed
            .message
            .as_deref()
            .map(|m| crate::http::excerpt(&mask_numbers(m, to)))
            .unwrap_or_default();
        let kind = if INVALID_NUMBER_CODES.contains(&code)
            || (code == INVALID_PARAMETER_CODE && names_parameter(&message, "To"))
        {
            ErrorKind::InvalidNumber
        } else if BLOCKED_CODES.contains(&code) {
            ErrorKind::Blocked
        } else if TRANSIENT_CODES.contains(&code) {
            ErrorKind::Transient
        } else {
            crate::http::status_kind(status)
        };
        self.error(
            kind,
            format!("HTTP {}: code {code}: {message}", status.as_u16()),
        )
    }

    async fn send_sms(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        // Twilio drops a message still queued after ValidityPeriod; it must not outlive the code.
        let validity = message.valid_for.as_secs().min(MAX_VALIDITY_PERIOD);
        if validity == 0 {
            return Err(self.error(
                ErrorKind::Permanent,
                "the code is valid for less than a second: nothing to send",
            ));
        }
        let mut form = vec![("To", message.to.clone())];
        let sender = match (&self.messaging_service_sid, &self.from) {
            // The service picks the sender from its pool: we cannot tell the client which.
            (Some(service), _) => {
                form.push(("MessagingServiceSid", service.clone()));
                "Twilio".to_owned()
            }
            (None, Some(from)) => {
                form.push(("From", from.clone()));
                from.clone()
            }
            (None, None) => {
                return Err(self.error(ErrorKind::Unsupported, "no SMS sender configured"));
            }
        };
        form.push(("Body", message.text.clone()));
        form.push(("ValidityPeriod", validity.to_string()));
        if let Some(callback) = &self.status_callback {
            form.push(("StatusCallback", callback.clone()));
        }
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.base_url, self.account_sid
        );
        let sid = self.create(&url, &form, &message.to).await?;
        Ok(Delivery {
            sender,
            instructions: None,
            provider_ref: Some(sid),
            code: DeliveredCode::Ours,
        })
    }

    async fn send_call(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        let Some(from) = &self.from else {
            return Err(self.error(ErrorKind::Unsupported, "no caller number configured"));
        };
        let twiml = voice_twiml(&message.text, &message.code);
        if twiml.len() > MAX_TWIML {
            return Err(self.error(
                ErrorKind::Permanent,
                "the voice message is longer than Twilio accepts",
            ));
        }
        let mut form = vec![
            ("To", message.to.clone()),
            ("From", from.clone()),
            ("Twiml", twiml),
            ("Timeout", CALL_RING_TIMEOUT.to_string()),
            ("TimeLimit", CALL_TIME_LIMIT.to_string()),
        ];
        if let Some(callback) = &self.status_callback {
            form.push(("StatusCallback", callback.clone()));
        }
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Calls.json",
            self.base_url, self.account_sid
        );
        let sid = self.create(&url, &form, &message.to).await?;
        Ok(Delivery {
            sender: from.clone(),
            instructions: None,
            provider_ref: Some(sid),
            code: DeliveredCode::Ours,
        })
    }

    fn verify_url(&self, resource: &str) -> Result<String, ProviderError> {
        let service = self.verify_service_sid.as_deref().ok_or_else(|| {
            self.error(
                ErrorKind::Unsupported,
                "this provider is not in verify mode",
            )
        })?;
        Ok(format!(
            "{}/v2/Services/{service}/{resource}",
            self.base_url
        ))
    }

    async fn send_verification(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        let channel = match message.challenge {
            Challenge::Pin => "sms",
            Challenge::Voice => "call",
            Challenge::MissedCall => {
                return Err(self.error(ErrorKind::Unsupported, "challenge missedcall"));
            }
        };
        let url = self.verify_url("Verifications")?;
        let mut form = vec![("To", message.to.clone()), ("Channel", channel.to_owned())];
        let locale = non_empty(message.locale.clone());
        if let Some(locale) = &locale {
            form.push(("Locale", locale.clone()));
        }
        let (mut status, mut body) = self.post(&url, &form).await?;
        // Verify refuses languages it has no translation for (60200 naming `Locale`); the
        // message in Twilio's default language is better than none, so ask once without it.
        if locale.is_some() && !status.is_success() {
            let parsed: TwilioError = serde_json::from_str(&body).unwrap_or_default();
            if parsed.code == Some(INVALID_PARAMETER_CODE)
                && names_parameter(parsed.message.as_deref().unwrap_or(""), "Locale")
            {
                form.retain(|(k, _)| *k != "Locale");
                (status, body) = self.post(&url, &form).await?;
            }
        }
        if !status.is_success() {
            return Err(self.api_error(status, &body, &message.to));
        }
        let sid = serde_json::from_str::<Created>(&body)
            .map(|c| c.sid)
            .map_err(|e| {
                self.error(
                    ErrorKind::Permanent,
                    format!("unexpected answer (HTTP {}): {e}", status.as_u16()),
                )
            })?;
        Ok(Delivery {
            sender: self.from.clone().unwrap_or_else(|| "Twilio".to_owned()),
            instructions: None,
            // VerificationCheck accepts the verification sid instead of the number: it names
            // exactly this verification and keeps the number out of the stored reference.
            provider_ref: Some(sid),
            code: DeliveredCode::ProviderChecks,
        })
    }
}

#[async_trait]
impl Provider for TwilioProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn challenges(&self) -> &[Challenge] {
        &self.challenges
    }

    fn sends_our_code(&self, _: Challenge) -> bool {
        self.mode == TwilioMode::Messaging
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        if !self.challenges.contains(&message.challenge) {
            return Err(self.error(
                ErrorKind::Unsupported,
                format!("challenge {} is not enabled", message.challenge),
            ));
        }
        match (self.mode, message.challenge) {
            (TwilioMode::Verify, _) => self.send_verification(message).await,
            (TwilioMode::Messaging, Challenge::Pin) => self.send_sms(message).await,
            (TwilioMode::Messaging, Challenge::Voice) => self.send_call(message).await,
            (TwilioMode::Messaging, Challenge::MissedCall) => Err(self.error(
                ErrorKind::Unsupported,
                "Twilio cannot deliver missedcall challenges",
            )),
        }
    }

    /// Asks Verify whether `code` is right for the verification `provider_ref` (its sid).
    /// A verification Twilio no longer knows (approved, expired: 404) or that has used up its
    /// check attempts (60202) can never be approved, so those answer `false`, not an error.
    async fn check(&self, provider_ref: &str, code: &str) -> Result<bool, ProviderError> {
        if self.mode != TwilioMode::Verify {
            return Err(self.error(
                ErrorKind::Unsupported,
                "this provider does not check codes (messaging mode)",
            ));
        }
        // Verify codes are 4 to 10 characters; anything else is wrong without asking (and
        // without spending one of the verification's five check attempts).
        let plausible = (4..=10).contains(&code.chars().count())
            && code.chars().all(|c| c.is_ascii_alphanumeric());
        if !plausible {
            return Ok(false);
        }
        let url = self.verify_url("VerificationCheck")?;
        let form = [
            ("VerificationSid", provider_ref.to_owned()),
            ("Code", code.to_owned()),
        ];
        let (status, body) = self.post(&url, &form).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !status.is_success() {
            let parsed: TwilioError = serde_json::from_str(&body).unwrap_or_default();
            if parsed.code == Some(MAX_CHECK_ATTEMPTS_CODE) {
                return Ok(false);
            }
            return Err(self.api_error(status, &body, ""));
        }
        let result: CheckResult = serde_json::from_str(&body).map_err(|e| {
            self.error(
                ErrorKind::Transient,
                format!("unexpected answer (HTTP {}): {e}", status.as_u16()),
            )
        })?;
        Ok(result.status.as_deref() == Some("approved"))
    }

    fn parse_receipt(&self, request: &ReceiptRequest<'_>) -> Result<Receipt, ReceiptError> {
        let signature = request
            .header("x-twilio-signature")
            .ok_or(ReceiptError::Unauthenticated)?;
        // A POST signs the URL and the form parameters; a GET only the URL, whose query then
        // holds the parameters.
        let is_get = request.method.eq_ignore_ascii_case("GET");
        let signed: Vec<(String, String)> = if is_get {
            Vec::new()
        } else {
            serde_urlencoded::from_bytes(request.body).map_err(|_| ReceiptError::Unauthenticated)?
        };
        // Twilio signs the URL it was given: the configured status_callback. The URL as the
        // receipts endpoint saw it is tried as well, for callbacks configured in the console.
        let authentic = self
            .status_callback
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(request.url))
            .any(|url| signature_matches(self.auth_token.expose(), url, &signed, signature));
        if !authentic {
            return Err(ReceiptError::Unauthenticated);
        }

        let params = if is_get {
            let query = request.url.split_once('?').map_or("", |(_, q)| q);
            serde_urlencoded::from_str::<Vec<(String, String)>>(query)
                .map_err(|e| ReceiptError::Malformed(format!("query: {e}")))?
        } else {
            signed
        };
        let field = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let (sid, state) =
            if let (Some(sid), Some(status)) = (field("MessageSid"), field("MessageStatus")) {
                (sid, message_state(status))
            } else if let (Some(sid), Some(status)) = (field("CallSid"), field("CallStatus")) {
                (sid, call_state(status))
            } else {
                return Err(ReceiptError::Malformed(
                    "neither MessageSid and MessageStatus nor CallSid and CallStatus".into(),
                ));
            };
        if sid.is_empty() {
            return Err(ReceiptError::Malformed("empty sid".into()));
        }
        Ok(Receipt {
            provider_ref: sid.to_owned(),
            state,
        })
    }
}

/// What a Message status means for the registrar (`read` is WhatsApp's "delivered and seen";
/// a `canceled` scheduled message never goes out).
fn message_state(status: &str) -> DeliveryState {
    match status {
        "delivered" | "read" => DeliveryState::Delivered,
        "failed" | "undelivered" | "canceled" => DeliveryState::Failed,
        _ => DeliveryState::Pending,
    }
}

/// What a Call status means: `completed` is an answered call that ended.
fn call_state(status: &str) -> DeliveryState {
    match status {
        "completed" => DeliveryState::Delivered,
        "busy" | "failed" | "no-answer" | "canceled" => DeliveryState::Failed,
        _ => DeliveryState::Pending,
    }
}

/// Whether Twilio's error `message` names the request parameter `name` (as in
/// "Invalid parameter `To`: ..."), matched as a whole word so that `To` does not match "Too".
fn names_parameter(message: &str, name: &str) -> bool {
    message
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| word == name)
}

/// `text` with phone numbers replaced by `<number>`: `to` itself (Twilio quotes it in messages
/// such as "The 'To' number +1500... is not a valid phone number") and any other run of seven or
/// more digits, so that error texts stay safe to log.
fn mask_numbers(text: &str, to: &str) -> String {
    let mut text = text.to_owned();
    let digits = to.trim_start_matches('+');
    if digits.len() >= 4 {
        text = text.replace(to, "<number>").replace(digits, "<number>");
    }
    crate::http::scrub_numbers(&text)
}

/// The TwiML of a voice challenge: `text` said twice with a pause between, the code in it spoken
/// digit by digit ("4, 8, 1, 5") so that text-to-speech does not read it as one large number.
pub fn voice_twiml(text: &str, code: &str) -> String {
    let spaced = code
        .chars()
        .map(String::from)
        .collect::<Vec<_>>()
        .join(", ");
    let spoken = if text.trim().is_empty() {
        spaced
    } else if !code.is_empty() && text.contains(code) {
        text.replace(code, &spaced)
    } else {
        format!("{text} {spaced}")
    };
    let said = xml_escape(&spoken);
    format!("<Response><Say>{said}</Say><Pause length=\"1\"/><Say>{said}</Say></Response>")
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0 documents.
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The data Twilio signs: the URL followed by every parameter's name and value, sorted by name
/// (then value, for repeated names), with no separators.
fn signed_data(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    data
}

/// The HMAC over the signed data, or `None` if the key were refused (HMAC accepts keys of every
/// length, so that does not happen; it keeps the code free of panics).
fn signature_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Option<Hmac<Sha1>> {
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).ok()?;
    mac.update(signed_data(url, params).as_bytes());
    Some(mac)
}

/// The `X-Twilio-Signature` Twilio sends with a request to `url` carrying the form `params`:
/// base64 of HMAC-SHA1, keyed with the auth token, over `url` followed by the parameters sorted
/// by name, each as name then value.
pub fn request_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    signature_mac(auth_token, url, params)
        .map(|mac| BASE64.encode(mac.finalize().into_bytes()))
        .unwrap_or_default()
}

/// Whether `signature` (the header's base64) is Twilio's signature of `url` and `params`,
/// compared in constant time.
fn signature_matches(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    let Ok(claimed) = BASE64.decode(signature.trim()) else {
        return false;
    };
    signature_mac(auth_token, url, params).is_some_and(|mac| mac.verify_slice(&claimed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_numbers_but_not_error_codes() {
        assert_eq!(
            mask_numbers(
                "The 'To' number +15005550001 is not a valid phone number.",
                "+15005550001"
            ),
            "The 'To' number <number> is not a valid phone number."
        );
        assert_eq!(
            mask_numbers("call 390612345678 or +44 7700", ""),
            "call <number> or +44 7700"
        );
        assert_eq!(mask_numbers("error 21211", "+1"), "error 21211");
    }

    #[test]
    fn parameter_names_match_whole_words() {
        assert!(names_parameter("Invalid parameter `To`: +1500", "To"));
        assert!(names_parameter("Invalid parameter: To", "To"));
        assert!(!names_parameter("Too many requests", "To"));
        assert!(names_parameter("Invalid parameter: Locale", "Locale"));
    }

    #[test]
    fn twiml_escapes_and_spells_the_code() {
        assert_eq!(
            voice_twiml("Code <1234> & more", "1234"),
            "<Response><Say>Code &lt;1, 2, 3, 4&gt; &amp; more</Say><Pause length=\"1\"/>\
             <Say>Code &lt;1, 2, 3, 4&gt; &amp; more</Say></Response>"
        );
        assert_eq!(
            voice_twiml("", "42"),
            "<Response><Say>4, 2</Say><Pause length=\"1\"/><Say>4, 2</Say></Response>"
        );
    }

    #[test]
    fn statuses_map_to_states() {
        assert_eq!(message_state("delivered"), DeliveryState::Delivered);
        assert_eq!(message_state("undelivered"), DeliveryState::Failed);
        assert_eq!(message_state("sent"), DeliveryState::Pending);
        assert_eq!(call_state("no-answer"), DeliveryState::Failed);
        assert_eq!(call_state("ringing"), DeliveryState::Pending);
    }
}
