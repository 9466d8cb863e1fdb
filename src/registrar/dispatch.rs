//! Which provider delivers a challenge, and what happens when it fails.
//!
//! Routes match the number's E.164 digits by prefix (country calling code or longer: `+39`,
//! `+44 7`), never libphonenumber's region guess; the longest matching prefix wins, and a route
//! for the requested challenge beats a route for any challenge at the same length. A route lists
//! providers in order; without a route, every provider in configuration order. Of those, the ones
//! that can deliver the challenge are the candidates.
//!
//! Delivery tries the candidates in order: a transient failure (timeout, outage, rate limit)
//! moves on to the next one, a permanent one (invalid number, blocked destination) ends the
//! attempt, because another provider would refuse it too. Each call has a timeout, and each
//! provider a circuit breaker: after `breaker_failures` transient failures in a row it is skipped
//! for `breaker_open`, then one request probes it (half-open); success closes it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use registrar_providers::{Challenge, Delivery, ErrorKind, Outgoing, Provider, ProviderError};

use crate::clock::Clock;
use crate::phone::PhoneNumber;

/// A routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// E.164 digits the number starts with, without `+` (`39`, `447`).
    pub prefix: String,
    /// The challenge this route is for; every challenge when `None`.
    pub challenge: Option<Challenge>,
    /// Provider names, in order.
    pub providers: Vec<String>,
}

/// Timeouts and breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSettings {
    /// Longest wait for one provider call.
    pub timeout: Duration,
    /// Transient failures in a row that open a provider's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker skips its provider before a probe.
    pub breaker_open: Duration,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<DateTime<Utc>>,
    probing: bool,
}

/// Where a provider's breaker stands (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are skipped.
    Open,
    /// One probe is allowed (or under way).
    HalfOpen,
}

/// Chooses providers and delivers with failover.
pub struct Dispatcher {
    providers: Vec<Arc<dyn Provider>>,
    routes: Vec<Route>,
    settings: DispatchSettings,
    breakers: Mutex<HashMap<String, Breaker>>,
    clock: Arc<dyn Clock>,
}

impl Dispatcher {
    /// A dispatcher over `providers` (configuration order) with `routes`.
    pub fn new(
        providers: Vec<Arc<dyn Provider>>,
        routes: Vec<Route>,
        settings: DispatchSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            providers,
            routes,
            settings,
            breakers: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.iter().find(|p| p.name() == name)
    }

    /// The challenges some provider can deliver, in protocol order.
    pub fn challenges(&self) -> Vec<Challenge> {
        Challenge::ALL
            .into_iter()
            .filter(|c| self.providers.iter().any(|p| p.challenges().contains(c)))
            .collect()
    }

    fn route(&self, phone: &PhoneNumber, challenge: Challenge) -> Option<&Route> {
        let digits = phone.as_str().trim_start_matches('+');
        self.routes
            .iter()
            .filter(|r| digits.starts_with(&r.prefix))
            .filter(|r| r.challenge.is_none_or(|c| c == challenge))
            .max_by_key(|r| (r.prefix.len(), r.challenge.is_some()))
    }

    /// The providers that may deliver `challenge` to `phone`, in the order to try them.
    pub fn candidates(&self, phone: &PhoneNumber, challenge: Challenge) -> Vec<Arc<dyn Provider>> {
        let ordered: Vec<&Arc<dyn Provider>> = match self.route(phone, challenge) {
            Some(route) => route
                .providers
                .iter()
                .filter_map(|n| self.provider(n))
                .collect(),
            None => self.providers.iter().collect(),
        };
        ordered
            .into_iter()
            .filter(|p| p.challenges().contains(&challenge))
            .cloned()
            .collect()
    }

