//! The one error enum of the core. Each transport maps it once (see the table in DESIGN.md):
//! `http::problem` to problem+json, `xmpp` to stanza errors.

use chrono::{DateTime, Utc};

use crate::openpgp::KeyError;
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
    #[error("too many requests; try again after {}", .retry_at.to_rfc3339())]
    RateLimited {
        /// When trying again can succeed.
        retry_at: DateTime<Utc>,
    },
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
    /// A failure inside the service. The detail is logged where it happens, never shown.
    #[error("internal error")]
    Internal,
}

fn refusal_text(r: &Refusal) -> String {
    match r {
        Refusal::RegistrationClosed => "registration is closed".into(),
        Refusal::TermsNotAccepted { url } => {
            format!("the terms of service ({url}) must be accepted")
        }
        Refusal::DestinationBlocked => "this number cannot receive verifications".into(),
    }
}

impl Error {
    /// When a retry can succeed, for errors that have such a time.
    pub fn retry_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Error::RateLimited { retry_at } | Error::Locked { retry_at } => Some(*retry_at),
            _ => None,
        }
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        Error::Internal
    }
}
