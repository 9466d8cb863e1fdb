//! The one error enum of the core. Each transport maps it once (see the table in DESIGN.md):
//! `http::problem` to problem+json, `xmpp` to stanza errors.

use chrono::{DateTime, Utc};

use crate::login_cert::LoginCertError;
use crate::openpgp::{KeyError, RolloverError};
use crate::phone::PhoneError;

/// Why registration refuses a request outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The operator closed registration.
    RegistrationClosed,
    /// Terms of service are configured and the client did not accept them.
    TermsNotAccepted {
        /// Where the terms are.
        url: String,
    },
    /// The provider refuses this destination.
    DestinationBlocked,
    /// The number's calling code is not served (allow or deny list).
    CountryNotServed,
    /// The number's prefix is not served (allow or deny list).
    PrefixNotServed,
    /// The client's address is on the deny list.
    AddressBlocked,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The wait between two messages of one verification.
    ResendWait,
    /// Another request for this number is being served.
    InFlight,
    /// A rate of one scope (see [`Scope`](super::abuse::Scope)).
    Rate(super::abuse::Scope),
    /// The number's prefix is blocked for SMS pumping.
    PrefixBlocked,
    /// The day's cap of messages to the number's country is reached.
    CountryDailyCap,
    /// The day's cap of all messages is reached.
    DailyCap,
}

impl Limit {
    /// The stable name transports show (`resend-wait`, `ip`, `number`, `prefix`, `country`,
    /// `global`, `prefix-blocked`, `country-daily-cap`, `daily-cap`, `in-flight`).
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ResendWait => "resend-wait",
            Limit::InFlight => "in-flight",
            Limit::Rate(scope) => scope.as_str(),
            Limit::PrefixBlocked => "prefix-blocked",
            Limit::CountryDailyCap => "country-daily-cap",
            Limit::DailyCap => "daily-cap",
        }
    }

    fn text(self) -> &'static str {
        use super::abuse::Scope;
        match self {
            Limit::ResendWait => "a new message for this verification is not allowed yet",
            Limit::InFlight => "another request for this number is being served",
            Limit::Rate(Scope::Ip) => "too many requests from this address",
            Limit::Rate(Scope::Number) => "too many requests for this number",
            Limit::Rate(Scope::Prefix) => "too many requests for numbers of this range",
            Limit::Rate(Scope::Country) => "too many requests for numbers of this country",
            Limit::Rate(Scope::Global) => "the service is receiving too many requests",
            Limit::PrefixBlocked => "numbers of this range are suspended after suspicious traffic",
            Limit::CountryDailyCap => "the daily limit of messages to this country is reached",
            Limit::DailyCap => "the daily limit of messages is reached",
        }
    }
}

/// Everything the core can answer instead of a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed or misses a field.
    #[error("{0}")]
    BadRequest(String),
    /// The number is not a real, allowed number.
    #[error("{0}")]
    InvalidPhone(#[from] PhoneError),
    /// The number has an account and `force` was not set. Kontalk's clients expect this text.
    #[error("Another user is registered with the same id.")]
    Conflict,
    /// Registration refuses this request.
    #[error("{}", refusal_text(.0))]
    NotAllowed(Refusal),
    /// Too many requests: try again at `retry_at`.
    #[error("{}; try again after {}", .limit.text(), .retry_at.to_rfc3339())]
    RateLimited {
        /// When trying again can succeed.
        retry_at: DateTime<Utc>,
        /// Which limit refused.
        limit: Limit,
    },
    /// The limits could not be read and the service fails closed.
    #[error("the service cannot check its limits right now; try again after {}", .retry_at.to_rfc3339())]
    LimitsUnavailable {
        /// When trying again can succeed.
        retry_at: DateTime<Utc>,
    },
    /// The `Idempotency-Key` was used before for another request.
    #[error("this Idempotency-Key was used for another request")]
    IdempotencyKeyReused,
    /// The code does not match.
    #[error("wrong code; {attempts_left} attempts left")]
    WrongCode {
        /// Tries left before the verification locks.
        attempts_left: u32,
    },
    /// Too many wrong codes: the verification is locked until it expires.
    #[error("too many wrong codes; start again after {}", .retry_at.to_rfc3339())]
    Locked {
        /// When a new verification can start.
        retry_at: DateTime<Utc>,
    },
    /// No such verification, or it expired or was cancelled.
    #[error("no such verification, or it expired or was cancelled")]
    NotFound,
    /// The public key is unacceptable.
    #[error("{0}")]
    BadKey(#[from] KeyError),
    /// No configured provider can deliver this challenge.
    #[error("{0}")]
    NoProvider(String),
    /// The provider failed; the verification can be resent.
    #[error("the verification could not be delivered; try again")]
    DeliveryFailed,
    /// The verification was completed with another code or key.
    #[error("this verification is already completed")]
    AlreadyVerified,
    /// No account is registered under this id.
    #[error("no account is registered under this id")]
    NoAccount,
    /// A login certificate is refused.
    #[error("login refused: {0}")]
    LoginRefused(LoginRefusal),
    /// A key rollover is refused.
    #[error("key rollover refused: {0}")]
    RolloverRefused(#[from] RolloverError),
    /// The request is not authorised by the account.
    #[error("{}", .0.text())]
    Forbidden(AuthFailure),
    /// No private key is waiting for this token: never uploaded, already retrieved, expired,
    /// or superseded by a newer key of the account.
    #[error("no private key is waiting for this token: it was used, has expired, or never existed")]
    NoKeyTransfer,
    /// The account's key changed while the request was served.
    #[error("the account's key changed meanwhile; fetch it and try again")]
    KeyChanged,
    /// The service has more cryptographic work queued than it takes: try again at `retry_at`.
    #[error("the service is busy; try again after {}", .retry_at.to_rfc3339())]
    Busy {
        /// When trying again may succeed.
        retry_at: DateTime<Utc>,
    },
    /// The database cannot be reached right now: nothing was done; try again at `retry_at`.
    #[error("the service cannot reach its database right now; try again after {}", .retry_at.to_rfc3339())]
    StoreUnavailable {
        /// When trying again may succeed.
        retry_at: DateTime<Utc>,
    },
    /// A failure inside the service. The detail is logged where it happens, never shown.
    #[error("internal error")]
    Internal,
}

/// Why a login certificate is refused: a check of the certificate itself, or of our store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginRefusal {
    /// The certificate failed a check.
    #[error("{0}")]
    Certificate(#[from] LoginCertError),
    /// The certificate names an account we do not have (removed, or never registered here).
    #[error("the account is not registered")]
    UnknownAccount,
    /// The key is not the account's current key (replaced by a re-registration or rollover).
    #[error("the key is not the account's current key; it was replaced")]
    KeyReplaced,
}

impl LoginRefusal {
    /// Which check failed, as a stable kebab-case name.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Certificate(e) => e.code(),
            Self::UnknownAccount => "unknown-account",
            Self::KeyReplaced => "key-replaced",
        }
    }
}

