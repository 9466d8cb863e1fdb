//! The XMPP handler over the real core (SQLite, capturing provider, manual clock): literal iqs in,
//! iqs out, as the component sees them.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kontalk_registrar::clock::{Clock, ManualClock};
use kontalk_registrar::config::Config;
use kontalk_registrar::xmpp::Handler;
use kontalk_registrar::xmpp::xmpp_parsers::iq::Iq;
use kontalk_registrar::xmpp::xmpp_parsers::jid::Jid;
use kontalk_registrar::xmpp::xmpp_parsers::minidom::Element;
use kontalk_registrar::{App, Services, openpgp};
use registrar_providers::{CapturingProvider, Provider};

use crate::harness::*;

struct Xmpp {
    handler: Handler,
    registrar: Arc<kontalk_registrar::registrar::Registrar>,
    provider: CapturingProvider,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

async fn setup(tweak: impl FnOnce(&mut Config)) -> Xmpp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::development(dir.path()).unwrap();
    if let Some(url) = crate::harness::postgres_database().await {
        config.database_url = url.into();
    }
    tweak(&mut config);
    let provider = CapturingProvider::new("capture", "12345");
    let clock = ManualClock::new(chrono::Utc::now());
    let app = App::build(
        config,
        Services {
            clock: Some(Arc::new(clock.clone()) as Arc<dyn Clock>),
            providers: Some(vec![Arc::new(provider.clone()) as Arc<dyn Provider>]),
        },
    )
    .await
    .unwrap();
    let handler = Handler::new(
        app.registrar.clone(),
        app.clock.clone(),
        Jid::new("register.localhost").unwrap(),
    );
    Xmpp {
        handler,
        registrar: app.registrar.clone(),
        provider,
        clock,
        _dir: dir,
    }
}

/// What came back: ("result", xml) or ("error", "<type>/<condition>", text, xml).
#[derive(Debug)]
struct Out {
    kind: &'static str,
    condition: String,
    text: String,
    xml: String,
}

impl Xmpp {
    async fn send(&self, from: &str, type_: &str, payload: &str) -> Option<Out> {
        let xml = format!(
            "<iq xmlns='jabber:component:accept' from='{from}' to='register.localhost' \
             id='q1' type='{type_}'>{payload}</iq>"
        );
        let iq = Iq::try_from(Element::from_str(&xml).unwrap()).unwrap();
        let answer = self.handler.handle(iq).await?;
        assert_eq!(answer.id(), "q1");
        assert_eq!(answer.to().unwrap().to_string(), from);
        assert_eq!(answer.from().unwrap().to_string(), "register.localhost");
        let xml = String::from(&Element::from(answer.clone()));
        Some(match answer {
            Iq::Error { error, .. } => Out {
                kind: "error",
                condition: format!(
                    "{}/{}",
                    format!("{:?}", error.type_).to_lowercase(),
                    Element::from(error.defined_condition.clone()).name()
                ),
                text: error.texts.get("en").cloned().unwrap_or_default(),
                xml,
            },
            _ => Out {
                kind: "result",
                condition: String::new(),
                text: String::new(),
                xml,
            },
        })
    }

    async fn step1(&self, from: &str, phone: &str, extra: &str) -> Out {
        let q = format!(
            "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>jabber:iq:register</value></field>\
             <field var='phone'><value>{phone}</value></field>{extra}</x></query>"
        );
        self.send(from, "set", &q).await.unwrap()
    }

    async fn step2(&self, from: &str, code: &str, key: &[u8]) -> Out {
        let q = format!(
            "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>http://kontalk.org/protocol/register#code</value></field>\
             <field var='code'><value>{code}</value></field>\
             <field var='publickey'><value>{}</value></field></x></query>",
            b64(key)
        );
        self.send(from, "set", &q).await.unwrap()
    }
}

fn field_value(xml: &str, var: &str) -> Option<String> {
    let marker = format!("var='{var}'><value>");
    let start = xml.find(&marker)? + marker.len();
    Some(xml[start..start + xml[start..].find("</value>")?].to_owned())
}

fn jid() -> String {
    format!("{EMULATOR_ACCOUNT}@localhost")
}

