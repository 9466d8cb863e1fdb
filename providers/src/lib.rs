//! Delivery of verification challenges (SMS PIN, voice PIN, missed call) to phones.
//!
//! The registrar core decides *what* to send; a [`Provider`] only delivers it. The trait has one
//! required async method, [`Provider::send`], and an error that says whether trying again (or
//! trying another provider) can help: [`ProviderError::is_transient`] /
//! [`ProviderError::is_permanent`]. The shape follows lettre's `Transport`: real gateways stand
//! beside a [`DevelopmentProvider`] that writes to a local outbox and a [`CapturingProvider`] for
//! tests.
//!
//! Providers that generate and check codes themselves (verify APIs such as Twilio Verify) report
//! that in their [`Delivery`] with [`DeliveredCode::ProviderChecks`] and implement
//! [`Provider::check`].
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod capture;
pub mod checkmobi;
mod development;
pub mod emulator;
pub mod generic;
pub mod http;
mod secret;
pub mod twilio;
pub mod vonage;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use capture::{CAPTURE_RECEIPT_TOKEN, CapturingProvider};
pub use development::DevelopmentProvider;
pub use secret::{Credential, Secret};

/// How the user receives the code. One enum behind every transport: the XMPP form values and the
/// JSON API values are these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Challenge {
    /// A PIN in a text message.
    Pin,
    /// A PIN read out in a phone call.
    Voice,
    /// A missed call whose caller number ends in the code.
    #[serde(rename = "missedcall")]
    MissedCall,
}

impl Challenge {
    /// Every challenge type, in the order they are offered.
    pub const ALL: [Challenge; 3] = [Challenge::Pin, Challenge::Voice, Challenge::MissedCall];

    /// The protocol name (`pin`, `voice`, `missedcall`).
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Pin => "pin",
            Challenge::Voice => "voice",
            Challenge::MissedCall => "missedcall",
        }
    }
}

impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Challenge {
    type Err = UnknownChallenge;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pin" => Ok(Challenge::Pin),
            "voice" => Ok(Challenge::Voice),
            "missedcall" => Ok(Challenge::MissedCall),
            _ => Err(UnknownChallenge),
        }
    }
}

/// A challenge name that is none of `pin`, `voice`, `missedcall` (Kontalk's `callerid` included:
/// a caller id can be spoofed, so it is never a proof).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown challenge type (expected pin, voice or missedcall)")]
pub struct UnknownChallenge;

/// One challenge to deliver.
#[derive(Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination in E.164 (`+15555215554`).
    pub to: String,
    /// What kind of challenge.
    pub challenge: Challenge,
    /// The code the registrar generated. Providers that choose or check the code themselves may
    /// ignore it.
    pub code: String,
    /// The text to send or speak, already rendered with the code.
    pub text: String,
    /// The verification this belongs to (for logs, receipts and provider-side references).
    pub reference: String,
    /// How long the code stays valid: a provider must not deliver after this.
    pub valid_for: Duration,
    /// The client's language (`en`, `it`, `pt-BR`), for providers that word the message
    /// themselves (verify APIs).
    pub locale: Option<String>,
}

// The code is a secret: keep it out of `Debug` output, which may end up in logs.
impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("challenge", &self.challenge)
            .field("reference", &self.reference)
            .field("valid_for", &self.valid_for)
            .finish_non_exhaustive()
    }
}

/// Which code the user will type, after a successful delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveredCode {
    /// The code in [`Outgoing::code`] was delivered.
    Ours,
    /// The provider chose the code (a missed-call provider whose caller number ends in it).
    Chosen(String),
    /// The provider generated the code and checks it ([`Provider::check`]).
    ProviderChecks,
}

/// What a provider reports after accepting a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The sender id shown to the client: an SMS sender, or for a missed call the caller number
    /// with each digit to type shown as `?`. Never empty.
    pub sender: String,
    /// Human-readable instructions for the client, when the provider knows better than the
    /// registrar's default text.
    pub instructions: Option<String>,
    /// The provider's own id for this delivery (message sid, request id), used by receipts and by
    /// [`Provider::check`].
    pub provider_ref: Option<String>,
    /// Which code the user will type.
    pub code: DeliveredCode,
}

/// Why a provider failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Timeouts, rate limits, outages: trying again later or elsewhere can succeed.
    Transient,
    /// The destination is not a valid number for this provider.
    InvalidNumber,
    /// The provider refuses this destination (blocked country, premium range, opt-out).
    Blocked,
    /// The provider cannot deliver this kind of challenge.
    Unsupported,
    /// Any other failure that retrying will not fix (bad credentials, bad configuration).
    Permanent,
}

/// A provider failure. Its text is safe to log: providers never put credentials, codes or full
/// numbers in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{provider}: {message}")]
pub struct ProviderError {
    /// The provider's configured name.
    pub provider: String,
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What went wrong, for operators.
    pub message: String,
}

