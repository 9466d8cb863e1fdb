//! How the core applies the abuse rules of [`abuse`](super::abuse) through the store: rate
//! limits per scope, allow and deny lists, the SMS-pumping block, daily caps, and the traffic and
//! spend counters. Every counter is a row in the database, so that instances agree.
//!
//! When the store cannot count, the service fails closed (a refusal saying so, and an error in
//! the log) unless `abuse.fail_open` is set. Numbers and IPs appear in keys and logs only as keyed
//! hashes ([`ServerSecret::pseudonym`](crate::secret::ServerSecret::pseudonym)); prefixes and
//! calling codes appear as they are, since operators block and price by them.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::abuse::{self, Action, Measure, Scope, Step};
use super::error::Limit;
use super::ports::{BlockRecord, MeasureChange, RateBucket, SpendRecord, StoreError, Time};
use super::{Error, Refusal, Registrar, after, from_unix, whole_seconds};
use crate::phone::PhoneNumber;

/// Who is asking, as far as a transport can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The client's address (the HTTP API's peer, or the address a trusted proxy forwarded).
    pub ip: Option<IpAddr>,
    /// `ip` is a proxy's own address standing in for a client the proxy did not name: the
    /// per-IP limits count by it, `abuse.trusted_ips` never spares it.
    pub ip_stand_in: bool,
    /// The client's bare JID (XMPP).
    pub jid: Option<String>,
    /// The start request's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
}

impl Origin {
    /// A client known by its address.
    pub fn ip(ip: IpAddr) -> Self {
        Self {
            ip: Some(ip),
            ..Self::default()
        }
    }

    /// A client known by its JID.
    pub fn jid(jid: impl Into<String>) -> Self {
        Self {
            jid: Some(jid.into()),
            ..Self::default()
        }
    }
}

/// How long a client is told to wait when the limits cannot be read.
const UNAVAILABLE_RETRY_SECS: i64 = 30;

/// The scopes a holder's code tries count in: not the number's, which a stranger's guesses could
/// use up (the holder's own budget per verification bounds them, and starts are limited per
/// number).
pub(super) const HOLDER_CHECK_SCOPES: [Scope; 4] =
    [Scope::Ip, Scope::Prefix, Scope::Country, Scope::Global];

/// One line of the spend report.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendLine {
    /// The counters.
    pub record: SpendRecord,
    /// Messages times the configured price, if one is configured.
    pub cost: Option<f64>,
}

/// What the pumping defence asks of a message to a number: the strongest step of any of its
/// traffic scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Verdict {
    /// Longer waits between messages.
    pub slow: bool,
    /// A missed call instead of a text or voice call, where a provider can place one.
    pub call: bool,
}

/// A keyed hash as a 64-bit counter item.
pub(super) fn item(pseudonym: &str) -> i64 {
    u64::from_str_radix(pseudonym, 16).unwrap_or_default() as i64
}

impl Registrar {
    /// The E.164 digits and calling code of `phone`.
    pub(super) fn digits_and_country(phone: &PhoneNumber) -> (&str, String) {
        let digits = phone.as_str().trim_start_matches('+');
        (digits, phone.calling_code().to_string())
    }

    /// Whether `phone` is a configured test number.
    pub(super) fn is_test_number(&self, phone: &str) -> bool {
        self.settings.abuse.test_numbers.contains_key(phone)
    }

    /// A store failure while counting: refused (fail closed) or let through (fail open), with a
    /// log line either way.
    pub(super) fn limits_failed(&self, e: StoreError, what: &str) -> Result<(), Error> {
        if self.settings.abuse.fail_open {
            tracing::warn!(error = %e, what, "cannot read the limits; serving anyway (fail_open)");
            Ok(())
        } else {
            tracing::error!(error = %e, what, "cannot read the limits; refusing (fail closed)");
            Err(Error::LimitsUnavailable {
                retry_at: self.clock.now() + chrono::Duration::seconds(UNAVAILABLE_RETRY_SECS),
            })
        }
    }

    /// Refuses numbers and clients the allow and deny lists exclude.
    pub(super) fn check_lists(&self, phone: &PhoneNumber, origin: &Origin) -> Result<(), Error> {
        let lists = &self.settings.abuse.lists;
        if let Some(ip) = origin.ip
            && lists.ip_denied(ip)
        {
            tracing::info!(ip = %self.ip_log_id(ip), "request from a denied address");
            return Err(Error::NotAllowed(Refusal::AddressBlocked));
        }
        if self.is_test_number(phone.as_str()) {
            return Ok(());
        }
        let (digits, country) = Self::digits_and_country(phone);
        lists
            .check_number(digits, &country)
            .map_err(Error::NotAllowed)
    }

