//! The domain core: start a verification, resend, verify, status, cancel.
//!
//! Transports parse their input into [`PhoneNumber`], [`Code`], [`VerificationId`] and
//! [`UserKey`], call a [`Registrar`] method, and render its result or [`Error`]. The core sees no
//! XML, HTTP or SQL: it talks to a [`Store`] and to [`Provider`]s, and asks a [`Clock`] for the
//! time.
//!
//! Two rules shape the flows. Persist first, send second: a verification is committed before any
//! provider is called, so a crash loses nothing and a resend issues a fresh code. And every race
//! is settled by the store (a unique number, a conditional update), so that instances behind one
//! database agree.

pub mod abuse;
mod accounts;
pub mod crypto;
pub mod dispatch;
mod error;
mod guard;
pub mod ports;
mod send;
pub mod templates;
#[cfg(test)]
mod tests;
mod transfer;
mod types;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use registrar_providers::{Provider, ReceiptError, ReceiptRequest};

pub use abuse::AbuseSettings;
pub use accounts::{Event, RemovalProof, removal_message};
pub use dispatch::{DispatchSettings, Dispatcher, Route};
pub use error::{AuthFailure, Error, Limit, LoginRefusal, Refusal, STORE_RETRY_SECS};
pub use guard::{Origin, SpendLine};
pub use registrar_providers::Challenge;
pub use templates::Templates;
pub use transfer::{KeyToken, TransferredKey};
pub use types::{BadCode, BadVerificationId, CODE_LENGTHS, Code, VerificationId};

use crate::clock::Clock;
use crate::login_cert::Trust;
use crate::openpgp::ServerKey;
use crate::phone::{AccountId, PhoneNumber, PhonePolicy};
use crate::secret::ServerSecret;
use ports::{AccountRecord, Store, Time, TryLimits, VerificationRecord};

/// The rules the core applies, from the validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The XMPP domain of the accounts.
    pub domain: String,
    /// Which numbers are accepted.
    pub phone_policy: PhonePolicy,
    /// Digits in a generated code.
    pub code_length: usize,
    /// Digits in a long code: for a forced re-registration, which replaces an account's key, and
    /// for a number's starts beyond `short_codes_per_number`. Long enough that guessing it within
    /// the start limits is hopeless (see the README's takeover computation).
    pub long_code_length: usize,
    /// Verifications per number that get a short code (`code_length`); beyond, a number under
    /// attack gets long codes instead of being locked (`None`: always short).
    pub short_codes_per_number: Option<abuse::Rate>,
    /// How long a code is valid.
    pub lifetime: Duration,
    /// Wait after the first message of a verification before another; it doubles with each
    /// message (Signal's escalating waits) up to `resend_wait_max`.
    pub resend_wait: Duration,
    /// The longest wait between two messages.
    pub resend_wait_max: Duration,
    /// Wait after a message before a voice call or missed call may replace it.
    pub call_wait: Duration,
    /// Code submissions of a verification's holder (the HTTP client holding its id, or the
    /// client that started it submitting from the same address or JID) before it locks.
    pub max_attempts: u32,
    /// Code submissions of everyone else together (each also at most `max_attempts`): they are
    /// refused once these are spent, but cannot use up the holder's.
    pub max_attempts_others: u32,
    /// The holder's tries of a forced re-registration, and each other requester's.
    pub replacement_attempts: u32,
    /// The others' tries of a forced re-registration, together.
    pub replacement_attempts_others: u32,
    /// Whether registration is open.
    pub open: bool,
    /// Terms of service the client must accept, if any.
    pub terms_url: Option<String>,
    /// The service name used in messages.
    pub service_name: String,
    /// Challenge used when the client names none.
    pub default_challenge: Challenge,
    /// Message texts.
    pub templates: Templates,
    /// Rate limits, lists, pumping defence, caps, test numbers.
    pub abuse: AbuseSettings,
    /// How far a signed request's timestamp may be from now.
    pub signature_max_age: Duration,
    /// Where events about replaced keys and removed accounts go (`webhook`, `xmpp`).
    pub event_sinks: Vec<String>,
    /// How long an uploaded private key waits for the new device.
    pub key_transfer_lifetime: Duration,
    /// Key retrievals per client address (IPv6 per network).
    pub key_retrievals_per_ip: Option<abuse::Rate>,
    /// Key retrievals in total.
    pub key_retrievals_global: Option<abuse::Rate>,
    /// Requests on registered accounts (rollover, removal, key upload) per client.
    pub account_requests_per_client: Option<abuse::Rate>,
    /// Code submissions with a key (or a certificate) per client, counted before the key is
    /// parsed.
    pub key_checks_per_client: Option<abuse::Rate>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            domain: "localhost".into(),
            phone_policy: PhonePolicy::default(),
            code_length: 6,
            long_code_length: 10,
            short_codes_per_number: Some(abuse::Rate::new(2, Duration::from_secs(86_400))),
            lifetime: Duration::from_secs(600),
            resend_wait: Duration::from_secs(60),
            resend_wait_max: Duration::from_secs(600),
            call_wait: Duration::from_secs(60),
            max_attempts: 5,
            max_attempts_others: 10,
            replacement_attempts: 3,
            replacement_attempts_others: 6,
            open: true,
            terms_url: None,
            service_name: "Kontalk".into(),
            default_challenge: Challenge::Pin,
            templates: Templates::default(),
            abuse: AbuseSettings::default(),
            signature_max_age: Duration::from_secs(300),
            event_sinks: Vec::new(),
            key_transfer_lifetime: Duration::from_secs(900),
            key_retrievals_per_ip: Some(abuse::Rate::new(10, Duration::from_secs(3600))),
            key_retrievals_global: Some(abuse::Rate::new(10_000, Duration::from_secs(3600))),
            account_requests_per_client: Some(abuse::Rate::new(20, Duration::from_secs(3600))),
            key_checks_per_client: Some(abuse::Rate::new(60, Duration::from_secs(3600))),
        }
    }
}

