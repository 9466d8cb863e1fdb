//! Sending codes: a start, a resend, and the delivery through a provider.
//!
//! Each step reads what it needs, decides, and hands the store one [`Plan`]: the rate-limit
//! charges, the pumping measures, and the new verification or code with its daily-cap
//! reservation, applied in one transaction. Then a provider delivers, and the result (what the
//! provider said and the counters, or the verification and reservation gone again) is recorded in
//! one write.

use std::sync::Arc;
use std::time::Duration;

use registrar_providers::{
    DeliveredCode, DeliveryState, ErrorKind, Outgoing, Provider, ProviderError,
};

use super::abuse::{self, Action, Scope};
use super::guard::Verdict;
use super::ports::{
    Applied, Delivery, DeliveryOutcome, NewVerification, Plan, RateBucket, Renew, Renewal,
    SentRecord, StartFacts, StartQuery, StoreError, Time, VerificationRecord, Write,
};
use super::{
    Challenge, Code, Error, Limit, OwnCode, Refusal, Registrar, StartRequest, TEST_PROVIDER,
    Verification, VerificationId, after, whole_seconds,
};
use crate::phone::PhoneNumber;

/// A refusal decided before the plan is applied: it is answered once the plan's charges went
/// through (a refused request still pays for asking).
type Decision<T> = Result<T, Error>;