#[tokio::test]
async fn disco_and_the_registration_form() {
    let x = setup(|_| {}).await;
    let out = x
        .send(
            "anon@localhost/r",
            "get",
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        )
        .await
        .unwrap();
    assert_eq!(out.kind, "result");
    assert!(
        out.xml.contains("<identity category='component'"),
        "{}",
        out.xml
    );
    assert!(
        out.xml.contains("<feature var='jabber:iq:register'/>"),
        "{}",
        out.xml
    );
    let out = x
        .send(
            "anon@localhost/r",
            "get",
            "<query xmlns='http://jabber.org/protocol/disco#info' node='x'/>",
        )
        .await
        .unwrap();
    assert_eq!(out.condition, "cancel/item-not-found");

    let out = x
        .send(
            "anon@localhost/r",
            "get",
            "<query xmlns='jabber:iq:register'/>",
        )
        .await
        .unwrap();
    assert_eq!(out.kind, "result");
    assert!(out.xml.contains("<instructions>"), "{}", out.xml);
    for var in ["FORM_TYPE", "phone", "force", "fallback", "challenge"] {
        assert!(
            out.xml.contains(&format!("var='{var}'")),
            "{var}: {}",
            out.xml
        );
    }
    for c in ["pin", "voice", "missedcall"] {
        assert!(
            out.xml.contains(&format!("<value>{c}</value></option>")),
            "{c}"
        );
    }
    assert!(!out.xml.contains("callerid") && !out.xml.contains("accept-terms"));

    let ping = x
        .send("anon@localhost/r", "get", "<ping xmlns='urn:xmpp:ping'/>")
        .await
        .unwrap();
    assert_eq!(ping.kind, "result");
}

#[tokio::test]
async fn terms_appear_in_the_form_and_must_be_accepted() {
    let x = setup(|c| c.settings.terms_url = Some("https://example.org/terms".into())).await;
    let out = x
        .send(
            "a@localhost/r",
            "get",
            "<query xmlns='jabber:iq:register'/>",
        )
        .await
        .unwrap();
    assert!(out.xml.contains("var='accept-terms'"));
    assert!(out.xml.contains("<value>https://example.org/terms</value>"));
    let out = x.step1("a@localhost/r", EMULATOR, "").await;
    assert_eq!(out.condition, "modify/not-allowed");
    let out = x
        .step1(
            "a@localhost/r",
            EMULATOR,
            "<field var='accept-terms'><value>1</value></field>",
        )
        .await;
    assert_eq!(out.kind, "result", "{out:?}");
}

#[tokio::test]
async fn the_whole_kontalk_flow_with_conflict_and_force() {
    let x = setup(|_| {}).await;
    let out = x.step1("anon1@localhost/r", "+1 555 521 5554", "").await;
    assert_eq!(out.kind, "result", "{out:?}");
    assert_eq!(field_value(&out.xml, "from").as_deref(), Some("12345"));
    assert_eq!(field_value(&out.xml, "challenge").as_deref(), Some("pin"));
    assert!(out.xml.contains("<instructions>"));
    // Step 2 comes on a new connection: another anonymous JID.
    let key = user_key(&jid());
    let code = x.provider.last_code(EMULATOR).unwrap();
    let out = x.step2("anon2@localhost/r", &code, &public(&key)).await;
    assert_eq!(out.kind, "result", "{out:?}");
    assert!(
        out.xml
            .contains("<value>http://kontalk.org/protocol/register#code</value>")
    );
    let certified =
        openpgp::parse_cert(&unb64(&field_value(&out.xml, "publickey").unwrap())).unwrap();
    assert_eq!(certified.fingerprint(), key.fingerprint());
    assert!(certified.userids().any(|u| u.certifications().count() == 1));

    let out = x.step1("anon3@localhost/r", EMULATOR, "").await;
    assert_eq!(
        (out.condition.as_str(), out.text.as_str()),
        (
            "modify/conflict",
            "Another user is registered with the same id."
        )
    );
    let out = x
        .step1(
            "anon3@localhost/r",
            EMULATOR,
            "<field var='force' type='boolean'><value>true</value></field>",
        )
        .await;
    assert_eq!(out.kind, "result", "{out:?}");
    let new_key = user_key(&jid());
    let code = x.provider.last_code(EMULATOR).unwrap();
    let out = x.step2("anon4@localhost/r", &code, &public(&new_key)).await;
    assert_eq!(out.kind, "result", "{out:?}");
}

