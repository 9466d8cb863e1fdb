//! The core's flows against the in-memory ports: what each step decides and what it leaves in the
//! store, without a database or a transport.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use registrar_providers::{CapturingProvider, ErrorKind, Provider, ProviderError};

use super::abuse::{self, Scope};
use super::ports::memory::MemoryStore;
use super::ports::{Accounts as _, Limits as _, Verifications as _};
use super::*;
use crate::clock::ManualClock;
use crate::openpgp::{self, UserKey};

const NUMBER: &str = "+393471234567";

struct Fixture {
    registrar: Registrar,
    store: Arc<MemoryStore>,
    provider: CapturingProvider,
    clock: ManualClock,
}

fn fixture(adjust: impl FnOnce(&mut Settings)) -> Fixture {
    let mut settings = Settings::default();
    adjust(&mut settings);
    let store = Arc::new(MemoryStore::new());
    let provider = CapturingProvider::new("capture", "+15550001111");
    let clock = ManualClock::new(from_unix(1_800_000_000));
    let dispatcher = Dispatcher::new(
        vec![Arc::new(provider.clone()) as Arc<dyn Provider>],
        Vec::new(),
        DispatchSettings::default(),
        Arc::new(clock.clone()),
    );
    let registrar = Registrar::new(
        settings,
        store.clone(),
        dispatcher,
        Arc::new(ServerKey::generate("localhost").unwrap()),
        ServerSecret::generate(),
        Arc::new(clock.clone()),
    );
    Fixture {
        registrar,
        store,
        provider,
        clock,
    }
}

fn phone(number: &str) -> PhoneNumber {
    PhonePolicy::default().parse(number).unwrap()
}

fn origin() -> Origin {
    Origin::ip("192.0.2.1".parse().unwrap())
}

fn start_request(number: &str) -> StartRequest {
    StartRequest {
        phone: phone(number),
        force: false,
        challenge: None,
        accepted_terms: true,
        fallback: false,
        locale: None,
        origin: origin(),
    }
}

fn key_for(number: &str) -> UserKey {
    let jid = phone(number).account().jid("localhost");
    let cert = openpgp::generate_user_key("Test", &jid, false).unwrap();
    let b64 =
        base64::engine::general_purpose::STANDARD.encode(openpgp::public_bytes(&cert).unwrap());
    UserKey::parse(&b64).unwrap()
}

fn assert_limited(e: &Error, expected: Limit) {
    assert!(
        matches!(e, Error::RateLimited { limit, .. } if *limit == expected),
        "{e:?}"
    );
}

impl Fixture {
    async fn has_verification(&self, number: &str) -> bool {
        self.store
            .verification_by_account(&phone(number).account())
            .await
            .unwrap()
            .is_some()
    }

    fn code(&self, number: &str) -> Code {
        self.provider.last_code(number).unwrap().parse().unwrap()
    }

    fn day(&self) -> i64 {
        abuse::day(self.clock.now().timestamp())
    }

    /// The tat of the start limit of `scope` for this test's client and number.
    fn start_rate(&self, scope: Scope) -> Option<i64> {
        let (buckets, scopes) =
            self.registrar
                .rate_buckets(abuse::Action::Start, &phone(NUMBER), &origin(), &[scope]);
        assert_eq!(scopes, [scope]);
        self.store.rate(&buckets[0].key)
    }
}

#[tokio::test]
async fn a_start_and_its_code_register_the_number() {
    let f = fixture(|_| {});
    let v = f.registrar.start(start_request(NUMBER)).await.unwrap();
    assert_eq!(v.state, State::Pending);
    assert_eq!((v.challenge, v.code_length), (Challenge::Pin, 6));
    assert_eq!(f.provider.sent().len(), 1);
    // The start's one write reserved the message; the delivery's counted it.
    assert_eq!(f.store.reserved("country:39", f.day()), 1);
    assert_eq!(f.store.reserved("total", f.day()), 1);
    let bucket = abuse::bucket(f.clock.now().timestamp());
    assert_eq!(f.store.traffic_in("country:39", bucket).sent, 1);
    assert_eq!(f.store.spend(0).await.unwrap()[0].messages, 1);

    let key = key_for(NUMBER);
    let done = f
        .registrar
        .verify(&v.id, &f.code(NUMBER), key.clone(), &origin())
        .await
        .unwrap();
    assert_eq!(done.fingerprint, key.fingerprint());
    let account = f.store.account(&v.account).await.unwrap().unwrap();
    assert_eq!(account.public_key, done.public_key);
    assert_eq!(f.store.traffic_in("country:39", bucket).completed, 1);
    let stored = f.store.verification(&v.id).await.unwrap().unwrap();
    assert_eq!(stored.attempts, 1);
    // The same submission again gets the same answer; a fresh start now is a conflict.
    let again = f
        .registrar
        .verify(&v.id, &f.code(NUMBER), key, &origin())
        .await
        .unwrap();
    assert_eq!(again, done);
    let e = f.registrar.start(start_request(NUMBER)).await.unwrap_err();
    assert!(matches!(e, Error::Conflict), "{e:?}");
}