    pub(super) fn ip_log_id(&self, ip: IpAddr) -> String {
        self.secret
            .pseudonym("ip", &abuse::ip_group(ip, self.settings.abuse.ipv6_prefix))
    }

    /// The keyed hash that names `origin` as the client of a verification.
    pub(super) fn client_id(&self, origin: &Origin) -> Option<String> {
        match (&origin.ip, &origin.jid) {
            (Some(ip), _) => Some(self.ip_log_id(*ip)),
            (None, Some(jid)) => Some(self.secret.pseudonym("jid", jid)),
            (None, None) => None,
        }
    }

    /// The keyed hash of an idempotency key.
    pub(super) fn idempotency_id(&self, origin: &Origin) -> Option<String> {
        origin
            .idempotency_key
            .as_deref()
            .map(|k| self.secret.pseudonym("idempotency-key", k))
    }

    /// Takes one `action` from every limited scope of `phone` and `origin` in `only`; refuses
    /// with the limit that is exhausted.
    pub(super) async fn throttle_scopes(
        &self,
        action: Action,
        phone: &PhoneNumber,
        origin: &Origin,
        only: &[Scope],
    ) -> Result<(), Error> {
        let (buckets, scopes) = self.rate_buckets(action, phone, origin, only);
        match self.take_buckets(&buckets, &scopes, "rate limits").await? {
            None => Ok(()),
            Some((scope, retry_at)) => Err(self.rate_limited(action, scope, phone, retry_at)),
        }
    }

    /// The refusal of `action` for `phone` by the limit of `scope`, logged.
    pub(super) fn rate_limited(
        &self,
        action: Action,
        scope: Scope,
        phone: &PhoneNumber,
        retry_at: Time,
    ) -> Error {
        tracing::info!(
            action = action.as_str(),
            limit = scope.as_str(),
            phone = %self.log_id(phone.as_str()),
            country = phone.calling_code(),
            "rate limited"
        );
        Error::RateLimited {
            retry_at,
            limit: Limit::Rate(scope),
        }
    }

    /// The buckets of `action` for `phone` and `origin` in the limited scopes of `only`, and the
    /// scope of each.
    pub(super) fn rate_buckets(
        &self,
        action: Action,
        phone: &PhoneNumber,
        origin: &Origin,
        only: &[Scope],
    ) -> (Vec<RateBucket>, Vec<Scope>) {
        let a = &self.settings.abuse;
        let limits = a.limits(action);
        let (digits, country) = Self::digits_and_country(phone);
        let mut buckets = Vec::with_capacity(5);
        let mut scopes = Vec::with_capacity(5);
        for scope in only.iter().copied() {
            let Some(rate) = limits.get(scope) else {
                continue;
            };
            let value = match scope {
                Scope::Ip => match origin.ip {
                    Some(ip) if origin.ip_stand_in || !a.lists.ip_trusted(ip) => self.ip_log_id(ip),
                    _ => continue,
                },
                Scope::Number => self.secret.pseudonym("phone", phone.as_str()),
                Scope::Prefix => a.prefix(digits).to_owned(),
                Scope::Country => country.clone(),
                Scope::Global => String::new(),
            };
            buckets.push(RateBucket::new(
                format!("{}:{}:{value}", action.as_str(), scope.as_str()),
                rate,
            ));
            scopes.push(scope);
        }
        (buckets, scopes)
    }

