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
pub mod templates;
mod transfer;
mod types;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use registrar_providers::{
    DeliveredCode, DeliveryState, ErrorKind, Outgoing, Provider, ProviderError, ReceiptError,
    ReceiptRequest,
};

pub use abuse::AbuseSettings;
pub use accounts::{Event, RemovalProof, removal_message};
pub use dispatch::{DispatchSettings, Dispatcher, Route};
pub use error::{AuthFailure, Error, Limit, LoginRefusal, Refusal, STORE_RETRY_SECS};
use guard::Verdict;
pub use guard::{Origin, SpendLine};
pub use registrar_providers::Challenge;
pub use templates::Templates;
pub use transfer::{KeyToken, TransferredKey};
pub use types::{BadCode, BadVerificationId, CODE_LENGTHS, Code, VerificationId};

use crate::clock::Clock;
use crate::login_cert::Trust;
use crate::openpgp::{self, ServerKey, UserKey};
use crate::phone::{AccountId, PhoneNumber, PhonePolicy};
use crate::secret::ServerSecret;
use crate::store::{
    AccountRecord, CompleteOutcome, Completion, DeliveryRecord, Notice, Renewal, Requester, Store,
    StoreError, TryLimits, VerificationRecord,
};

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

/// The number of a stored verification (written there from an accepted number).
fn stored_phone(v: &VerificationRecord) -> Result<PhoneNumber, Error> {
    PhoneNumber::from_stored(&v.phone).ok_or_else(|| {
        tracing::error!(verification = %v.id, "stored number does not parse");
        Error::Internal
    })
}

fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
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

    /// Starts verifying a number: applies the lists and limits, refuses an existing account
    /// without `force`, stores the verification, then has a provider deliver the code. A repeat
    /// of a start (the same `Idempotency-Key`, or the same number from the same client within
    /// the repeat window) returns the verification instead of sending again.
    pub async fn start(&self, req: StartRequest) -> Result<Verification, Error> {
        if !self.settings.open {
            return Err(Error::NotAllowed(Refusal::RegistrationClosed));
        }
        if let Some(url) = &self.settings.terms_url
            && !req.accepted_terms
        {
            return Err(Error::NotAllowed(Refusal::TermsNotAccepted {
                url: url.clone(),
            }));
        }
        self.check_lists(&req.phone, &req.origin)?;
        let now = self.clock.now();
        let client = self.client_id(&req.origin);
        let idempotency_key = self.idempotency_id(&req.origin);
        if let Some(v) = self
            .repeated_start(&req, client.as_deref(), idempotency_key.as_deref(), now)
            .await?
        {
            tracing::info!(verification = %v.id, "repeated start answered with the verification");
            return Ok(Verification {
                replayed: true,
                ..self.view(&v)
            });
        }
        // Before the account check: a `conflict` tells that a number is registered, so asking
        // costs as much as a message.
        self.throttle(abuse::Action::Start, &req.phone, &req.origin)
            .await?;
        let account = req.phone.account();
        let registered = self.store.account(account.as_str()).await?.is_some();
        if !req.force && registered {
            return Err(Error::Conflict);
        }
        let test = self.is_test_number(req.phone.as_str());
        let asked = req.challenge.unwrap_or(self.settings.default_challenge);
        // A forced re-registration of an account always gets a long code; so does a number asked
        // for more often than short codes are given out (someone may be guessing), when a
        // provider that sends our own code can deliver it. A forced start for a number without
        // an account replaces nothing and is a plain one.
        let own_code = if req.force && registered {
            OwnCode::Required
        } else if !test && !self.short_code_allowed(&req.phone).await {
            OwnCode::Preferred
        } else {
            OwnCode::Any
        };
        let replaces = match self.store.verification_by_phone(req.phone.as_str()).await? {
            Some(old) if old.expires_at > ts(now) && old.verified_at.is_none() => {
                self.refuse_if_waiting(&old, asked, now)?;
                Some(old.id)
            }
            Some(old) => Some(old.id),
            None => None,
        };
        let verdict = if test {
            Verdict::default()
        } else {
            let can_call = self.can_call(&req.phone, own_code);
            self.check_pumping(&req.phone, can_call).await?
        };
        let challenge = self.pumping_challenge(asked, verdict, &req.phone, own_code);
        let (candidates, can_fallback) = if test {
            (Vec::new(), false)
        } else {
            self.candidates(&req.phone, challenge, req.fallback, None, own_code)?
        };
        let long = own_code != OwnCode::Any;
        let reserved = if test {
            Vec::new()
        } else {
            self.reserve_message(&req.phone).await?
        };
        let id = VerificationId::generate();
        let code = self.new_code(req.phone.as_str(), long);
        let record = VerificationRecord {
            id: id.as_str().to_owned(),
            phone: req.phone.as_str().to_owned(),
            account: account.as_str().to_owned(),
            challenge,
            // What `force` means: the verification replaces an account's key.
            force: req.force && registered,
            code_hash: Some(self.secret.code_hash(id.as_str(), code.as_str())),
            code_length: code.as_str().len() as u32,
            provider: None,
            provider_ref: None,
            sender: None,
            attempts: 0,
            total_attempts: 0,
            sends: 1,
            created_at: ts(now),
            expires_at: ts(now) + secs(self.settings.lifetime),
            next_resend_at: ts(now) + secs(self.resend_wait(1, verdict)),
            verified_at: None,
            result_fingerprint: None,
            result_key: None,
            locale: req.locale.clone(),
            delivery_state: None,
            client,
            idempotency_key,
            last_sent_at: Some(ts(now)),
            completing_at: None,
        };
        match self
            .store
            .create_verification(&record, replaces.as_deref())
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                self.release_message(&reserved).await;
                // Another start for this number (or with this idempotency key) won the race:
                // its message is on the way.
                let retry_at = match self.store.verification_by_phone(req.phone.as_str()).await? {
                    Some(other) => at(other.next_resend_at),
                    None => now + chrono::Duration::seconds(1),
                };
                return Err(Error::RateLimited {
                    retry_at,
                    limit: Limit::InFlight,
                });
            }
            Err(e) => {
                self.release_message(&reserved).await;
                return Err(e.into());
            }
        }
        tracing::info!(
            verification = %id,
            phone = %self.log_id(&record.phone),
            country = req.phone.calling_code(),
            %challenge,
            force = req.force,
            test,
            "verification started"
        );
        match self.deliver(&record, &code, &candidates).await {
            Ok(record) => {
                if record.force {
                    self.tell_owner(&record, now).await;
                }
                Ok(Verification {
                    can_fallback,
                    ..self.view(&record)
                })
            }
            Err(e) => {
                self.release_message(&reserved).await;
                // Nothing reached the user: drop the verification so that the client can start
                // again at once.
                self.store.delete_verification(id.as_str()).await?;
                Err(e)
            }
        }
    }

    /// Tells the owner of the account a forced re-registration (`record`, just delivered) would
    /// replace, if there is one: an event for the sinks, which the XMPP side turns into a message
    /// to the account. The code is on its way already, so a failure here is logged, not answered.
    async fn tell_owner(&self, record: &VerificationRecord, now: DateTime<Utc>) {
        let notice = self.notice();
        if notice.sinks.is_empty() {
            return;
        }
        match self
            .store
            .reregistration_started(&record.account, ts(now), &notice)
            .await
        {
            Ok(true) => {
                tracing::info!(verification = %record.id, "the account's owner is told");
                self.events_waker.notify_waiters();
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                verification = %record.id,
                error = %e,
                "cannot record the re-registration event"
            ),
        }
    }

    /// The live verification a repeated start refers to: the one started with the same
    /// idempotency key (for the same number, else the key is misused), or the pending one of
    /// this number started by the same client within the repeat window.
    async fn repeated_start(
        &self,
        req: &StartRequest,
        client: Option<&str>,
        idempotency_key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<VerificationRecord>, Error> {
        if let Some(key) = idempotency_key
            && let Some(v) = self.store.verification_by_idempotency_key(key).await?
        {
            if v.expires_at <= ts(now) {
                // Expired and not purged yet: the key is free again.
                self.store.delete_verification(&v.id).await?;
            } else if v.phone != req.phone.as_str() || (v.force && !req.force) {
                return Err(Error::IdempotencyKeyReused);
            } else {
                return Ok(Some(v));
            }
        }
        let Some(client) = client else {
            return Ok(None);
        };
        let window = secs(self.settings.abuse.repeat_window);
        Ok(self
            .store
            .verification_by_phone(req.phone.as_str())
            .await?
            .filter(|v| {
                v.expires_at > ts(now)
                    && v.verified_at.is_none()
                    && !self.locked(v)
                    && v.client.as_deref() == Some(client)
                    // A forced start for a number without an account made a plain one.
                    && (req.force || !v.force)
                    && req.challenge.is_none_or(|c| c == v.challenge)
                    && v.last_sent_at.unwrap_or(v.created_at) + window > ts(now)
            }))
    }

    /// A fresh code (a long one if `long`), or a test number's fixed code.
    fn new_code(&self, phone: &str, long: bool) -> Code {
        let length = if long {
            self.settings.long_code_length
        } else {
            self.settings.code_length
        };
        self.settings
            .abuse
            .test_numbers
            .get(phone)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| Code::generate(length))
    }

    /// The wait after the `sends`-th message: the first wait, doubled with each message, capped;
    /// `abuse.pumping.slow_factor` times longer where the pumping defence asks for it.
    fn resend_wait(&self, sends: u32, verdict: Verdict) -> Duration {
        let factor = 1u32
            .checked_shl(sends.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        let wait = self
            .settings
            .resend_wait
            .saturating_mul(factor)
            .min(self.settings.resend_wait_max.max(self.settings.resend_wait));
        if verdict.slow {
            wait.saturating_mul(self.settings.abuse.pumping.slow_factor)
        } else {
            wait
        }
    }

    /// Whether a provider can place a missed call to `phone` that carries a code good enough for
    /// `own_code`.
    fn can_call(&self, phone: &PhoneNumber, own_code: OwnCode) -> bool {
        self.dispatcher
            .candidates(phone, Challenge::MissedCall)
            .iter()
            .any(|p| own_code != OwnCode::Required || p.sends_our_code(Challenge::MissedCall))
    }

    /// The challenge to use instead of `asked` when the pumping defence says so: a missed call
    /// (which earns a pumper nothing) instead of a text or voice call, where one can be placed.
    fn pumping_challenge(
        &self,
        asked: Challenge,
        verdict: Verdict,
        phone: &PhoneNumber,
        own_code: OwnCode,
    ) -> Challenge {
        if verdict.call && asked != Challenge::MissedCall && self.can_call(phone, own_code) {
            tracing::info!(
                country = phone.calling_code(),
                %asked,
                event = "challenge_switched",
                "a missed call instead of the challenge asked for (pumping defence)"
            );
            Challenge::MissedCall
        } else {
            asked
        }
    }

    /// Refuses a new message while a live verification is locked or inside its wait: the
    /// resend wait, or the shorter call wait when a text message is to be replaced by a call.
    fn refuse_if_waiting(
        &self,
        v: &VerificationRecord,
        challenge: Challenge,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        if self.locked(v) {
            return Err(Error::Locked {
                retry_at: at(v.expires_at),
            });
        }
        let allowed_at = match self.next_call_at(v) {
            Some(call_at) if challenge != Challenge::Pin && v.challenge == Challenge::Pin => {
                call_at.min(at(v.next_resend_at))
            }
            _ => at(v.next_resend_at),
        };
        if allowed_at > now {
            return Err(Error::RateLimited {
                retry_at: allowed_at,
                limit: Limit::ResendWait,
            });
        }
        Ok(())
    }

    /// When a call may replace the text message of `v`, if some provider offers a call.
    fn next_call_at(&self, v: &VerificationRecord) -> Option<DateTime<Utc>> {
        if v.challenge != Challenge::Pin || self.is_test_number(&v.phone) {
            return None;
        }
        let offered = self
            .dispatcher
            .challenges()
            .iter()
            .any(|c| *c != Challenge::Pin);
        offered.then(|| at(v.last_sent_at.unwrap_or(v.created_at) + secs(self.settings.call_wait)))
    }

    /// Sends `code` for `record` through the first of `candidates` that takes it, and records
    /// what the provider reported.
    async fn deliver(
        &self,
        record: &VerificationRecord,
        code: &Code,
        candidates: &[Arc<dyn Provider>],
    ) -> Result<VerificationRecord, Error> {
        let now = self.clock.now();
        if self.is_test_number(&record.phone) {
            // A test number's fixed code never reaches a provider.
            let d = DeliveryRecord {
                provider: TEST_PROVIDER.to_owned(),
                provider_ref: None,
                sender: TEST_PROVIDER.to_owned(),
                code_hash: None,
                code_length: record.code_length,
            };
            self.store.record_delivery(&record.id, &d).await?;
            tracing::info!(verification = %record.id, "test number: nothing sent");
            return Ok(VerificationRecord {
                provider: Some(d.provider),
                sender: Some(d.sender),
                ..record.clone()
            });
        }
        let valid_for =
            Duration::from_secs(u64::try_from(record.expires_at - ts(now)).unwrap_or(0));
        let message = Outgoing {
            to: record.phone.clone(),
            challenge: record.challenge,
            code: code.as_str().to_owned(),
            text: self.settings.templates.render(
                record.challenge,
                record.locale.as_deref(),
                code.as_str(),
                &self.settings.service_name,
            ),
            reference: record.id.clone(),
            valid_for,
            locale: record.locale.clone(),
        };
        let (provider, delivery) = self
            .dispatcher
            .deliver(candidates, &message)
            .await
            .map_err(|e| self.delivery_error(record, e))?;
        if record.force && delivery.code != DeliveredCode::Ours {
            // `candidates` keeps only providers that say they send our code for a replacement.
            tracing::error!(
                verification = %record.id,
                provider = provider.name(),
                "a provider sent its own code for a forced re-registration"
            );
            return Err(Error::Internal);
        }
        let (code_hash, code_length) = match &delivery.code {
            DeliveredCode::Ours => (None, record.code_length),
            DeliveredCode::Chosen(chosen) => (
                Some(Some(self.secret.code_hash(&record.id, chosen))),
                chosen.len() as u32,
            ),
            // A missed call whose masked caller number (`+44-7xxx????`) hides the code: the user
            // types the hidden digits.
            DeliveredCode::ProviderChecks if delivery.sender.contains('?') => {
                (Some(None), delivery.sender.matches('?').count() as u32)
            }
            DeliveredCode::ProviderChecks => (Some(None), record.code_length),
        };
        let sender = if delivery.sender.is_empty() {
            provider.name().to_owned()
        } else {
            delivery.sender.clone()
        };
        let d = DeliveryRecord {
            provider: provider.name().to_owned(),
            provider_ref: delivery.provider_ref.clone(),
            sender: sender.clone(),
            code_hash: code_hash.clone(),
            code_length,
        };
        self.store.record_delivery(&record.id, &d).await?;
        let mut updated = record.clone();
        updated.provider = Some(d.provider);
        updated.provider_ref = d.provider_ref;
        updated.sender = Some(sender);
        updated.code_length = code_length;
        if let Some(h) = code_hash {
            updated.code_hash = h;
        }
        tracing::info!(
            verification = %record.id,
            provider = provider.name(),
            challenge = %record.challenge,
            "challenge delivered"
        );
        if let Some(phone) = PhoneNumber::from_stored(&record.phone) {
            self.count_sent(
                &phone,
                record.client.as_deref(),
                provider.name(),
                record.challenge,
            )
            .await;
        }
        Ok(updated)
    }

    fn delivery_error(&self, record: &VerificationRecord, e: ProviderError) -> Error {
        tracing::warn!(
            verification = %record.id,
            provider = %e.provider,
            kind = ?e.kind,
            error = %e.message,
            "delivery failed"
        );
        match e.kind {
            ErrorKind::InvalidNumber => Error::InvalidPhone(crate::phone::PhoneError::Invalid),
            ErrorKind::Blocked => Error::NotAllowed(Refusal::DestinationBlocked),
            ErrorKind::Unsupported => Error::NoProvider(format!(
                "no configured provider can deliver {}",
                record.challenge
            )),
            ErrorKind::Transient | ErrorKind::Permanent => Error::DeliveryFailed,
        }
    }

    async fn live(&self, id: &VerificationId) -> Result<VerificationRecord, Error> {
        let now = ts(self.clock.now());
        match self.store.verification(id.as_str()).await? {
            Some(v) if v.expires_at > now => Ok(v),
            _ => Err(Error::NotFound),
        }
    }

    fn view(&self, v: &VerificationRecord) -> Verification {
        let account = AccountId::for_stored(&v.account);
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
                v.code_length, v.phone
            ),
            Challenge::Voice => format!(
                "{} will receive a call that reads out a {}-digit verification code.",
                v.phone, v.code_length
            ),
            Challenge::MissedCall => format!(
                "{} will receive a missed call from {sender}: type the last {} digits of the \
                 calling number.",
                v.phone, v.code_length
            ),
        };
        Verification {
            id: VerificationId::from_stored(&v.id),
            jid: account.jid(&self.settings.domain),
            account,
            challenge: v.challenge,
            sender,
            instructions,
            code_length: v.code_length,
            expires_at: at(v.expires_at),
            next_resend_at: at(v.next_resend_at),
            next_call_at: if v.verified_at.is_none() {
                self.next_call_at(v)
            } else {
                None
            },
            attempts_left: self.limits(v).holder.saturating_sub(v.attempts),
            state,
            can_fallback: false,
            delivery: v.delivery_state.clone(),
            replayed: false,
        }
    }

    /// Sends a fresh code for verification `id`, with another challenge if given, once the
    /// resend wait (or, to replace a text message by a call, the call wait) has passed.
    pub async fn resend(
        &self,
        id: &VerificationId,
        challenge: Option<Challenge>,
        fallback: bool,
        origin: &Origin,
    ) -> Result<Verification, Error> {
        let v = self.live(id).await?;
        if v.verified_at.is_some() {
            return Err(Error::AlreadyVerified);
        }
        let now = self.clock.now();
        let challenge = challenge.unwrap_or(v.challenge);
        // The provider reported the last message undeliverable: the user will not get it, so
        // waiting for the resend time helps nobody, and the next message goes elsewhere.
        let undelivered = v.delivery_state.as_deref() == Some(DeliveryState::Failed.as_str());
        if undelivered && self.locked(&v) {
            return Err(Error::Locked {
                retry_at: at(v.expires_at),
            });
        } else if !undelivered {
            self.refuse_if_waiting(&v, challenge, now)?;
        }
        let phone = stored_phone(&v)?;
        self.check_lists(&phone, origin)?;
        self.throttle(abuse::Action::Resend, &phone, origin).await?;
        let test = self.is_test_number(&v.phone);
        // The same kind of code as before: long for a forced re-registration, or when the start
        // got one (a provider's own code, a missed call's digits, counts as short).
        let long = v.force || v.code_length as usize >= self.settings.long_code_length;
        let own_code = if v.force {
            OwnCode::Required
        } else if long {
            OwnCode::Preferred
        } else {
            OwnCode::Any
        };
        let verdict = if test {
            Verdict::default()
        } else {
            self.check_pumping(&phone, self.can_call(&phone, own_code))
                .await?
        };
        let challenge = self.pumping_challenge(challenge, verdict, &phone, own_code);
        let (candidates, can_fallback) = if test {
            (Vec::new(), false)
        } else {
            self.candidates(
                &phone,
                challenge,
                fallback || undelivered,
                v.provider.as_deref(),
                own_code,
            )?
        };
        let reserved = if test {
            Vec::new()
        } else {
            self.reserve_message(&phone).await?
        };
        let code = self.new_code(&v.phone, long);
        let renewal = Renewal {
            challenge,
            code_hash: self.secret.code_hash(&v.id, code.as_str()),
            code_length: code.as_str().len() as u32,
            expires_at: ts(now) + secs(self.settings.lifetime),
            next_resend_at: ts(now) + secs(self.resend_wait(v.sends + 1, verdict)),
            sent_at: ts(now),
        };
        if !self.store.renew_code(&v.id, v.sends, &renewal).await? {
            self.release_message(&reserved).await;
            // A concurrent resend (or completion) got there first.
            let retry_at = match self.store.verification(&v.id).await? {
                Some(now_v) if now_v.verified_at.is_none() => at(now_v.next_resend_at),
                Some(_) => return Err(Error::AlreadyVerified),
                None => return Err(Error::NotFound),
            };
            return Err(Error::RateLimited {
                retry_at,
                limit: Limit::InFlight,
            });
        }
        let renewed = VerificationRecord {
            challenge,
            code_hash: Some(renewal.code_hash),
            code_length: renewal.code_length,
            expires_at: renewal.expires_at,
            next_resend_at: renewal.next_resend_at,
            sends: v.sends + 1,
            delivery_state: None,
            last_sent_at: Some(renewal.sent_at),
            ..v.clone()
        };
        match self.deliver(&renewed, &code, &candidates).await {
            Ok(r) => Ok(Verification {
                can_fallback,
                ..self.view(&r)
            }),
            Err(e) => {
                self.release_message(&reserved).await;
                // The new code did not go out: let the client ask again at once.
                self.store.allow_resend(&v.id, ts(now)).await?;
                Err(e)
            }
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
        if self.store.delete_verification(id.as_str()).await? {
            tracing::info!(verification = %id, "verification cancelled");
            Ok(())
        } else {
            Err(Error::NotFound)
        }
    }

    /// Checks `code` for verification `id` (the caller holds the id, as the HTTP client does)
    /// and, when it matches, certifies `key` and stores the account. Submitting the same code and
    /// key again while the verification lives returns the same result.
    pub async fn verify(
        &self,
        id: &VerificationId,
        code: &Code,
        key: UserKey,
        origin: &Origin,
    ) -> Result<Registered, Error> {
        let v = self.live(id).await?;
        self.check_and_complete(v, code, key, Requester::Holder, origin)
            .await
    }

    /// Checks `code` for the pending verification of the account that `key`'s User ID names, as
    /// Kontalk clients do over XMPP (step 2 comes on a new connection, without the verification
    /// id). `requester` (a JID) gets its own budget of tries, so that anyone else's wrong guesses
    /// for the account cannot lock the real client out; the verification's total is capped too.
    pub async fn verify_by_key(
        &self,
        code: &Code,
        key: UserKey,
        origin: &Origin,
    ) -> Result<Registered, Error> {
        let now = ts(self.clock.now());
        let mut found = None;
        for account in openpgp::accounts_named(&key, &self.settings.domain) {
            if let Some(v) = self.store.verification_by_account(account.as_str()).await?
                && v.expires_at > now
            {
                found = Some(v);
                break;
            }
        }
        let Some(v) = found else {
            return Err(Error::NotFound);
        };
        // The client that started the verification, asking from the same address (before login,
        // through the Prosody relay) or the same JID (the component), is its holder.
        if !origin.ip_stand_in
            && let Some(client) = self.client_id(origin)
            && v.client.as_deref() == Some(client.as_str())
        {
            return self
                .check_and_complete(v, code, key, Requester::Holder, origin)
                .await;
        }
        // Anyone else: its JID, or before login its address.
        let requester = match (&origin.jid, origin.ip) {
            (Some(jid), _) => format!("jid:{jid}"),
            (None, Some(ip)) => format!(
                "ip:{}",
                abuse::ip_group(ip, self.settings.abuse.ipv6_prefix)
            ),
            (None, None) => "unknown".to_owned(),
        };
        let who = self.secret.pseudonym("requester", &requester);
        self.check_and_complete(v, code, key, Requester::Peer(&who), origin)
            .await
    }

    async fn check_and_complete(
        &self,
        v: VerificationRecord,
        code: &Code,
        key: UserKey,
        requester: Requester<'_>,
        origin: &Origin,
    ) -> Result<Registered, Error> {
        let id = VerificationId::from_stored(&v.id);
        let account = AccountId::for_stored(&v.account);
        let email = account.jid(&self.settings.domain);
        if v.verified_at.is_some() {
            return self.replay(&v, code, &key);
        }
        let now = self.clock.now();
        let exhausted = match requester {
            Requester::Holder => self.locked(&v),
            Requester::Peer(_) => self.closed_to_others(&v),
        };
        if exhausted {
            return self.duplicate_or_locked(&id, code, &key).await;
        }
        let phone = stored_phone(&v)?;
        // Tries per client, and others' tries per number across verifications, besides the
        // verification's own budgets; counted before the key is checked, which costs far more.
        // The holder's tries are not counted per number: a stranger's guesses would use them up.
        let scopes: &[abuse::Scope] = match requester {
            Requester::Holder => &guard::HOLDER_CHECK_SCOPES,
            Requester::Peer(_) => &abuse::Scope::ALL,
        };
        self.throttle_scopes(abuse::Action::Check, &phone, origin, scopes)
            .await?;
        // The key is judged before a try is spent: a bad key says nothing about the code.
        let key = {
            let email = email.clone();
            let when = std::time::SystemTime::from(now);
            self.crypto
                .run(move || openpgp::check_user_key(&key, &email, when).map(|()| key))
                .await??
        };
        // Spend the try before comparing, so that parallel guesses cannot outrun the counter.
        let Some(spent) = self
            .store
            .take_attempt(&v.id, requester, self.limits(&v), ts(now))
            .await?
        else {
            return self.duplicate_or_locked(&id, code, &key).await;
        };
        if !self.code_matches(&v, code).await? {
            let limits = self.limits(&v);
            let attempts_left = match requester {
                Requester::Holder => limits.holder.saturating_sub(spent),
                Requester::Peer(_) => limits.per_peer.saturating_sub(spent).min(
                    limits
                        .others
                        .saturating_sub(v.total_attempts.saturating_sub(v.attempts) + 1),
                ),
            };
            tracing::info!(verification = %v.id, attempts_left, "wrong code");
            return Err(Error::WrongCode { attempts_left });
        }
        // Duplicates of this submission that find no try left wait for its result.
        self.store.mark_completing(&v.id, ts(now)).await?;
        let certified = {
            let server = self.server_key.clone();
            let when = std::time::SystemTime::from(now);
            let email = email.clone();
            let key = key.clone();
            self.crypto
                .run(move || server.certify(&key, &email, when))
                .await?
                .map_err(|e| {
                    tracing::error!(error = %e, "certification failed");
                    Error::Internal
                })?
        };
        let completion = Completion {
            fingerprint: certified.fingerprint.clone(),
            public_key: certified.bytes.clone(),
            replace_account: v.force,
            now: ts(now),
            // Only a forced registration can replace a key, and so need an event.
            notice: if v.force {
                self.notice()
            } else {
                Notice::default()
            },
        };
        match self.store.complete(&v.id, &v.account, &completion).await? {
            CompleteOutcome::Done => {
                if v.force {
                    self.events_waker.notify_waiters();
                }
                if !self.is_test_number(&v.phone) {
                    self.count_completed(&phone, v.created_at).await;
                }
                tracing::info!(
                    verification = %v.id,
                    account = %account,
                    fingerprint = %certified.fingerprint,
                    replaced = v.force,
                    "account registered"
                );
                Ok(Registered {
                    jid: email,
                    account,
                    fingerprint: certified.fingerprint,
                    public_key: certified.bytes,
                })
            }
            CompleteOutcome::AccountExists => Err(Error::Conflict),
            CompleteOutcome::NotPending => {
                // A concurrent submission completed it first.
                let done = self.live(&id).await?;
                self.replay(&done, code, &key)
            }
        }
    }

    /// A submission that found no try left: the stored result when the verification is done
    /// (the same code and key), or, when a correct code is being certified right now (only a
    /// correct code within the budget marks that), the result once it is there, for a
    /// duplicate of that submission; else locked. Waiting only follows a correct code someone
    /// else already submitted, so it tells a guesser nothing.
    async fn duplicate_or_locked(
        &self,
        id: &VerificationId,
        code: &Code,
        key: &UserKey,
    ) -> Result<Registered, Error> {
        /// How long a duplicate waits for the certification it follows.
        const WAIT: Duration = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.live(id).await?;
            if v.verified_at.is_some() {
                return self.replay(&v, code, key);
            }
            let same_code = v
                .code_hash
                .as_deref()
                .is_some_and(|h| self.secret.code_matches(&v.id, code.as_str(), h));
            if v.completing_at.is_none() || !same_code || tokio::time::Instant::now() >= deadline {
                return Err(Error::Locked {
                    retry_at: at(v.expires_at),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn code_matches(&self, v: &VerificationRecord, code: &Code) -> Result<bool, Error> {
        if let Some(hash) = &v.code_hash {
            return Ok(self.secret.code_matches(&v.id, code.as_str(), hash));
        }
        let (Some(name), Some(reference)) = (&v.provider, &v.provider_ref) else {
            tracing::error!(verification = %v.id, "no code hash and no provider reference");
            return Err(Error::Internal);
        };
        let Some(provider) = self.dispatcher.provider(name) else {
            tracing::error!(verification = %v.id, provider = %name, "provider is gone");
            return Err(Error::Internal);
        };
        provider.check(reference, code.as_str()).await.map_err(|e| {
            tracing::warn!(verification = %v.id, error = %e, "provider check failed");
            Error::DeliveryFailed
        })
    }

    /// The stored result of a completed verification, for the same code and key only.
    fn replay(
        &self,
        v: &VerificationRecord,
        code: &Code,
        key: &UserKey,
    ) -> Result<Registered, Error> {
        let same_code = v
            .code_hash
            .as_deref()
            .is_some_and(|h| self.secret.code_matches(&v.id, code.as_str(), h));
        match (&v.result_fingerprint, &v.result_key) {
            (Some(fpr), Some(bytes)) if same_code && *fpr == key.fingerprint() => {
                let account = AccountId::for_stored(&v.account);
                Ok(Registered {
                    jid: account.jid(&self.settings.domain),
                    account,
                    fingerprint: fpr.clone(),
                    public_key: bytes.clone(),
                })
            }
            _ => Err(Error::AlreadyVerified),
        }
    }

    /// The account `id`, if registered.
    pub async fn account(&self, id: &AccountId) -> Result<Option<AccountRecord>, Error> {
        Ok(self.store.account(id.as_str()).await?)
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
            .record_receipt(
                name,
                &receipt.provider_ref,
                receipt.state.as_str(),
                ts(self.clock.now()),
            )
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
        Ok(self.store.purge_expired(ts(self.clock.now())).await?)
    }
}