#[tokio::test]
async fn an_attackers_wrong_guesses_do_not_stop_the_real_client() {
    let x = setup(|_| {}).await;
    assert_eq!(
        x.step1("victim@localhost/r", EMULATOR, "").await.kind,
        "result"
    );
    let code = x.provider.last_code(EMULATOR).unwrap();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    // Anyone can make a key naming the victim's account.
    let attacker_key = public(&user_key(&jid()));
    for left in (0..5).rev() {
        let out = x.step2("attacker@localhost/r", wrong, &attacker_key).await;
        assert_eq!(out.condition, "modify/bad-request");
        assert_eq!(out.text, format!("wrong code; {left} attempts left"));
    }
    let out = x
        .step2("attacker@localhost/other-resource", &code, &attacker_key)
        .await;
    assert_eq!(
        out.condition, "wait/service-unavailable",
        "the attacker's own budget is spent, even with the right code"
    );
    assert!(
        out.xml.contains("urn:kontalk-registrar:retry"),
        "{}",
        out.xml
    );
    // The real client, the holder (the JID that started it, on another connection), registers.
    let real = user_key(&jid());
    let out = x.step2("victim@localhost/new", &code, &public(&real)).await;
    assert_eq!(out.kind, "result", "{out:?}");
}

#[tokio::test]
async fn attackers_rotating_jids_share_the_others_budget_and_the_holder_goes_on() {
    let x = setup(|_| {}).await;
    x.step1("victim@localhost/r", EMULATOR, "").await;
    let code = x.provider.last_code(EMULATOR).unwrap();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let key = public(&user_key(&jid()));
    // Ten JIDs, one guess each: the others' ten tries together.
    for i in 0..10 {
        let out = x
            .step2(&format!("attacker{i}@localhost/r"), wrong, &key)
            .await;
        assert_eq!(out.condition, "modify/bad-request", "{i}");
    }
    let out = x.step2("fresh@localhost/r", &code, &key).await;
    assert_eq!(
        out.condition, "wait/service-unavailable",
        "closed to everyone but the holder"
    );
    assert!(
        out.text.contains("try again") || out.text.contains("start again"),
        "{}",
        out.text
    );
    // The holder's own five tries are untouched: four wrong ones, then the right code.
    for left in (1..5).rev() {
        let out = x.step2("victim@localhost/r2", wrong, &key).await;
        assert_eq!(out.text, format!("wrong code; {left} attempts left"));
    }
    let out = x.step2("victim@localhost/r2", &code, &key).await;
    assert_eq!(out.kind, "result", "{out:?}");
}

#[tokio::test]
async fn errors_follow_the_table() {
    let x = setup(|_| {}).await;
    let from = "a@localhost/r";
    // Bad numbers, codes and keys: bad-request.
    assert_eq!(
        x.step1(from, "garbage", "").await.condition,
        "modify/bad-request"
    );
    assert_eq!(
        x.step1(from, "+999 1", "").await.condition,
        "modify/bad-request"
    );
    // Nothing pending for the key's account: item-not-found.
    let key = public(&user_key(&jid()));
    assert_eq!(
        x.step2(from, "123456", &key).await.condition,
        "cancel/item-not-found"
    );
    x.step1(from, EMULATOR, "").await;
    assert_eq!(
        x.step2(from, "12a456", &key).await.condition,
        "modify/bad-request"
    );
    let out = x.step2(from, "123456", b"not a key").await;
    assert_eq!(out.condition, "modify/bad-request");
    assert!(out.text.contains("OpenPGP"), "{}", out.text);
    let other = public(&user_key(
        "0000000000000000000000000000000000000000@localhost",
    ));
    assert_eq!(
        x.step2(from, "123456", &other).await.condition,
        "cancel/item-not-found"
    );
    // Step 2 without a key in the form.
    let no_key = "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
        <field var='FORM_TYPE' type='hidden'><value>http://kontalk.org/protocol/register#code</value></field>\
        <field var='code'><value>123456</value></field></x></query>";
    let out = x.send(from, "set", no_key).await.unwrap();
    assert_eq!(out.condition, "modify/bad-request");
    assert!(out.text.contains("publickey"));
    // The same JID repeating its start at once gets the verification again, not a new message.
    let sent = x.provider.sent().len();
    let out = x.step1(from, EMULATOR, "").await;
    assert_eq!(out.condition, "", "{}", out.xml);
    assert_eq!(x.provider.sent().len(), sent);
    // Another JID inside the wait: service-unavailable of type wait, with the time.
    let out = x.step1("b@localhost/r", EMULATOR, "").await;
    assert_eq!(out.condition, "wait/service-unavailable");
    assert!(out.text.contains("try again after"), "{}", out.text);
    assert!(out.xml.contains("seconds='60'"), "{}", out.xml);
    assert!(out.xml.contains("limit='resend-wait'"), "{}", out.xml);
    // Removal from an anonymous JID is forbidden; other payloads are unsupported.
    let out = x
        .send(
            from,
            "set",
            "<query xmlns='jabber:iq:register'><remove/></query>",
        )
        .await
        .unwrap();
    assert_eq!(out.condition, "auth/forbidden");
    let out = x
        .send(from, "get", "<query xmlns='jabber:iq:version'/>")
        .await
        .unwrap();
    assert_eq!(out.condition, "cancel/service-unavailable");
    let out = x
        .send(from, "set", "<query xmlns='jabber:iq:roster'/>")
        .await
        .unwrap();
    assert_eq!(out.condition, "cancel/service-unavailable");
    // Results and errors addressed to us get no answer.
    let xml = "<iq xmlns='jabber:component:accept' from='a@localhost/r' to='register.localhost' id='r1' type='result'/>";
    let iq = Iq::try_from(Element::from_str(xml).unwrap()).unwrap();
    assert!(x.handler.handle(iq).await.is_none());
}