/// A request to start verifying a number.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The number.
    pub phone: PhoneNumber,
    /// Replace an existing account.
    pub force: bool,
    /// The challenge wanted; the default when `None`.
    pub challenge: Option<Challenge>,
    /// Whether the client accepted the terms of service.
    pub accepted_terms: bool,
    /// Use the next provider that can deliver the challenge instead of the first.
    pub fallback: bool,
    /// The client's language, for the message text.
    pub locale: Option<String>,
    /// Who asks.
    pub origin: Origin,
}

/// Where a verification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the code.
    Pending,
    /// Too many wrong codes.
    Locked,
    /// Completed.
    Verified,
}

impl State {
    /// The name used by the transports.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Locked => "locked",
            State::Verified => "verified",
        }
    }
}

/// A verification as shown to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Its id.
    pub id: VerificationId,
    /// The account being registered.
    pub account: AccountId,
    /// The account's JID.
    pub jid: String,
    /// The challenge of the last delivery.
    pub challenge: Challenge,
    /// Sender id to show (never empty).
    pub sender: String,
    /// What the user should do.
    pub instructions: String,
    /// Digits the user types.
    pub code_length: u32,
    /// When the code expires.
    pub expires_at: DateTime<Utc>,
    /// When a resend with the same challenge is allowed.
    pub next_resend_at: DateTime<Utc>,
    /// When a voice call or missed call may replace the text message (`None`: no provider
    /// offers one, or the verification already uses one).
    pub next_call_at: Option<DateTime<Utc>>,
    /// Code submissions left.
    pub attempts_left: u32,
    /// Where it stands.
    pub state: State,
    /// Whether another provider can deliver this challenge (a start with `fallback`).
    pub can_fallback: bool,
    /// What the provider's last delivery receipt said, if one came.
    pub delivery: Option<String>,
    /// Whether this answers a repeated start (nothing was sent again).
    pub replayed: bool,
}

/// A completed registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The account.
    pub account: AccountId,
    /// The account's JID.
    pub jid: String,
    /// Fingerprint of the certified key (hex, upper case).
    pub fingerprint: String,
    /// The user's key with our certification (binary OpenPGP).
    pub public_key: Vec<u8>,
}

/// The registration service's core.
pub struct Registrar {
    settings: Settings,
    store: Arc<dyn Store>,
    dispatcher: Dispatcher,
    server_key: Arc<ServerKey>,
    secret: ServerSecret,
    clock: Arc<dyn Clock>,
    trust: Trust,
    events_waker: Arc<tokio::sync::Notify>,
    crypto: crypto::CryptoPool,
}