    /// Whether a new verification of `phone` may get a short code: whether the number's budget
    /// of short codes (`bucket`) has one (an unreadable budget gives a long code, the safe side).
    /// The start that gets it takes it with its verification.
    pub(super) async fn short_code_free(&self, bucket: &RateBucket, phone: &PhoneNumber) -> bool {
        match self.store.rate_free(bucket, self.clock.now()).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(phone = %self.log_id(phone.as_str()), "short codes used up: a long code");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot count short codes: a long code");
                false
            }
        }
    }

    /// Takes one `action` (a name for the keys and the log) from the client's budget, `per_client`
    /// (its address, IPv6 by network, as the per-IP limits count; without an address, its JID),
    /// and from the service's, `global`, before the request is parsed or looked up.
    pub(super) async fn throttle_client(
        &self,
        action: &str,
        origin: &Origin,
        per_client: Option<abuse::Rate>,
        global: Option<abuse::Rate>,
    ) -> Result<(), Error> {
        // A trusted backend (`abuse.trusted_ips`) speaks for many users: only the global budget
        // applies to it, as only the global limits apply to its starts.
        let client = match (origin.ip, &origin.jid) {
            (Some(ip), _) if !origin.ip_stand_in && self.settings.abuse.lists.ip_trusted(ip) => {
                None
            }
            (Some(ip), _) => Some(self.ip_log_id(ip)),
            (None, Some(jid)) => Some(self.secret.pseudonym("jid", jid)),
            (None, None) => None,
        };
        let mut buckets = Vec::with_capacity(2);
        let mut scopes = Vec::with_capacity(2);
        for (rate, value, scope) in [
            (per_client, client, Scope::Ip),
            (global, Some(String::new()), Scope::Global),
        ] {
            let (Some(rate), Some(value)) = (rate, value) else {
                continue;
            };
            buckets.push(RateBucket::new(
                format!("{action}:{}:{value}", scope.as_str()),
                rate,
            ));
            scopes.push(scope);
        }
        match self.take_buckets(&buckets, &scopes, action).await? {
            None => Ok(()),
            Some((scope, retry_at)) => {
                tracing::info!(action, limit = scope.as_str(), "rate limited");
                Err(Error::RateLimited {
                    retry_at,
                    limit: Limit::Rate(scope),
                })
            }
        }
    }

    /// Takes one request on a registered account (a key rollover, a removal, a private key
    /// upload) from the client's budget, before any key or signature is parsed: these requests
    /// carry proof that is costly to check and they must not tell registered numbers apart.
    pub async fn throttle_account_request(&self, origin: &Origin) -> Result<(), Error> {
        self.throttle_client(
            "account",
            origin,
            self.settings.account_requests_per_client,
            None,
        )
        .await
    }

    /// Takes one event from every bucket at once (`scopes[i]` names `buckets[i]`): `None` when
    /// all had one, else the scope that refused and when it will have one again. When the store
    /// cannot count, fails closed or open as configured (`what` names the limits in the log).
    pub(super) async fn take_buckets(
        &self,
        buckets: &[RateBucket],
        scopes: &[Scope],
        what: &str,
    ) -> Result<Option<(Scope, DateTime<Utc>)>, Error> {
        if buckets.is_empty() {
            return Ok(None);
        }
        match self.store.take_rates(buckets, self.clock.now()).await {
            Ok(None) => Ok(None),
            Ok(Some((i, retry_at))) => Ok(Some((scopes[i], retry_at))),
            Err(e) => self.limits_failed(e, what).map(|()| None),
        }
    }

    /// Judges the recent traffic of every scope of `phone` (its calling code, and prefixes from
    /// short to the `prefix_digits` one) and answers in steps: a scope where too few numbers
    /// complete gets longer waits, then missed calls instead of texts (a `call` measure for the
    /// window); the `prefix_digits` prefix is blocked when missed calls have not helped for
    /// `block_after`, or at once when no provider can place one (`can_call`). Broader scopes are
    /// never blocked, so that a country's own users keep getting codes. Refuses a message to a
    /// blocked scope. The measures to put (new ones, and extensions once half gone) go to
    /// `changes`, for the step's plan.
    pub(super) async fn check_pumping(
        &self,
        phone: &PhoneNumber,
        can_call: bool,
        changes: &mut Vec<MeasureChange>,
    ) -> Result<Verdict, Error> {
        let a = &self.settings.abuse;
        let p = &a.pumping;
        if !p.enabled {
            return Ok(Verdict::default());
        }
        let (digits, country) = Self::digits_and_country(phone);
        let scopes = a.traffic_scopes(digits, &country);
        let now = whole_seconds(self.clock.now());
        let window = i64::try_from(p.window.as_secs()).unwrap_or(i64::MAX / 2);
        let (measures, traffic) = match self
            .store
            .pumping_facts(&scopes, abuse::bucket(now.timestamp() - window), now)
            .await
        {
            Ok(f) => f,
            Err(e) => {
                return self
                    .limits_failed(e, "traffic")
                    .map(|()| Verdict::default());
            }
        };
        if let Some(until) = measures
            .iter()
            .filter(|m| m.measure == Measure::Block)
            .map(|m| m.until)
            .max()
        {
            return Err(Error::RateLimited {
                retry_at: until,
                limit: Limit::PrefixBlocked,
            });
        }
        let mut verdict = Verdict::default();
        for (i, (scope, t)) in scopes.iter().zip(&traffic).enumerate() {
            let calling = measures
                .iter()
                .find(|m| &m.scope == scope && m.measure == Measure::Call);
            let step = p.step(t.numbers, t.sources, t.completed);
            verdict.slow |= step >= Step::Slow;
            if step < Step::Call {
                verdict.call |= calling.is_some();
                continue;
            }
            let reason = format!(
                "{} numbers, {} sources, {} messages and {} completed verifications in {window}s",
                t.numbers, t.sources, t.sent, t.completed
            );
            let block_level = i + 1 == scopes.len() && scope.starts_with("prefix:");
            if block_level
                && (!can_call
                    || calling.is_some_and(|m| {
                        now - m.created_at
                            >= chrono::Duration::from_std(p.block_after)
                                .unwrap_or(chrono::Duration::hours(1))
                    }))
            {
                let until = after(now, p.block_for);
                changes.push(MeasureChange {
                    scope: scope.clone(),
                    measure: Measure::Block,
                    until,
                    reason,
                });
                tracing::warn!(
                    scope = %scope,
                    numbers = t.numbers,
                    sources = t.sources,
                    sent = t.sent,
                    completed = t.completed,
                    until = %until.to_rfc3339(),
                    event = "prefix_blocked",
                    "prefix blocked: its completion ratio collapsed (SMS pumping?)"
                );
                return Err(Error::RateLimited {
                    retry_at: until,
                    limit: Limit::PrefixBlocked,
                });
            }
            verdict.call = true;
            // Extended while the traffic stays bad, written again only when half gone.
            if calling.is_none_or(|m| (m.until - now).num_seconds() < window / 2) {
                changes.push(MeasureChange {
                    scope: scope.clone(),
                    measure: Measure::Call,
                    until: after(now, p.window),
                    reason,
                });
                if calling.is_none() {
                    tracing::warn!(
                        scope = %scope,
                        numbers = t.numbers,
                        sources = t.sources,
                        sent = t.sent,
                        completed = t.completed,
                        event = "pumping_missed_calls",
                        "few numbers complete: missed calls replace texts (SMS pumping?)"
                    );
                }
            }
        }
        Ok(verdict)
    }

    /// The daily-cap scopes of `phone` with their caps.
    pub(super) fn caps(&self, phone: &PhoneNumber) -> Vec<(String, u32)> {
        let caps = &self.settings.abuse.caps;
        let country = phone.calling_code().to_string();
        let mut out = Vec::with_capacity(2);
        if let Some(cap) = caps.for_country(&country) {
            out.push((format!("country:{country}"), cap));
        }
        if let Some(cap) = caps.total {
            out.push(("total".to_owned(), cap));
        }
        out
    }

    /// The refusal when daily cap `caps[i]` is reached.
    pub(super) fn cap_reached(&self, caps: &[(String, u32)], i: usize, now: Time) -> Error {
        let tomorrow = from_unix((abuse::day(now.timestamp()) + 1) * 86_400);
        let Some((scope, cap)) = caps.get(i) else {
            return Error::Internal;
        };
        let limit = if scope == "total" {
            Limit::DailyCap
        } else {
            Limit::CountryDailyCap
        };
        tracing::warn!(
            cap = %scope,
            limit = cap,
            event = "daily_cap_reached",
            "daily cap of messages reached"
        );
        Error::RateLimited {
            retry_at: tomorrow,
            limit,
        }
    }

    /// The traffic scopes of `phone` and the ten-minute bucket of `started`, to count a
    /// completed verification in the bucket of its start (so that it meets its messages in the
    /// ratio).
    pub(super) fn completion_counted(
        &self,
        phone: &PhoneNumber,
        started: Time,
    ) -> (Vec<String>, i64) {
        let (digits, country) = Self::digits_and_country(phone);
        (
            self.settings.abuse.traffic_scopes(digits, &country),
            abuse::bucket(started.timestamp()),
        )
    }

    /// Messages per day, provider, calling code and challenge over the last `days` days, with
    /// their cost where prices are configured.
    pub async fn spend_report(&self, days: u32) -> Result<Vec<SpendLine>, Error> {
        let today = abuse::day(self.clock.now().timestamp());
        let since = today - i64::from(days.max(1)) + 1;
        let costs = &self.settings.abuse.costs;
        Ok(self
            .store
            .spend(since)
            .await?
            .into_iter()
            .map(|record| {
                let cost = abuse::price(costs, &record.provider, &record.country)
                    .map(|p| p * record.messages as f64);
                SpendLine { record, cost }
            })
            .collect())
    }

    /// The prefixes blocked now.
    pub async fn blocks(&self) -> Result<Vec<BlockRecord>, Error> {
        Ok(self.store.blocks(self.clock.now()).await?)
    }

    /// Lifts the pumping measures (block or missed calls) of E.164 prefix `prefix` (digits, `+`
    /// optional), and of the calling code if it is one; whether there was one.
    pub async fn unblock(&self, prefix: &str) -> Result<bool, Error> {
        let digits = prefix.trim().trim_start_matches('+');
        let lifted = self.store.remove_block(&format!("prefix:{digits}")).await?
            | self
                .store
                .remove_block(&format!("country:{digits}"))
                .await?;
        if lifted {
            tracing::info!(prefix = digits, "prefix unblocked by the operator");
        }
        Ok(lifted)
    }

    /// Messages reserved today per daily-cap scope (`country:<code>`, `total`).
    pub async fn sent_today(&self) -> Result<Vec<(String, u64)>, Error> {
        Ok(self
            .store
            .daily_sends(abuse::day(self.clock.now().timestamp()))
            .await?)
    }
}