    fn breakers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Breaker>> {
        self.breakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `provider`'s breaker stands now.
    pub fn breaker_state(&self, provider: &str) -> BreakerState {
        let now = self.clock.now();
        match self.breakers().get(provider) {
            Some(Breaker {
                open_until: Some(t),
                ..
            }) if now < *t => BreakerState::Open,
            Some(Breaker {
                open_until: Some(_),
                ..
            }) => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Whether a call to `provider` may go out now; takes the half-open probe slot.
    fn admit(&self, provider: &str) -> bool {
        let now = self.clock.now();
        let mut breakers = self.breakers();
        let b = breakers.entry(provider.to_owned()).or_default();
        match b.open_until {
            Some(t) if now < t => false,
            Some(_) if b.probing => false,
            Some(_) => {
                b.probing = true;
                true
            }
            None => true,
        }
    }

    fn succeeded(&self, provider: &str) {
        self.breakers()
            .insert(provider.to_owned(), Breaker::default());
    }

    fn failed(&self, provider: &str) {
        let now = self.clock.now();
        let open_for = chrono::Duration::from_std(self.settings.breaker_open)
            .unwrap_or(chrono::Duration::seconds(60));
        let mut breakers = self.breakers();
        let b = breakers.entry(provider.to_owned()).or_default();
        if b.probing {
            b.probing = false;
            b.open_until = Some(now + open_for);
            tracing::warn!(provider, "provider probe failed; circuit stays open");
            return;
        }
        b.failures += 1;
        if b.failures >= self.settings.breaker_failures && b.open_until.is_none() {
            b.open_until = Some(now + open_for);
            tracing::warn!(
                provider,
                failures = b.failures,
                open_for = ?self.settings.breaker_open,
                "provider circuit opened"
            );
        }
    }

    /// Delivers `message` through the first of `candidates` that takes it. Returns the provider
    /// that delivered and what it reported, or the error that ended the attempt.
    pub async fn deliver(
        &self,
        candidates: &[Arc<dyn Provider>],
        message: &Outgoing,
    ) -> Result<(Arc<dyn Provider>, Delivery), ProviderError> {
        let mut last = None;
        for provider in candidates {
            let name = provider.name();
            if !self.admit(name) {
                last = Some(ProviderError::new(
                    name,
                    ErrorKind::Transient,
                    "circuit open after repeated failures",
                ));
                continue;
            }
            let result =
                match tokio::time::timeout(self.settings.timeout, provider.send(message)).await {
                    Ok(r) => r,
                    Err(_) => Err(ProviderError::new(
                        name,
                        ErrorKind::Transient,
                        format!("no answer within {:?}", self.settings.timeout),
                    )),
                };
            match result {
                Ok(delivery) => {
                    self.succeeded(name);
                    return Ok((provider.clone(), delivery));
                }
                Err(e) if e.is_transient() => {
                    self.failed(name);
                    tracing::warn!(
                        provider = name,
                        error = %e.message,
                        verification = %message.reference,
                        "transient delivery failure; trying the next provider"
                    );
                    last = Some(e);
                }
                Err(e) => {
                    // The provider answered: it is healthy, the request is not deliverable.
                    self.succeeded(name);
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            ProviderError::new(
                "routing",
                ErrorKind::Unsupported,
                format!("no provider can deliver {}", message.challenge),
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::phone::PhonePolicy;
    use async_trait::async_trait;
    use registrar_providers::CapturingProvider;

    fn phone(n: &str) -> PhoneNumber {
        PhonePolicy {
            accept_fictional: true,
            ..PhonePolicy::default()
        }
        .parse(n)
        .unwrap()
    }

    fn message() -> Outgoing {
        Outgoing {
            to: "+15555215554".into(),
            challenge: Challenge::Pin,
            code: "123456".into(),
            text: "123456".into(),
            reference: "r".into(),
            valid_for: Duration::from_secs(600),
            locale: None,
        }
    }

    fn names(ps: &[Arc<dyn Provider>]) -> Vec<&str> {
        ps.iter().map(|p| p.name()).collect()
    }

    fn setup(routes: Vec<Route>) -> (Dispatcher, [CapturingProvider; 3], ManualClock) {
        let a = CapturingProvider::new("a", "1");
        let b = CapturingProvider::new("b", "2").with_challenges(vec![Challenge::Pin]);
        let c = CapturingProvider::new("c", "3").with_challenges(vec![Challenge::MissedCall]);
        let clock = ManualClock::new(Utc::now());
        let d = Dispatcher::new(
            vec![
                Arc::new(a.clone()),
                Arc::new(b.clone()),
                Arc::new(c.clone()),
            ],
            routes,
            DispatchSettings {
                timeout: Duration::from_millis(200),
                breaker_failures: 2,
                breaker_open: Duration::from_secs(60),
            },
            Arc::new(clock.clone()),
        );
        (d, [a, b, c], clock)
    }

    fn route(prefix: &str, challenge: Option<Challenge>, providers: &[&str]) -> Route {
        Route {
            prefix: prefix.into(),
            challenge,
            providers: providers.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn routes_by_longest_prefix_and_challenge() {
        let (d, _, _) = setup(vec![
            route("1", None, &["b", "a"]),
            route("1555", None, &["a"]),
            route("1", Some(Challenge::MissedCall), &["c", "a"]),
            route("44", None, &["nonexistent", "b"]),
        ]);
        let us = phone("+15555215554");
        assert_eq!(names(&d.candidates(&us, Challenge::Pin)), ["a"]);
        let us_other = phone("+12025550123");
        assert_eq!(names(&d.candidates(&us_other, Challenge::Pin)), ["b", "a"]);
        assert_eq!(
            names(&d.candidates(&us_other, Challenge::MissedCall)),
            ["c", "a"]
        );
        // +1555 (longer prefix) beats the missed-call route for +1.
        assert_eq!(names(&d.candidates(&us, Challenge::MissedCall)), ["a"]);
        assert_eq!(
            names(&d.candidates(&phone("+447911123456"), Challenge::Pin)),
            ["b"]
        );
        // No route: every capable provider in configuration order.
        assert_eq!(
            names(&d.candidates(&phone("+393471234567"), Challenge::Pin)),
            ["a", "b"]
        );
        assert_eq!(
            names(&d.candidates(&phone("+393471234567"), Challenge::Voice)),
            ["a"]
        );
        assert_eq!(d.challenges(), Challenge::ALL.to_vec());
    }

    #[tokio::test]
    async fn a_transient_failure_moves_on_a_permanent_one_stops() {
        let (d, [a, b, _], _) = setup(vec![]);
        let all = d.candidates(&phone("+15555215554"), Challenge::Pin);
        a.fail_next(ProviderError::new("a", ErrorKind::Transient, "down"));
        let (p, _) = d.deliver(&all, &message()).await.unwrap();
        assert_eq!(p.name(), "b");
        assert_eq!((a.sent().len(), b.sent().len()), (0, 1));

        a.fail_next(ProviderError::new("a", ErrorKind::InvalidNumber, "no"));
        let e = d.deliver(&all, &message()).await.err().unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidNumber);
        assert_eq!(
            b.sent().len(),
            1,
            "a permanent error is not retried elsewhere"
        );

        a.fail_next(ProviderError::new("a", ErrorKind::Transient, "down"));
        b.fail_next(ProviderError::new("b", ErrorKind::Transient, "down too"));
        let e = d.deliver(&all, &message()).await.err().unwrap();
        assert!(e.is_transient() && e.provider == "b", "{e:?}");
        assert!(d.deliver(&[], &message()).await.err().unwrap().kind == ErrorKind::Unsupported);
    }

    struct Slow;

    #[async_trait]
    impl Provider for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        async fn send(&self, _: &Outgoing) -> Result<Delivery, ProviderError> {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Err(ProviderError::new(
                "slow",
                ErrorKind::Permanent,
                "unreachable",
            ))
        }
    }

    #[tokio::test]
    async fn a_provider_that_hangs_times_out_and_the_next_delivers() {
        let (d, [a, ..], _) = setup(vec![]);
        let slow: Arc<dyn Provider> = Arc::new(Slow);
        let a_dyn: Arc<dyn Provider> = Arc::new(a.clone());
        let started = std::time::Instant::now();
        let (p, _) = d.deliver(&[slow, a_dyn], &message()).await.unwrap();
        assert_eq!(p.name(), "a");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn the_breaker_opens_skips_probes_and_closes() {
        let (d, [a, b, _], clock) = setup(vec![]);
        let all = d.candidates(&phone("+15555215554"), Challenge::Pin);
        for _ in 0..2 {
            a.fail_next(ProviderError::new("a", ErrorKind::Transient, "down"));
            d.deliver(&all, &message()).await.unwrap();
        }
        assert_eq!(d.breaker_state("a"), BreakerState::Open);
        // While open, "a" is not even called.
        a.fail_next(ProviderError::new("a", ErrorKind::Transient, "would fail"));
        let (p, _) = d.deliver(&all, &message()).await.unwrap();
        assert_eq!(p.name(), "b");
        assert_eq!(b.sent().len(), 3);
        // After the open period one probe goes out; it fails: open again.
        clock.advance(Duration::from_secs(61));
        assert_eq!(d.breaker_state("a"), BreakerState::HalfOpen);
        let (p, _) = d.deliver(&all, &message()).await.unwrap();
        assert_eq!(p.name(), "b", "the failed probe fell through to b");
        assert_eq!(d.breaker_state("a"), BreakerState::Open);
        // Next probe succeeds: closed.
        clock.advance(Duration::from_secs(61));
        let (p, _) = d.deliver(&all, &message()).await.unwrap();
        assert_eq!(p.name(), "a");
        assert_eq!(d.breaker_state("a"), BreakerState::Closed);
        assert_eq!(a.sent().len(), 1);
    }
}