#[tokio::test]
async fn registration_closed_is_not_allowed() {
    let x = setup(|c| c.settings.open = false).await;
    let out = x.step1("a@localhost/r", EMULATOR, "").await;
    assert_eq!(out.condition, "cancel/not-allowed");
}

#[tokio::test]
async fn arbitrary_values_in_the_forms_get_protocol_answers() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    let x = setup(|_| {}).await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let text = "[\\PC]{0,40}";
    let documented = [
        "",
        "modify/bad-request",
        "modify/conflict",
        "cancel/item-not-found",
        "wait/service-unavailable",
        "modify/not-acceptable",
        "cancel/not-allowed",
    ];
    for i in 0..150 {
        let (a, b) = (text, text).new_tree(&mut runner).unwrap().current();
        let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;");
        let out = if i % 2 == 0 {
            x.step1(
                &format!("fuzz{i}@localhost/r"),
                &escape(&a),
                &format!(
                    "<field var='challenge'><value>{}</value></field>",
                    escape(&b)
                ),
            )
            .await
        } else {
            x.step2(&format!("fuzz{i}@localhost/r"), &escape(&a), b.as_bytes())
                .await
        };
        assert!(
            documented.contains(&out.condition.as_str()),
            "{a:?} {b:?}: {out:?}"
        );
    }
}

#[tokio::test]
async fn the_limits_apply_over_xmpp_too() {
    use kontalk_registrar::registrar::abuse::Limits;
    let x = setup(|c| {
        let a = &mut c.settings.abuse;
        a.start = Limits {
            number: Some("2/1d".parse().unwrap()),
            ..Limits::default()
        };
        a.check = Limits {
            number: Some("3/1d".parse().unwrap()),
            ..Limits::default()
        };
        a.repeat_window = Duration::ZERO;
    })
    .await;
    // Two starts for one number from two JIDs (the second after the resend wait), then the
    // number's limit, whoever asks: the component never sees addresses.
    assert_eq!(x.step1("a@localhost/r", EMULATOR, "").await.condition, "");
    x.clock.advance(Duration::from_secs(61));
    assert_eq!(x.step1("b@localhost/r", EMULATOR, "").await.condition, "");
    x.clock.advance(Duration::from_secs(121));
    let out = x.step1("c@localhost/r", EMULATOR, "").await;
    assert_eq!(out.condition, "wait/service-unavailable", "{}", out.xml);
    assert!(out.xml.contains("limit='number'"), "{}", out.xml);
    assert!(
        out.text.contains("too many requests for this number"),
        "{}",
        out.text
    );
    assert_eq!(x.provider.sent().len(), 2);
    // Code tries per number, across JIDs: rotating JIDs does not buy more guesses.
    let key = public(&user_key(&format!("{EMULATOR_ACCOUNT}@localhost")));
    for jid in ["d@localhost/r", "e@localhost/r", "f@localhost/r"] {
        let out = x.step2(jid, "000000", &key).await;
        assert_eq!(out.condition, "modify/bad-request", "{}", out.xml);
    }
    let right = x.provider.last_code(EMULATOR).unwrap();
    let out = x.step2("g@localhost/r", &right, &key).await;
    assert_eq!(out.condition, "wait/service-unavailable", "{}", out.xml);
    assert!(out.xml.contains("limit='number'"), "{}", out.xml);
}

const REMOVE: &str = "<query xmlns='jabber:iq:register'><remove/></query>";