impl ProviderError {
    /// A failure of `kind` reported by `provider`.
    pub fn new(provider: impl Into<String>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            kind,
            message: message.into(),
        }
    }

    /// Whether trying again later, or with another provider, can succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Whether the failure will repeat however often it is retried.
    pub fn is_permanent(&self) -> bool {
        !self.is_transient()
    }
}

/// A status callback as it reached the receipts endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptRequest<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// The full URL the provider called, as configured for it (signatures cover it).
    pub url: &'a str,
    /// Request headers, names in lower case.
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

impl ReceiptRequest<'_> {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a receipt says about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// The handset got it.
    Delivered,
    /// It will not arrive.
    Failed,
    /// Still on its way (queued, sent, ringing).
    Pending,
}

impl DeliveryState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Pending => "pending",
        }
    }
}

/// A parsed, authenticated delivery receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The provider's reference of the delivery ([`Delivery::provider_ref`]).
    pub provider_ref: String,
    /// What happened.
    pub state: DeliveryState,
}

/// A receipt that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The signature or token does not match: not from the provider.
    #[error("the receipt is not authenticated")]
    Unauthenticated,
    /// The request does not have the provider's documented shape.
    #[error("malformed receipt: {0}")]
    Malformed(String),
    /// This provider sends no receipts.
    #[error("this provider sends no delivery receipts")]
    Unsupported,
}

/// A gateway that delivers challenges.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The operator's name for this provider (from the configuration), used in logs and routing.
    fn name(&self) -> &str;

    /// Which challenges this provider can deliver.
    fn challenges(&self) -> &[Challenge] {
        &[Challenge::Pin]
    }

    /// Whether a delivery of `challenge` carries the registrar's own code ([`DeliveredCode::Ours`]),
    /// rather than one the provider chooses (a missed call's caller number) or checks itself (a
    /// verify API). The registrar sends only its own, longer code to replace an account's key.
    fn sends_our_code(&self, challenge: Challenge) -> bool {
        let _ = challenge;
        true
    }

    /// Delivers one challenge.
    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError>;

    /// Checks a code for a delivery whose [`Delivery::code`] was
    /// [`DeliveredCode::ProviderChecks`]. Providers that never answer that way keep this default.
    async fn check(&self, provider_ref: &str, code: &str) -> Result<bool, ProviderError> {
        let _ = (provider_ref, code);
        Err(ProviderError::new(
            self.name(),
            ErrorKind::Unsupported,
            "this provider does not check codes",
        ))
    }

    /// Authenticates and parses a status callback sent to this provider's receipts endpoint.
    fn parse_receipt(&self, request: &ReceiptRequest<'_>) -> Result<Receipt, ReceiptError> {
        let _ = request;
        Err(ReceiptError::Unsupported)
    }
}

/// The sender id for a missed call: the caller number with the last `digits` digits replaced by
/// `?`, as Kontalk clients expect (`+1555000????`).
pub fn missed_call_mask(caller: &str, digits: usize) -> String {
    let keep = caller.chars().count().saturating_sub(digits);
    caller
        .chars()
        .take(keep)
        .chain(std::iter::repeat_n('?', digits))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_names_round_trip() {
        for c in Challenge::ALL {
            assert_eq!(c.as_str().parse::<Challenge>(), Ok(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!("callerid".parse::<Challenge>(), Err(UnknownChallenge));
        assert_eq!("PIN".parse::<Challenge>(), Err(UnknownChallenge));
    }

    #[test]
    fn transient_and_permanent_are_opposites() {
        let t = ProviderError::new("p", ErrorKind::Transient, "timeout");
        assert!(t.is_transient() && !t.is_permanent());
        for kind in [
            ErrorKind::InvalidNumber,
            ErrorKind::Blocked,
            ErrorKind::Unsupported,
            ErrorKind::Permanent,
        ] {
            let e = ProviderError::new("p", kind, "no");
            assert!(e.is_permanent() && !e.is_transient(), "{kind:?}");
        }
    }

    #[test]
    fn missed_call_mask_hides_trailing_digits() {
        assert_eq!(missed_call_mask("+390612345678", 4), "+39061234????");
        assert_eq!(missed_call_mask("123", 5), "?????");
    }

    #[test]
    fn outgoing_debug_hides_code_and_number() {
        let m = Outgoing {
            to: "+15555215554".into(),
            challenge: Challenge::Pin,
            code: "839775".into(),
            text: "839775 is your code".into(),
            reference: "abc".into(),
            valid_for: Duration::from_secs(600),
            locale: None,
        };
        let s = format!("{m:?}");
        assert!(!s.contains("839775") && !s.contains("5215554"), "{s}");
    }
}