/// Why a request that the account must authorise is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Over XMPP: the request does not come from the account's own JID.
    NotAccountJid,
    /// Over XMPP: the session logged in with a key that is no longer the account's.
    LoginKeyReplaced,
    /// The signature is not a valid signature of the request by the account's current key.
    BadSignature,
    /// The signed timestamp is too far from now.
    Stale,
    /// The nonce was used before: a replayed request.
    Replayed,
}

impl AuthFailure {
    /// The stable name transports show.
    pub fn code(self) -> &'static str {
        match self {
            Self::NotAccountJid => "not-account-jid",
            Self::LoginKeyReplaced => "login-key-replaced",
            Self::BadSignature => "bad-signature",
            Self::Stale => "stale-timestamp",
            Self::Replayed => "replayed",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Self::NotAccountJid => "only the account itself may do this",
            Self::LoginKeyReplaced => {
                "this session logged in with a key that is no longer the account's; log in again"
            }
            Self::BadSignature => "the signature does not verify with the account's current key",
            Self::Stale => "the signed timestamp is too far from the server's time",
            Self::Replayed => "this signed request was already used",
        }
    }
}

fn refusal_text(r: &Refusal) -> String {
    match r {
        Refusal::RegistrationClosed => "registration is closed".into(),
        Refusal::TermsNotAccepted { url } => {
            format!("the terms of service ({url}) must be accepted")
        }
        Refusal::DestinationBlocked => "this number cannot receive verifications".into(),
        Refusal::CountryNotServed => "numbers of this country are not served".into(),
        Refusal::PrefixNotServed => "numbers of this range are not served".into(),
        Refusal::AddressBlocked => "requests from this address are refused".into(),
    }
}

impl Error {
    /// When a retry can succeed, for errors that have such a time.
    pub fn retry_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Error::RateLimited { retry_at, .. }
            | Error::Locked { retry_at }
            | Error::LimitsUnavailable { retry_at }
            | Error::Busy { retry_at }
            | Error::StoreUnavailable { retry_at } => Some(*retry_at),
            _ => None,
        }
    }
}

/// How long a client is told to wait when the database cannot be reached.
pub const STORE_RETRY_SECS: i64 = 5;

impl From<crate::registrar::ports::StoreError> for Error {
    fn from(e: crate::registrar::ports::StoreError) -> Self {
        match e {
            crate::registrar::ports::StoreError::Unavailable(_) => {
                tracing::error!(error = %e, "database unreachable");
                Error::StoreUnavailable {
                    retry_at: Utc::now() + chrono::Duration::seconds(STORE_RETRY_SECS),
                }
            }
            e => {
                tracing::error!(error = %e, "store failure");
                Error::Internal
            }
        }
    }
}