#[tokio::test]
async fn refusals_are_charged_and_write_nothing_else() {
    let f = fixture(|_| {});
    f.registrar.start(start_request(NUMBER)).await.unwrap();
    let before = f.start_rate(Scope::Ip).unwrap();
    f.clock.advance(Duration::from_secs(31));
    // Inside the resend wait: refused, but the request paid for asking.
    let e = f.registrar.start(start_request(NUMBER)).await.unwrap_err();
    assert_limited(&e, Limit::ResendWait);
    assert!(f.start_rate(Scope::Ip).unwrap() > before);
    assert_eq!(f.provider.sent().len(), 1);
    assert_eq!(f.store.reserved("total", f.day()), 1);
}

#[tokio::test]
async fn a_rate_limited_start_takes_nothing_from_any_budget() {
    let f = fixture(|s| s.abuse.start.ip = Some(abuse::Rate::new(1, Duration::from_secs(3600))));
    f.registrar.start(start_request(NUMBER)).await.unwrap();
    let number = f.start_rate(Scope::Number);
    let other = "+393471234568";
    let e = f.registrar.start(start_request(other)).await.unwrap_err();
    assert_limited(&e, Limit::Rate(Scope::Ip));
    assert_eq!(f.start_rate(Scope::Number), number);
    assert!(!f.has_verification(other).await);
    assert_eq!(f.store.reserved("total", f.day()), 1);
}

#[tokio::test]
async fn a_failed_delivery_leaves_nothing_behind() {
    let f = fixture(|_| {});
    f.provider.fail_next(ProviderError {
        provider: "capture".into(),
        kind: ErrorKind::Transient,
        message: "down".into(),
    });
    let e = f.registrar.start(start_request(NUMBER)).await.unwrap_err();
    assert!(matches!(e, Error::DeliveryFailed), "{e:?}");
    assert!(!f.has_verification(NUMBER).await);
    assert_eq!(f.store.reserved("total", f.day()), 0);
    assert_eq!(f.store.reserved("country:39", f.day()), 0);
    // The client may start again at once.
    f.registrar.start(start_request(NUMBER)).await.unwrap();
    assert_eq!(f.store.reserved("total", f.day()), 1);
}

#[tokio::test]
async fn a_reached_cap_refuses_the_message_and_keeps_the_charge() {
    let f = fixture(|s| s.abuse.caps.total = Some(1));
    f.registrar.start(start_request(NUMBER)).await.unwrap();
    let other = "+393471234568";
    let e = f.registrar.start(start_request(other)).await.unwrap_err();
    assert_limited(&e, Limit::DailyCap);
    assert_eq!(f.provider.sent().len(), 1);
    assert!(!f.has_verification(other).await);
    assert_eq!(f.store.reserved("total", f.day()), 1);
}

#[tokio::test]
async fn a_resend_replaces_the_code_and_wrong_codes_lock() {
    let f = fixture(|_| {});
    let v = f.registrar.start(start_request(NUMBER)).await.unwrap();
    let first = f.code(NUMBER);
    let e = f
        .registrar
        .resend(&v.id, None, false, &origin())
        .await
        .unwrap_err();
    assert_limited(&e, Limit::ResendWait);
    f.clock.advance(Duration::from_secs(60));
    let r = f
        .registrar
        .resend(&v.id, None, false, &origin())
        .await
        .unwrap();
    // The next wait doubles.
    assert_eq!((r.next_resend_at - f.clock.now()).num_seconds(), 120);
    assert_eq!(f.provider.sent().len(), 2);
    assert_eq!(f.store.reserved("total", f.day()), 2);
    let second = f.code(NUMBER);
    let key = key_for(NUMBER);
    if first != second {
        let e = f
            .registrar
            .verify(&v.id, &first, key.clone(), &origin())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::WrongCode { attempts_left: 4 }), "{e:?}");
    }
    let wrong: Code = if second.as_str() == "000000" {
        "111111"
    } else {
        "000000"
    }
    .parse()
    .unwrap();
    while let Err(Error::WrongCode { .. }) = f
        .registrar
        .verify(&v.id, &wrong, key.clone(), &origin())
        .await
    {}
    let stored = f.store.verification(&v.id).await.unwrap().unwrap();
    assert_eq!(stored.attempts, 5);
    let e = f
        .registrar
        .verify(&v.id, &second, key, &origin())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e:?}");
    assert!(f.store.account(&v.account).await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_submissions_of_the_right_code_all_succeed_once() {
    let f = fixture(|_| {});
    let v = f.registrar.start(start_request(NUMBER)).await.unwrap();
    let (code, key, from) = (f.code(NUMBER), key_for(NUMBER), origin());
    let answers = futures::future::join_all(
        (0..8).map(|_| f.registrar.verify(&v.id, &code, key.clone(), &from)),
    )
    .await;
    let first = answers[0].as_ref().unwrap();
    assert!(
        answers.iter().all(|a| a.as_ref().is_ok_and(|r| r == first)),
        "{answers:?}"
    );
    let stored = f.store.verification(&v.id).await.unwrap().unwrap();
    assert_eq!(
        stored.attempts, 1,
        "only the completing submission spends a try"
    );
}