impl Xmpp {
    /// Registers the emulator's number with a fresh key; returns the key (with its secrets).
    async fn register(&self) -> sequoia_openpgp::Cert {
        assert_eq!(
            self.step1("anon@localhost/r", EMULATOR, "").await.kind,
            "result"
        );
        let key = user_key(&jid());
        let code = self.provider.last_code(EMULATOR).unwrap();
        let out = self.step2("anon2@localhost/r", &code, &public(&key)).await;
        assert_eq!(out.kind, "result", "{out:?}");
        key
    }

    async fn rollover(&self, from: &str, key_b64: &str, revoked_b64: Option<&str>) -> Out {
        let revoked = revoked_b64
            .map(|r| format!("<field var='revoked'><value>{r}</value></field>"))
            .unwrap_or_default();
        let q = format!(
            "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>http://kontalk.org/protocol/register#key</value></field>\
             <field var='publickey'><value>{key_b64}</value></field>{revoked}</x></query>"
        );
        self.send(from, "set", &q).await.unwrap()
    }

    async fn stored_fingerprint(&self) -> Option<String> {
        self.registrar
            .account(&EMULATOR_ACCOUNT.parse().unwrap())
            .await
            .unwrap()
            .map(|a| a.fingerprint)
    }
}

/// A key for the account created a minute after `old` (creation times have 1-second resolution),
/// optionally certified by `old` on the account's User ID.
fn newer_key(old: &sequoia_openpgp::Cert, certified: bool) -> sequoia_openpgp::Cert {
    use sequoia_openpgp::cert::{CertBuilder, CipherSuite};
    let created = old.primary_key().key().creation_time() + Duration::from_secs(60);
    let (new, _) = CertBuilder::general_purpose(Some(format!("Test User <{}>", jid())))
        .set_cipher_suite(CipherSuite::Cv25519)
        .set_creation_time(created)
        .generate()
        .unwrap();
    if certified {
        openpgp::cross_certify(old, &new, &jid(), created).unwrap()
    } else {
        new
    }
}

fn fingerprint(cert: &sequoia_openpgp::Cert) -> String {
    cert.fingerprint().to_hex()
}

#[tokio::test]
async fn key_rollover_from_the_accounts_own_jid() {
    let x = setup(|_| {}).await;
    let old = x.register().await;
    x.clock.advance(Duration::from_secs(120));
    let new = newer_key(&old, true);
    let out = x
        .rollover(&format!("{}/phone", jid()), &b64(&public(&new)), None)
        .await;
    assert_eq!(out.kind, "result", "{out:?}");
    assert!(
        out.xml
            .contains("<value>http://kontalk.org/protocol/register#key</value>"),
        "{}",
        out.xml
    );
    let certified =
        openpgp::parse_cert(&unb64(&field_value(&out.xml, "publickey").unwrap())).unwrap();
    assert_eq!(certified.fingerprint(), new.fingerprint());
    assert!(openpgp::has_certification(
        &certified,
        x.registrar.server_key().public_cert(),
        &jid()
    ));
    assert_eq!(x.stored_fingerprint().await, Some(fingerprint(&new)));

    // Again, with the revoked old key sent along (as Kontalk clients may).
    x.clock.advance(Duration::from_secs(120));
    let newer = newer_key(&new, true);
    let revoked = openpgp::revoke_superseded(&new).unwrap();
    let out = x
        .rollover(
            &format!("{}/other", jid()),
            &b64(&public(&newer)),
            Some(&b64(&public(&revoked))),
        )
        .await;
    assert_eq!(out.kind, "result", "{out:?}");
    assert_eq!(x.stored_fingerprint().await, Some(fingerprint(&newer)));
}