/// Whether a delivery must carry our own code (not a provider's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnCode {
    /// Any provider.
    Any,
    /// Providers that send our code when one can deliver, else any.
    Preferred,
    /// Only providers that send our code.
    Required,
}

/// The provider name recorded for test numbers.
pub const TEST_PROVIDER: &str = "test-number";

/// The time `secs` seconds after the Unix epoch (protocol timestamps, UTC days).
fn from_unix(secs: i64) -> Time {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t` without its fraction of a second: the times of records are whole seconds.
fn whole_seconds(t: Time) -> Time {
    from_unix(t.timestamp())
}

/// `d` after `t`.
fn after(t: Time, d: Duration) -> Time {
    chrono::TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Registrar {
    /// A core over `store` delivering through `dispatcher`.
    pub fn new(
        settings: Settings,
        store: Arc<dyn Store>,
        dispatcher: Dispatcher,
        server_key: Arc<ServerKey>,
        secret: ServerSecret,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let trust =
            Trust::new(settings.domain.clone()).with_key(server_key.public_cert().clone(), None);
        Self {
            settings,
            store,
            dispatcher,
            server_key,
            secret,
            clock,
            trust,
            events_waker: Arc::new(tokio::sync::Notify::new()),
            crypto: crypto::CryptoPool::for_this_machine(),
        }
    }

    /// The rules in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The server key.
    pub fn server_key(&self) -> &ServerKey {
        &self.server_key
    }

    /// The store (for health checks).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The challenges some configured provider can deliver, in protocol order.
    pub fn challenges(&self) -> Vec<Challenge> {
        self.dispatcher.challenges()
    }

    /// Parses a number typed by a user under the configured policy. libphonenumber's validity
    /// check can take milliseconds, so it runs off the async workers.
    pub async fn parse_phone(&self, input: &str) -> Result<PhoneNumber, Error> {
        let policy = self.settings.phone_policy.clone();
        let input = input.to_owned();
        let parsed = tokio::task::spawn_blocking(move || {
            policy.parse(&input).map_err(|e| {
                // A listed test number passes even where fictional numbers are refused.
                let lenient = PhonePolicy {
                    accept_fictional: true,
                    ..policy.clone()
                };
                (e, lenient.parse(&input).ok())
            })
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "phone parsing task failed");
            Error::Internal
        })?;
        match parsed {
            Ok(phone) => Ok(phone),
            Err((_, Some(phone))) if self.is_test_number(phone.as_str()) => Ok(phone),
            Err((e, _)) => Err(e.into()),
        }
    }

    /// The providers to try for `challenge` to `phone`: with `fallback`, skipping the first
    /// (or `skip`, the provider of the previous message) when another one can deliver. `own_code`
    /// says whether only providers that deliver our own (long) code may, or should, be used: a
    /// missed call's few digits or a verify API's code are too short to guard an account.
    fn candidates(
        &self,
        phone: &PhoneNumber,
        challenge: Challenge,
        fallback: bool,
        skip: Option<&str>,
        own_code: OwnCode,
    ) -> Result<(Vec<Arc<dyn Provider>>, bool), Error> {
        let mut all = self.dispatcher.candidates(phone, challenge);
        if all.is_empty() {
            return Err(Error::NoProvider(format!(
                "no configured provider can deliver {challenge}"
            )));
        }
        if own_code != OwnCode::Any {
            let ours: Vec<_> = all
                .iter()
                .filter(|p| p.sends_our_code(challenge))
                .cloned()
                .collect();
            if !ours.is_empty() || own_code == OwnCode::Required {
                all = ours;
            }
            if all.is_empty() {
                return Err(Error::NoProvider(format!(
                    "a forced re-registration needs a code of {} digits from this service, and no \
                     configured provider delivers one by {challenge}: ask for pin or voice",
                    self.settings.long_code_length
                )));
            }
        }
        if fallback && all.len() > 1 {
            match skip.and_then(|name| all.iter().position(|p| p.name() == name)) {
                Some(i) => {
                    all.remove(i);
                }
                None => {
                    all.remove(0);
                }
            }
            return Ok((all, false));
        }
        let can_fallback = all.len() > 1;
        Ok((all, can_fallback))
    }

    /// The try budgets of `v`: a forced re-registration's are smaller.
    fn limits(&self, v: &VerificationRecord) -> TryLimits {
        let s = &self.settings;
        if v.force {
            TryLimits {
                holder: s.replacement_attempts,
                others: s.replacement_attempts_others,
                per_peer: s.replacement_attempts,
            }
        } else {
            TryLimits {
                holder: s.max_attempts,
                others: s.max_attempts_others,
                per_peer: s.max_attempts.min(s.max_attempts_others),
            }
        }
    }

    /// Whether `v` takes no more codes from its holder.
    fn locked(&self, v: &VerificationRecord) -> bool {
        v.attempts >= self.limits(v).holder
    }

    /// Whether `v` takes no more codes from anyone but its holder.
    fn closed_to_others(&self, v: &VerificationRecord) -> bool {
        v.total_attempts.saturating_sub(v.attempts) >= self.limits(v).others
    }

    fn log_id(&self, phone: &str) -> String {
        self.secret.pseudonym("phone", phone)
    }

    async fn live(&self, id: &VerificationId) -> Result<VerificationRecord, Error> {
        let now = self.clock.now();
        match self.store.verification(id).await? {
            Some(v) if v.expires_at > now => Ok(v),
            _ => Err(Error::NotFound),
        }
    }

    fn view(&self, v: &VerificationRecord) -> Verification {
        let account = v.account.clone();
        let state = if v.verified_at.is_some() {
            State::Verified
        } else if self.locked(v) {
            State::Locked
        } else {
            State::Pending
        };
        let sender = v.sender.clone().unwrap_or_else(|| "-".into());
        let instructions = match v.challenge {
            Challenge::Pin => format!(
                "A text message with a {}-digit verification code will be sent to {}.",
                v.code_length,
                v.phone.as_str()
            ),
            Challenge::Voice => format!(
                "{} will receive a call that reads out a {}-digit verification code.",
                v.phone.as_str(),
                v.code_length
            ),
            Challenge::MissedCall => format!(
                "{} will receive a missed call from {sender}: type the last {} digits of the \
                 calling number.",
                v.phone.as_str(),
                v.code_length
            ),
        };
        Verification {
            id: v.id.clone(),
            jid: account.jid(&self.settings.domain),
            account,
            challenge: v.challenge,
            sender,
            instructions,
            code_length: v.code_length,
            expires_at: v.expires_at,
            next_resend_at: v.next_resend_at,
            next_call_at: if v.verified_at.is_none() {
                self.next_call_at(v)
            } else {
                None
            },
            attempts_left: self.limits(v).holder.saturating_sub(v.attempts),
            state,
            can_fallback: false,
            delivery: v.delivery_state.map(|d| d.as_str().to_owned()),
            replayed: false,
        }
    }

    /// Where verification `id` stands.
    pub async fn status(&self, id: &VerificationId) -> Result<Verification, Error> {
        let v = self.live(id).await?;
        Ok(self.view(&v))
    }

    /// Cancels verification `id`.
    pub async fn cancel(&self, id: &VerificationId) -> Result<(), Error> {
        self.live(id).await?;
        if self.store.delete_verification(id).await? {
            tracing::info!(verification = %id, "verification cancelled");
            Ok(())
        } else {
            Err(Error::NotFound)
        }
    }

    /// The account `id`, if registered.
    pub async fn account(&self, id: &AccountId) -> Result<Option<AccountRecord>, Error> {
        Ok(self.store.account(id).await?)
    }

    /// Authenticates a delivery receipt sent to provider `name`'s endpoint and records it on the
    /// verification it is about.
    pub async fn receipt(
        &self,
        name: &str,
        request: &ReceiptRequest<'_>,
    ) -> Result<(), ReceiptError> {
        let Some(provider) = self.dispatcher.provider(name) else {
            return Err(ReceiptError::Unsupported);
        };
        let receipt = provider.parse_receipt(request)?;
        let found = self
            .store
            .record_receipt(name, &receipt.provider_ref, receipt.state, self.clock.now())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot record a receipt");
                ReceiptError::Malformed("the receipt could not be stored".into())
            })?;
        tracing::info!(
            provider = name,
            state = receipt.state.as_str(),
            found,
            "delivery receipt"
        );
        Ok(())
    }

    /// Deletes verifications that expired; how many.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        Ok(self.store.purge_expired(self.clock.now()).await?)
    }
}