impl Registrar {
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
        let instant = self.clock.now();
        let now = whole_seconds(instant);
        let client = self.client_id(&req.origin);
        let idempotency_key = self.idempotency_id(&req.origin);
        let account = req.phone.account();
        let facts = self
            .store
            .start_facts(&StartQuery {
                phone: &req.phone,
                account: &account,
                idempotency_key: idempotency_key.as_deref(),
            })
            .await?;
        if let Some(v) = self.repeated_start(&req, &facts, client.as_deref(), now)? {
            tracing::info!(verification = %v.id, "repeated start answered with the verification");
            return Ok(Verification {
                replayed: true,
                ..self.view(&v)
            });
        }
        // Charged before anything is answered: a `conflict` tells that a number is registered,
        // so asking costs as much as a message.
        let (charge, scopes) =
            self.rate_buckets(Action::Start, &req.phone, &req.origin, &Scope::ALL);
        let test = self.is_test_number(req.phone.as_str());
        let mut measures = Vec::new();
        let decision = self
            .decide_start(&req, &facts, now, test, &mut measures)
            .await;
        let write = match &decision {
            Ok(d) => {
                let id = VerificationId::generate();
                let code = self.new_code(req.phone.as_str(), d.own_code != OwnCode::Any);
                let record = VerificationRecord {
                    code_hash: Some(self.secret.code_hash(id.as_str(), code.as_str())),
                    code_length: code.as_str().len() as u32,
                    id,
                    phone: req.phone.clone(),
                    account: account.clone(),
                    challenge: d.challenge,
                    // What `force` means: the verification replaces an account's key.
                    force: req.force && facts.registered,
                    provider: None,
                    provider_ref: None,
                    sender: None,
                    attempts: 0,
                    total_attempts: 0,
                    sends: 1,
                    created_at: now,
                    expires_at: after(now, self.settings.lifetime),
                    next_resend_at: after(now, self.resend_wait(1, d.verdict)),
                    verified_at: None,
                    result_fingerprint: None,
                    result_key: None,
                    locale: req.locale.clone(),
                    delivery_state: None,
                    client: client.clone(),
                    idempotency_key: idempotency_key.clone(),
                    last_sent_at: Some(now),
                };
                Some((record, code))
            }
            Err(_) => None,
        };
        let plan = Plan {
            now: instant,
            charge,
            measures,
            write: match (&write, &decision) {
                (Some((record, _)), Ok(d)) => Write::Create(NewVerification {
                    record: record.clone(),
                    replaces: facts.by_phone.as_ref().map(|v| v.id.clone()),
                    frees: facts
                        .by_idempotency_key
                        .as_ref()
                        .filter(|v| v.expires_at <= now)
                        .filter(|v| facts.by_phone.as_ref().is_none_or(|p| p.id != v.id))
                        .map(|v| v.id.clone()),
                    caps: d.caps.clone(),
                    day: abuse::day(now.timestamp()),
                    take: d.short_code.iter().cloned().collect(),
                }),
                _ => Write::Nothing,
            },
        };
        let applied = self
            .apply_plan(plan, &scopes, Action::Start, &req.phone)
            .await?;
        let decided = decision?;
        let Some((record, code)) = write else {
            return Err(Error::Internal);
        };
        match applied {
            Applied::Done => {}
            Applied::RateLimited { .. } => return Err(Error::Internal),
            Applied::CapReached { cap } => return Err(self.cap_reached(&decided.caps, cap, now)),
            Applied::Conflict => {
                // Another start for this number (or with this idempotency key) won the race:
                // its message is on the way.
                let retry_at = match self
                    .store
                    .start_facts(&StartQuery {
                        phone: &req.phone,
                        account: &account,
                        idempotency_key: None,
                    })
                    .await?
                    .by_phone
                {
                    Some(other) => other.next_resend_at,
                    None => now + chrono::Duration::seconds(1),
                };
                return Err(Error::RateLimited {
                    retry_at,
                    limit: Limit::InFlight,
                });
            }
        }
        tracing::info!(
            verification = %record.id,
            phone = %self.log_id(record.phone.as_str()),
            country = req.phone.calling_code(),
            challenge = %record.challenge,
            force = req.force,
            test,
            "verification started"
        );
        let reserved: Vec<String> = decided.caps.into_iter().map(|(s, _)| s).collect();
        let record = self
            .deliver(&record, &code, &decided.candidates, &reserved, true)
            .await?;
        Ok(Verification {
            can_fallback: decided.can_fallback,
            ..self.view(&record)
        })
    }

    /// What a start that is not a repeat does: the refusal, or the challenge, code kind,
    /// providers and reservations of the new verification. The pumping measures to put go to
    /// `measures` either way.
    async fn decide_start(
        &self,
        req: &StartRequest,
        facts: &StartFacts,
        now: Time,
        test: bool,
        measures: &mut Vec<super::ports::MeasureChange>,
    ) -> Decision<StartDecision> {
        if !req.force && facts.registered {
            return Err(Error::Conflict);
        }
        let asked = req.challenge.unwrap_or(self.settings.default_challenge);
        // A forced re-registration of an account always gets a long code; so does a number asked
        // for more often than short codes are given out (someone may be guessing), when a
        // provider that sends our own code can deliver it. A forced start for a number without
        // an account replaces nothing and is a plain one.
        let short_code = (!test)
            .then(|| self.short_code_bucket(&req.phone))
            .flatten();
        let own_code = if req.force && facts.registered {
            OwnCode::Required
        } else if let Some(bucket) = &short_code
            && !self.short_code_free(bucket, &req.phone).await
        {
            OwnCode::Preferred
        } else {
            OwnCode::Any
        };
        if let Some(old) = &facts.by_phone
            && old.expires_at > now
            && old.verified_at.is_none()
        {
            self.refuse_if_waiting(old, asked, now)?;
        }
        let verdict = if test {
            Verdict::default()
        } else {
            let can_call = self.can_call(&req.phone, own_code);
            self.check_pumping(&req.phone, can_call, measures).await?
        };
        let challenge = self.pumping_challenge(asked, verdict, &req.phone, own_code);
        let (candidates, can_fallback) = if test {
            (Vec::new(), false)
        } else {
            self.candidates(&req.phone, challenge, req.fallback, None, own_code)?
        };
        Ok(StartDecision {
            challenge,
            own_code,
            verdict,
            candidates,
            can_fallback,
            caps: if test {
                Vec::new()
            } else {
                self.caps(&req.phone)
            },
            short_code: short_code.filter(|_| own_code == OwnCode::Any),
        })
    }

    /// Applies `plan`, whose charges are `scopes[i]` of `action`: a refused charge answers with
    /// its limit. When the store fails and the plan charges limits, the limits' failure mode
    /// decides: refused (fail closed), or applied without the charges (fail open).
    async fn apply_plan(
        &self,
        mut plan: Plan,
        scopes: &[Scope],
        action: Action,
        phone: &PhoneNumber,
    ) -> Result<Applied, Error> {
        let applied = match self.store.apply(&plan).await {
            Ok(a) => a,
            Err(e @ StoreError::Database(_)) if !plan.charge.is_empty() => {
                self.limits_failed(e, "rate limits")?;
                plan.charge.clear();
                if let Write::Create(c) = &mut plan.write {
                    c.take.clear();
                }
                self.store.apply(&plan).await?
            }
            Err(e) => return Err(e.into()),
        };
        if let Applied::RateLimited { bucket, retry_at } = applied {
            let scope = scopes.get(bucket).copied().unwrap_or(Scope::Global);
            return Err(self.rate_limited(action, scope, phone, retry_at));
        }
        Ok(applied)
    }

    /// The live verification a repeated start refers to: the one started with the same
    /// idempotency key (for the same number, else the key is misused), or the pending one of
    /// this number started by the same client within the repeat window.
    fn repeated_start(
        &self,
        req: &StartRequest,
        facts: &StartFacts,
        client: Option<&str>,
        now: Time,
    ) -> Result<Option<VerificationRecord>, Error> {
        // Expired and not purged yet: the key is free again (the new verification frees it).
        if let Some(v) = &facts.by_idempotency_key
            && v.expires_at > now
        {
            if v.phone != req.phone || (v.force && !req.force) {
                return Err(Error::IdempotencyKeyReused);
            }
            return Ok(Some(v.clone()));
        }
        let Some(client) = client else {
            return Ok(None);
        };
        let window = self.settings.abuse.repeat_window;
        Ok(facts
            .by_phone
            .as_ref()
            .filter(|v| {
                v.expires_at > now
                    && v.verified_at.is_none()
                    && !self.locked(v)
                    && v.client.as_deref() == Some(client)
                    // A forced start for a number without an account made a plain one.
                    && (req.force || !v.force)
                    && req.challenge.is_none_or(|c| c == v.challenge)
                    && after(v.last_sent_at.unwrap_or(v.created_at), window) > now
            })
            .cloned())
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
        now: Time,
    ) -> Result<(), Error> {
        if self.locked(v) {
            return Err(Error::Locked {
                retry_at: v.expires_at,
            });
        }
        let allowed_at = match self.next_call_at(v) {
            Some(call_at) if challenge != Challenge::Pin && v.challenge == Challenge::Pin => {
                call_at.min(v.next_resend_at)
            }
            _ => v.next_resend_at,
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
    pub(super) fn next_call_at(&self, v: &VerificationRecord) -> Option<Time> {
        if v.challenge != Challenge::Pin || self.is_test_number(v.phone.as_str()) {
            return None;
        }
        let offered = self
            .dispatcher
            .challenges()
            .iter()
            .any(|c| *c != Challenge::Pin);
        offered.then(|| {
            after(
                v.last_sent_at.unwrap_or(v.created_at),
                self.settings.call_wait,
            )
        })
    }

    /// Sends `code` for `record` through the first of `candidates` that takes it, and records
    /// the result in one write: what the provider reported with the traffic and spend counters,
    /// or, when nothing went out, the reservation under the caps (`reserved`) given back with the
    /// verification (`started`: a start's is deleted, a resend's may send again at once).
    async fn deliver(
        &self,
        record: &VerificationRecord,
        code: &Code,
        candidates: &[Arc<dyn Provider>],
        reserved: &[String],
        started: bool,
    ) -> Result<VerificationRecord, Error> {
        let now = whole_seconds(self.clock.now());
        if self.is_test_number(record.phone.as_str()) {
            // A test number's fixed code never reaches a provider.
            let delivery = Delivery {
                provider: TEST_PROVIDER.to_owned(),
                provider_ref: None,
                sender: TEST_PROVIDER.to_owned(),
                code_hash: None,
                code_length: record.code_length,
            };
            self.store
                .record_delivery(
                    &record.id,
                    &DeliveryOutcome::Sent {
                        delivery: delivery.clone(),
                        counted: None,
                        owner: None,
                        now,
                    },
                )
                .await?;
            tracing::info!(verification = %record.id, "test number: nothing sent");
            return Ok(VerificationRecord {
                provider: Some(delivery.provider),
                sender: Some(delivery.sender),
                ..record.clone()
            });
        }
        let valid_for = (record.expires_at - now).to_std().unwrap_or(Duration::ZERO);
        let message = Outgoing {
            to: record.phone.as_str().to_owned(),
            challenge: record.challenge,
            code: code.as_str().to_owned(),
            text: self.settings.templates.render(
                record.challenge,
                record.locale.as_deref(),
                code.as_str(),
                &self.settings.service_name,
            ),
            reference: record.id.as_str().to_owned(),
            valid_for,
            locale: record.locale.clone(),
        };
        let sent = match self.dispatcher.deliver(candidates, &message).await {
            Ok(sent) => sent,
            Err(e) => {
                let error = self.delivery_error(record, e);
                let failed = DeliveryOutcome::Failed {
                    delete: started,
                    caps: reserved.to_vec(),
                    day: abuse::day(now.timestamp()),
                    now,
                };
                self.store.record_delivery(&record.id, &failed).await?;
                return Err(error);
            }
        };
        let (provider, delivered) = sent;
        if record.force && delivered.code != DeliveredCode::Ours {
            // `candidates` keeps only providers that say they send our code for a replacement.
            tracing::error!(
                verification = %record.id,
                provider = provider.name(),
                "a provider sent its own code for a forced re-registration"
            );
            return Err(Error::Internal);
        }
        let (code_hash, code_length) = match &delivered.code {
            DeliveredCode::Ours => (None, record.code_length),
            DeliveredCode::Chosen(chosen) => (
                Some(Some(self.secret.code_hash(record.id.as_str(), chosen))),
                chosen.len() as u32,
            ),
            // A missed call whose masked caller number (`+44-7xxx????`) hides the code: the user
            // types the hidden digits.
            DeliveredCode::ProviderChecks if delivered.sender.contains('?') => {
                (Some(None), delivered.sender.matches('?').count() as u32)
            }
            DeliveredCode::ProviderChecks => (Some(None), record.code_length),
        };
        let sender = if delivered.sender.is_empty() {
            provider.name().to_owned()
        } else {
            delivered.sender.clone()
        };
        let delivery = Delivery {
            provider: provider.name().to_owned(),
            provider_ref: delivered.provider_ref.clone(),
            sender: sender.clone(),
            code_hash: code_hash.clone(),
            code_length,
        };
        let counted = self.sent_record(record, provider.name(), now);
        let owner = if record.force && !self.settings.event_sinks.is_empty() {
            Some((record.account.clone(), self.notice()))
        } else {
            None
        };
        let told = self
            .store
            .record_delivery(
                &record.id,
                &DeliveryOutcome::Sent {
                    delivery: delivery.clone(),
                    counted: Some(counted),
                    owner,
                    now,
                },
            )
            .await?;
        if told {
            tracing::info!(verification = %record.id, "the account's owner is told");
            self.events_waker.notify_waiters();
        }
        let mut updated = record.clone();
        updated.provider = Some(delivery.provider);
        updated.provider_ref = delivery.provider_ref;
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

    /// Sends a fresh code for verification `id`, with another challenge if given, once the
    /// resend wait (or, to replace a text message by a call, the call wait) has passed.
    pub async fn resend(
        &self,
        id: &VerificationId,
        challenge: Option<Challenge>,
        fallback: bool,
        origin: &super::Origin,
    ) -> Result<Verification, Error> {
        let v = self.live(id).await?;
        if v.verified_at.is_some() {
            return Err(Error::AlreadyVerified);
        }
        let instant = self.clock.now();
        let now = whole_seconds(instant);
        let challenge = challenge.unwrap_or(v.challenge);
        // The provider reported the last message undeliverable: the user will not get it, so
        // waiting for the resend time helps nobody, and the next message goes elsewhere.
        let undelivered = v.delivery_state == Some(DeliveryState::Failed);
        if undelivered && self.locked(&v) {
            return Err(Error::Locked {
                retry_at: v.expires_at,
            });
        } else if !undelivered {
            self.refuse_if_waiting(&v, challenge, now)?;
        }
        let phone = v.phone.clone();
        self.check_lists(&phone, origin)?;
        let (charge, scopes) = self.rate_buckets(Action::Resend, &phone, origin, &Scope::ALL);
        let test = self.is_test_number(phone.as_str());
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
        let mut measures = Vec::new();
        let decision = async {
            let verdict = if test {
                Verdict::default()
            } else {
                self.check_pumping(&phone, self.can_call(&phone, own_code), &mut measures)
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
            Ok::<_, Error>((verdict, challenge, candidates, can_fallback))
        }
        .await;
        let caps = if test { Vec::new() } else { self.caps(&phone) };
        let renewal = decision.as_ref().ok().map(|(verdict, challenge, ..)| {
            let code = self.new_code(phone.as_str(), long);
            let renewal = Renewal {
                challenge: *challenge,
                code_hash: self.secret.code_hash(v.id.as_str(), code.as_str()),
                code_length: code.as_str().len() as u32,
                expires_at: after(now, self.settings.lifetime),
                next_resend_at: after(now, self.resend_wait(v.sends + 1, *verdict)),
                sent_at: now,
            };
            (renewal, code)
        });
        let plan = Plan {
            now: instant,
            charge,
            measures,
            write: match &renewal {
                Some((renewal, _)) => Write::Renew(Renew {
                    id: v.id.clone(),
                    sends: v.sends,
                    renewal: renewal.clone(),
                    caps: caps.clone(),
                    day: abuse::day(now.timestamp()),
                }),
                None => Write::Nothing,
            },
        };
        let applied = self
            .apply_plan(plan, &scopes, Action::Resend, &phone)
            .await?;
        let (_, _, candidates, can_fallback) = decision?;
        let Some((renewal, code)) = renewal else {
            return Err(Error::Internal);
        };
        match applied {
            Applied::Done => {}
            Applied::RateLimited { .. } => return Err(Error::Internal),
            Applied::CapReached { cap } => return Err(self.cap_reached(&caps, cap, now)),
            Applied::Conflict => {
                // A concurrent resend (or completion) got there first.
                let retry_at = match self.store.verification(&v.id).await? {
                    Some(now_v) if now_v.verified_at.is_none() => now_v.next_resend_at,
                    Some(_) => return Err(Error::AlreadyVerified),
                    None => return Err(Error::NotFound),
                };
                return Err(Error::RateLimited {
                    retry_at,
                    limit: Limit::InFlight,
                });
            }
        }
        let renewed = VerificationRecord {
            challenge: renewal.challenge,
            code_hash: Some(renewal.code_hash),
            code_length: renewal.code_length,
            expires_at: renewal.expires_at,
            next_resend_at: renewal.next_resend_at,
            sends: v.sends + 1,
            delivery_state: None,
            last_sent_at: Some(renewal.sent_at),
            provider_ref: None,
            ..v
        };
        let reserved: Vec<String> = caps.into_iter().map(|(s, _)| s).collect();
        let r = self
            .deliver(&renewed, &code, &candidates, &reserved, false)
            .await?;
        Ok(Verification {
            can_fallback,
            ..self.view(&r)
        })
    }

    /// The traffic and spend counters of a message of `record` that went out through
    /// `provider`, with its log line.
    fn sent_record(&self, record: &VerificationRecord, provider: &str, now: Time) -> SentRecord {
        let a = &self.settings.abuse;
        let (digits, country) = Self::digits_and_country(&record.phone);
        let price = abuse::price(&a.costs, provider, &country);
        tracing::info!(
            provider,
            country = %country,
            challenge = %record.challenge,
            cost = price,
            currency = %a.currency,
            "message sent"
        );
        SentRecord {
            scopes: a.traffic_scopes(digits, &country),
            number: super::guard::item(&self.log_id(record.phone.as_str())),
            source: record.client.as_deref().map(super::guard::item),
            bucket: abuse::bucket(now.timestamp()),
            day: abuse::day(now.timestamp()),
            provider: provider.to_owned(),
            country,
            challenge: record.challenge,
        }
    }

    /// The bucket of short codes of `phone`, if they are limited.
    fn short_code_bucket(&self, phone: &PhoneNumber) -> Option<RateBucket> {
        let rate = self.settings.short_codes_per_number?;
        Some(RateBucket::new(
            format!(
                "short-code:number:{}",
                self.secret.pseudonym("phone", phone.as_str())
            ),
            rate,
        ))
    }
}

/// What a start decided to send.
struct StartDecision {
    challenge: Challenge,
    own_code: OwnCode,
    verdict: Verdict,
    candidates: Vec<Arc<dyn Provider>>,
    can_fallback: bool,
    caps: Vec<(String, u32)>,
    short_code: Option<RateBucket>,
}