#[tokio::test]
async fn key_rollover_refusals() {
    let x = setup(|_| {}).await;
    let old = x.register().await;
    let before = x.stored_fingerprint().await;
    assert_eq!(before, Some(fingerprint(&old)));
    x.clock.advance(Duration::from_secs(120));
    let new = b64(&public(&newer_key(&old, true)));
    // Only the account's own JID: not an anonymous one, not the account's name on another
    // domain, not a JID without a local part.
    for from in [
        "anon@localhost/r".to_owned(),
        format!("{EMULATOR_ACCOUNT}@elsewhere.example/r"),
        "localhost".to_owned(),
        "0000@localhost/r".to_owned(),
    ] {
        let out = x.rollover(&from, &new, None).await;
        assert_eq!(out.condition, "auth/forbidden", "{from}: {out:?}");
        assert_eq!(x.stored_fingerprint().await, before, "{from}");
    }
    let me = format!("{}/phone", jid());
    // A newer key the old key did not certify.
    let out = x
        .rollover(&me, &b64(&public(&newer_key(&old, false))), None)
        .await;
    assert_eq!(out.condition, "modify/bad-request", "{out:?}");
    assert!(out.text.contains("certification"), "{}", out.text);
    // Not base64, not a key.
    let out = x.rollover(&me, "%%% not base64 %%%", None).await;
    assert_eq!(out.condition, "modify/bad-request", "{out:?}");
    let out = x.rollover(&me, &b64(b"not a key"), None).await;
    assert_eq!(out.condition, "modify/bad-request", "{out:?}");
    // A malformed revoked key.
    let out = x.rollover(&me, &new, Some("%%%")).await;
    assert_eq!(out.condition, "modify/bad-request", "{out:?}");
    assert_eq!(x.stored_fingerprint().await, before);
    // A "revoked" key that is not revoked.
    let out = x.rollover(&me, &new, Some(&b64(&public(&old)))).await;
    assert_eq!(out.condition, "modify/bad-request", "{out:?}");
    assert_eq!(x.stored_fingerprint().await, before);
    // An account that does not exist.
    let other = "0000000000000000000000000000000000000000@localhost/r";
    let out = x.rollover(other, &new, None).await;
    assert_eq!(out.condition, "cancel/item-not-found", "{out:?}");
    // Finally the real thing still works.
    assert_eq!(x.rollover(&me, &new, None).await.kind, "result");
}

#[tokio::test]
async fn remove_from_the_accounts_own_jid() {
    let x = setup(|_| {}).await;
    x.register().await;
    let out = x
        .send(&format!("{}/phone", jid()), "set", REMOVE)
        .await
        .unwrap();
    assert_eq!(out.kind, "result", "{out:?}");
    assert!(!out.xml.contains("<query"), "an empty result: {}", out.xml);
    assert_eq!(x.stored_fingerprint().await, None);
    // Gone: a second removal finds nothing.
    let out = x
        .send(&format!("{}/phone", jid()), "set", REMOVE)
        .await
        .unwrap();
    assert_eq!(out.condition, "cancel/item-not-found", "{out:?}");
}

#[tokio::test]
async fn remove_from_any_other_jid_removes_nothing() {
    let x = setup(|_| {}).await;
    let key = x.register().await;
    for from in [
        format!("{EMULATOR_ACCOUNT}@elsewhere.example/r"),
        format!("{EMULATOR_ACCOUNT}@register.localhost"),
        "localhost".to_owned(),
        "localhost/r".to_owned(),
        "anon@localhost/r".to_owned(),
        format!("{EMULATOR_ACCOUNT}x@localhost/r"),
    ] {
        let out = x.send(&from, "set", REMOVE).await.unwrap();
        assert_eq!(out.condition, "auth/forbidden", "{from}: {out:?}");
        assert_eq!(
            x.stored_fingerprint().await,
            Some(fingerprint(&key)),
            "{from}"
        );
    }
    // Another account's JID can only ask for its own removal: unknown here, and ours stays.
    let out = x
        .send(
            "0000000000000000000000000000000000000000@localhost/r",
            "set",
            REMOVE,
        )
        .await
        .unwrap();
    assert_eq!(out.condition, "cancel/item-not-found", "{out:?}");
    assert_eq!(x.stored_fingerprint().await, Some(fingerprint(&key)));
}

#[tokio::test]
async fn duplicates_of_a_correct_step_two_all_succeed() {
    // A client that retries its step 2 while the first is being certified gets the same answer
    // for every copy, also for those that find no try left.
    let x = Arc::new(setup(|_| {}).await);
    let out = x.step1("anon1@localhost/r", EMULATOR, "").await;
    assert_eq!(out.kind, "result", "{out:?}");
    let key = public(&user_key(&jid()));
    let code = x.provider.last_code(EMULATOR).unwrap();
    let outs = futures::future::join_all((0..12).map(|_| {
        let (x, code, key) = (x.clone(), code.clone(), key.clone());
        async move { x.step2("anon2@localhost/r", &code, &key).await }
    }))
    .await;
    let kinds: Vec<&str> = outs.iter().map(|o| o.kind).collect();
    assert_eq!(kinds, vec!["result"; 12], "{outs:?}");
    let keys: Vec<_> = outs
        .iter()
        .map(|o| field_value(&o.xml, "publickey"))
        .collect();
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "one stored result");
}
