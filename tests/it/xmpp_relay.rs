//! The Prosody relay over HTTP (`POST /v1/xmpp/relay`, issue 12): iqs as Prosody's
//! `mod_kontalk_register` relays them from client streams, before and after login, with the
//! client's address and TLS certificate. Registration step 2 takes the key from the bridge
//! certificate (built as Kontalk's X509Bridge writes it); registered sessions see
//! `<registered/>`, roll over, remove, and move their key to a new device with a token.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use kontalk_registrar::config::Secret;
use kontalk_registrar::login_cert::{self, Style};
use kontalk_registrar::openpgp;
use kontalk_registrar::xmpp::xmpp_parsers::minidom::Element;
use sequoia_openpgp::Cert;
use sequoia_openpgp::Packet;
use sequoia_openpgp::cert::amalgamation::key::PrimaryKey as _;
use sequoia_openpgp::crypto::Password;
use sequoia_openpgp::parse::Parse;
use sequoia_openpgp::serialize::SerializeInto;
use serde_json::{Value, json};

use crate::harness::*;

const RELAY: &str = "/v1/xmpp/relay";
const CLIENT: &str = "jabber:client";
const DATA: &str = "jabber:x:data";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const ACCOUNT_NS: &str = "http://kontalk.org/protocol/register#account";

fn jid() -> String {
    format!("{EMULATOR_ACCOUNT}@localhost")
}

/// What Prosody knows of the client.
#[derive(Clone, Default)]
pub(crate) struct Client {
    pub(crate) ip: String,
    pub(crate) certificate: Option<String>,
    pub(crate) jid: Option<String>,
    pub(crate) login_fingerprint: Option<String>,
}

impl Client {
    pub(crate) fn at(ip: &str) -> Self {
        Self {
            ip: ip.to_owned(),
            ..Self::default()
        }
    }

    pub(crate) fn with_certificate(mut self, pem: String) -> Self {
        self.certificate = Some(pem);
        self
    }

    /// A logged-in session of `jid` with the key `fingerprint`.
    fn session(mut self, jid: &str, fingerprint: &str) -> Self {
        self.jid = Some(format!("{jid}/phone"));
        self.login_fingerprint = Some(fingerprint.to_owned());
        self
    }
}

/// The answer to a relayed iq.
pub(crate) struct Answer {
    pub(crate) xml: String,
    pub(crate) element: Element,
}

impl Answer {
    pub(crate) fn kind(&self) -> &str {
        self.element.attr("type").unwrap()
    }

    /// `type/condition` of an error answer.
    pub(crate) fn error(&self) -> String {
        assert_eq!(self.kind(), "error", "{}", self.xml);
        let error = self.element.get_child("error", CLIENT).unwrap();
        let condition = error
            .children()
            .find(|c| c.ns() == STANZAS && c.name() != "text")
            .unwrap()
            .name()
            .to_owned();
        format!("{}/{condition}", error.attr("type").unwrap())
    }

    pub(crate) fn text(&self) -> String {
        self.element
            .get_child("error", CLIENT)
            .and_then(|e| e.get_child("text", STANZAS))
            .map(|t| t.text())
            .unwrap_or_default()
    }

    /// The value of field `var` in the answer's data form.
    fn field(&self, var: &str) -> Option<String> {
        let x = self.element.children().next()?.get_child("x", DATA)?;
        x.children()
            .find(|f| f.attr("var") == Some(var))
            .and_then(|f| f.children().next())
            .map(|v| v.text())
    }
}

/// A server whose relay loopback may call without the token (as Prosody on the same host would
/// with `login.relay_allowed_ips`), adjusted by `tweak`.
async fn server_with(tweak: impl FnOnce(&mut kontalk_registrar::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.login.relay_allowed_ips = vec!["127.0.0.0/8".parse().unwrap()];
        tweak(c);
    })
    .await
}

async fn server() -> TestServer {
    server_with(|_| {}).await
}

async fn relay_raw(s: &TestServer, body: Value) -> Reply {
    s.post(RELAY, body).await
}

/// Relays `stanza` from `client` as Prosody on the same host does. It names itself in
/// `X-Forwarded-For` for servers that trust a loopback proxy (whose own address would only stand
/// in for a client, and satisfy no allow-list); other servers ignore the header.
pub(crate) async fn relay(s: &TestServer, client: &Client, stanza: &str) -> Answer {
    let body = json!({
        "stanza": stanza,
        "host": "localhost",
        "client_ip": client.ip,
        "certificate": client.certificate,
        "jid": client.jid,
        "login_fingerprint": client.login_fingerprint,
    });
    let reply = Reply::from(
        s.http
            .post(s.url(RELAY))
            .header("x-forwarded-for", "127.0.0.2")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let xml = reply.body["stanza"].as_str().unwrap().to_owned();
    let element: Element = xml.parse().unwrap();
    assert_eq!(element.ns(), CLIENT, "{xml}");
    assert_eq!(element.name(), "iq");
    Answer { xml, element }
}

/// An iq as Prosody serialises it from a client stream: no namespace on the stanza itself.
fn iq(type_: &str, id: &str, payload: &str) -> String {
    format!("<iq type='{type_}' id='{id}' to='localhost'>{payload}</iq>")
}

fn form(form_type: &str, fields: &[(&str, &str)]) -> String {
    let mut x = format!(
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE' type='hidden'><value>{form_type}</value></field>"
    );
    for (var, value) in fields {
        x.push_str(&format!(
            "<field var='{var}'><value>{value}</value></field>"
        ));
    }
    x.push_str("</x></query>");
    x
}

pub(crate) fn step1(phone: &str, force: bool) -> String {
    let force = if force { "true" } else { "false" };
    iq(
        "set",
        "reg1",
        &form("jabber:iq:register", &[("phone", phone), ("force", force)]),
    )
}

pub(crate) fn step2(code: &str) -> String {
    iq(
        "set",
        "reg2",
        &form(
            "http://kontalk.org/protocol/register#code",
            &[("code", code)],
        ),
    )
}

/// A secret key for `jid` (Ed25519 or RSA-2048) and the Kontalk-style bridge certificate of it.
fn key_and_certificate(jid: &str, rsa: bool) -> (Cert, String) {
    let key = openpgp::generate_user_key("Kontalk user", jid, rsa).unwrap();
    let pem = bridge(&key, jid);
    (key, pem)
}

pub(crate) fn bridge(key: &Cert, jid: &str) -> String {
    login_cert::build_styled(key, jid, SystemTime::now(), Style::Kontalk)
        .unwrap()
        .pem()
}

/// Steps 1 and 2 over the relay, the key coming from the certificate only; the certified key.
async fn register(s: &TestServer, ip: &'static str, phone: &str, key: &Cert, force: bool) -> Cert {
    use sha1::Digest as _;
    // Kontalk's account: the SHA-1 of the E.164 number.
    let jid = format!("{}@localhost", hex::encode(sha1::Sha1::digest(phone)));
    let started = relay(s, &Client::at(ip), &step1(phone, force)).await;
    assert_eq!(started.kind(), "result", "{}", started.xml);
    let client = Client::at(ip).with_certificate(bridge(key, &jid));
    let done = relay(s, &client, &step2(&s.code_for(phone))).await;
    assert_eq!(done.kind(), "result", "{}", done.xml);
    let public = Cert::from_bytes(&unb64(&done.field("publickey").unwrap())).unwrap();
    key.clone().merge_public(public).unwrap()
}

#[tokio::test]
async fn the_kontalk_flow_with_the_key_from_the_certificate() {
    let s = server().await;
    // The Android client first asks for the form, before login, and gives up unless it gets it.
    let form = relay(
        &s,
        &Client::at("192.0.2.1"),
        &iq("get", "f1", "<query xmlns='jabber:iq:register'/>"),
    )
    .await;
    assert_eq!(form.kind(), "result", "{}", form.xml);
    assert_eq!(form.element.attr("id"), Some("f1"));
    assert_eq!(form.element.attr("from"), Some("localhost"));
    assert_eq!(
        form.element.attr("to"),
        None,
        "a stream before login has no JID"
    );
    assert!(form.xml.contains("var='phone'"), "{}", form.xml);

    for rsa in [false, true] {
        let (key, pem) = key_and_certificate(&jid(), rsa);
        let started = relay(&s, &Client::at("192.0.2.1"), &step1(EMULATOR, rsa)).await;
        assert_eq!(started.kind(), "result", "{}", started.xml);
        assert_eq!(started.field("from").as_deref(), Some("12345"));
        assert_eq!(started.field("challenge").as_deref(), Some("pin"));
        // Step 2 on a new connection: only the code, the key from the TLS certificate.
        let client = Client::at("192.0.2.1").with_certificate(pem);
        let done = relay(&s, &client, &step2(&s.code_for(EMULATOR))).await;
        assert_eq!(done.kind(), "result", "{}", done.xml);
        let public = Cert::from_bytes(&unb64(&done.field("publickey").unwrap())).unwrap();
        assert_eq!(public.fingerprint(), key.fingerprint());
        // The certified key's bridge certificate logs in.
        let login = bridge(&key.clone().merge_public(public).unwrap(), &jid());
        let checked = s.post_raw("/v1/login-certificates/verify", login).await;
        assert_eq!(checked.status, 200, "{:?}", checked.body);
        assert_eq!(checked.body["jid"], jid());
        assert_eq!(checked.body["fingerprint"], key.fingerprint().to_hex());
    }
}

#[tokio::test]
async fn step_two_refuses_certificates_that_fail_a_check() {
    let s = server().await;
    let (key, pem) = key_and_certificate(&jid(), false);
    let started = relay(&s, &Client::at("192.0.2.2"), &step1(EMULATOR, false)).await;
    assert_eq!(started.kind(), "result");
    let code = s.code_for(EMULATOR);
    let invalid = |a: &Answer| {
        assert_eq!(a.error(), "modify/bad-request", "{}", a.xml);
        assert_eq!(a.text(), "Invalid public key.");
    };
    // Garbage (a certificate whose X.509 key is not the key in its extension: login_cert's unit
    // tests and the end-to-end test through Prosody).
    let garbage = Client::at("192.0.2.2")
        .with_certificate("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into());
    invalid(&relay(&s, &garbage, &step2(&code)).await);
    // A certificate whose self-signature does not verify (the client does not hold the key).
    let forged = {
        let mut der = pem_der(&pem);
        let last = der.len() - 1;
        der[last] ^= 1;
        Client::at("192.0.2.2").with_certificate(pem_encode(&der))
    };
    invalid(&relay(&s, &forged, &step2(&code)).await);
    let other = openpgp::generate_user_key("Other", &jid(), false).unwrap();
    // A certificate and a publickey field of different keys.
    let both = Client::at("192.0.2.2").with_certificate(pem.clone());
    let with_other = iq(
        "set",
        "reg2",
        &form(
            "http://kontalk.org/protocol/register#code",
            &[("code", &code), ("publickey", &b64(&public(&other)))],
        ),
    );
    invalid(&relay(&s, &both, &with_other).await);
    // A bridge certificate of another account finds nothing pending for that account.
    let (_, stranger) =
        key_and_certificate("0000000000000000000000000000000000000000@localhost", false);
    let a = relay(
        &s,
        &Client::at("192.0.2.2").with_certificate(stranger),
        &step2(&code),
    )
    .await;
    assert_eq!(a.error(), "cancel/item-not-found", "{}", a.xml);
    // None of these spent a try: the right code with the right certificate still works, and the
    // same key in the form as well is fine.
    let same = iq(
        "set",
        "reg2",
        &form(
            "http://kontalk.org/protocol/register#code",
            &[("code", &code), ("publickey", &b64(&public(&key)))],
        ),
    );
    let done = relay(&s, &Client::at("192.0.2.2").with_certificate(pem), &same).await;
    assert_eq!(done.kind(), "result", "{}", done.xml);
    // Wrong code, as Kontalk's clients get it.
    let (key2, pem2) = key_and_certificate(&jid(), false);
    let _ = key2;
    relay(&s, &Client::at("192.0.2.2"), &step1(EMULATOR, true)).await;
    let wrong = relay(
        &s,
        &Client::at("192.0.2.2").with_certificate(pem2),
        &step2(if s.code_for(EMULATOR) == "000000" {
            "111111"
        } else {
            "000000"
        }),
    )
    .await;
    assert_eq!(wrong.error(), "modify/bad-request", "{}", wrong.xml);
    assert!(wrong.text().contains("wrong code"), "{}", wrong.text());
    // No certificate and no publickey field: told what is missing.
    let neither = relay(&s, &Client::at("192.0.2.2"), &step2("123456")).await;
    assert_eq!(neither.error(), "modify/bad-request");
    assert!(
        neither.text().contains("bridge certificate"),
        "{}",
        neither.text()
    );
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn pem_encode(der: &[u8]) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn per_ip_limits_apply_to_the_relayed_address() {
    let s = server_with(|c| {
        c.settings.abuse.start.ip = Some("2/1h".parse().unwrap());
    })
    .await;
    for phone in ["+15555215554", "+15555215556"] {
        let a = relay(&s, &Client::at("203.0.113.9"), &step1(phone, false)).await;
        assert_eq!(a.kind(), "result", "{}", a.xml);
    }
    let limited = relay(
        &s,
        &Client::at("203.0.113.9"),
        &step1("+15555215558", false),
    )
    .await;
    assert_eq!(
        limited.error(),
        "wait/service-unavailable",
        "{}",
        limited.xml
    );
    let retry = limited
        .element
        .get_child("error", CLIENT)
        .unwrap()
        .get_child("retry", "urn:kontalk-registrar:retry")
        .unwrap();
    assert_eq!(retry.attr("limit"), Some("ip"));
    // Another client of the same Prosody is not limited by it.
    let other = relay(
        &s,
        &Client::at("203.0.113.10"),
        &step1("+15555215558", false),
    )
    .await;
    assert_eq!(other.kind(), "result", "{}", other.xml);
}

#[tokio::test]
async fn a_registered_session_sees_registered_rolls_over_and_removes() {
    let s = server().await;
    let (key, _) = key_and_certificate(&jid(), false);
    let certified = register(&s, "192.0.2.3", EMULATOR, &key, false).await;
    let fpr = certified.fingerprint().to_hex();
    let session = Client::at("192.0.2.3").session(&jid(), &fpr);
    let get = iq("get", "g1", "<query xmlns='jabber:iq:register'/>");
    let registered = relay(&s, &session, &get).await;
    assert_eq!(registered.kind(), "result", "{}", registered.xml);
    assert_eq!(
        registered.element.attr("to"),
        Some(format!("{}/phone", jid()).as_str())
    );
    let query = registered.element.children().next().unwrap();
    assert!(
        query
            .get_child("registered", "jabber:iq:register")
            .is_some(),
        "{}",
        registered.xml
    );
    assert!(
        registered
            .xml
            .contains("http://kontalk.org/protocol/register#key")
    );

    // Rollover from the session: a newer key certified by the current one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = openpgp::generate_user_key("Kontalk user", &jid(), false).unwrap();
    let new = openpgp::cross_certify(&certified, &new, &jid(), SystemTime::now()).unwrap();
    let rollover = iq(
        "set",
        "k1",
        &form(
            "http://kontalk.org/protocol/register#key",
            &[("publickey", &b64(&public(&new)))],
        ),
    );
    let rolled = relay(&s, &session, &rollover).await;
    assert_eq!(rolled.kind(), "result", "{}", rolled.xml);
    // The old session's key is no longer the account's: it cannot act for it any more.
    let stale = relay(
        &s,
        &session,
        &iq(
            "set",
            "r0",
            "<query xmlns='jabber:iq:register'><remove/></query>",
        ),
    )
    .await;
    assert_eq!(stale.error(), "auth/forbidden", "{}", stale.xml);
    assert!(stale.text().contains("no longer"), "{}", stale.text());
    let stale_get = relay(&s, &session, &get).await;
    assert!(
        stale_get
            .element
            .children()
            .next()
            .unwrap()
            .get_child("registered", "jabber:iq:register")
            .is_none()
    );
    // Before login nobody can remove it; the new key's session can.
    let anonymous = relay(
        &s,
        &Client::at("192.0.2.3"),
        &iq(
            "set",
            "r1",
            "<query xmlns='jabber:iq:register'><remove/></query>",
        ),
    )
    .await;
    assert_eq!(anonymous.error(), "auth/forbidden");
    let current = Client::at("192.0.2.3").session(&jid(), &new.fingerprint().to_hex());
    let removed = relay(
        &s,
        &current,
        &iq(
            "set",
            "r2",
            "<query xmlns='jabber:iq:register'><remove/></query>",
        ),
    )
    .await;
    assert_eq!(removed.kind(), "result", "{}", removed.xml);
    let again = relay(&s, &current, &get).await;
    assert!(
        again.xml.contains("var='phone'"),
        "a removed account gets the registration form: {}",
        again.xml
    );
}

/// `key` with every secret part protected by `passphrase`.
fn encrypted(key: &Cert, passphrase: &str) -> Vec<u8> {
    let password = Password::from(passphrase);
    let mut packets: Vec<Packet> = Vec::new();
    for ka in key.keys().secret() {
        let k = ka.key().clone().encrypt_secret(&password).unwrap();
        packets.push(if ka.primary() {
            k.role_into_primary().into()
        } else {
            k.role_into_subordinate().into()
        });
    }
    let (cert, _) = key.clone().insert_packets(packets).unwrap();
    cert.as_tsk().to_vec().unwrap()
}

#[tokio::test]
async fn moving_to_a_new_device_with_a_token() {
    let s = server().await;
    let (key, _) = key_and_certificate(&jid(), false);
    let certified = register(&s, "192.0.2.4", EMULATOR, &key, false).await;
    let session = Client::at("192.0.2.4").session(&jid(), &certified.fingerprint().to_hex());
    let upload = |private: &[u8]| {
        iq(
            "set",
            "u1",
            &form(
                "http://kontalk.org/protocol/register#privatekey",
                &[("privatekey", &b64(private))],
            ),
        )
    };
    let protected = encrypted(&certified, "correct horse");
    // Refused: a key in clear, another key, a stranger's upload, garbage.
    let clear = relay(&s, &session, &upload(&certified.as_tsk().to_vec().unwrap())).await;
    assert_eq!(clear.error(), "modify/bad-request");
    assert!(clear.text().contains("passphrase"), "{}", clear.text());
    let other = encrypted(
        &openpgp::generate_user_key("x", &jid(), false).unwrap(),
        "p",
    );
    let wrong_key = relay(&s, &session, &upload(&other)).await;
    assert!(
        wrong_key.text().contains("current key"),
        "{}",
        wrong_key.text()
    );
    let stranger = relay(&s, &Client::at("192.0.2.4"), &upload(&protected)).await;
    assert_eq!(stranger.error(), "auth/forbidden");
    let junk = relay(&s, &session, &upload(b"junk")).await;
    assert_eq!(junk.error(), "modify/bad-request");

    let uploaded = relay(&s, &session, &upload(&protected)).await;
    assert_eq!(uploaded.kind(), "result", "{}", uploaded.xml);
    let token = uploaded.field("token").unwrap();
    assert_eq!(token.len(), 40);
    // The new device asks before login, from anywhere.
    let retrieve = |token: &str| {
        iq(
            "get",
            "t1",
            &format!(
                "<query xmlns='jabber:iq:register'><account xmlns='{ACCOUNT_NS}'>\
                 <privatekey><token>{token}</token></privatekey></account></query>"
            ),
        )
    };
    let got = relay(&s, &Client::at("198.51.100.7"), &retrieve(&token)).await;
    assert_eq!(got.kind(), "result", "{}", got.xml);
    let keys = got
        .element
        .children()
        .next()
        .unwrap()
        .get_child("account", ACCOUNT_NS)
        .unwrap()
        .get_child("privatekey", ACCOUNT_NS)
        .unwrap();
    let private = unb64(&keys.get_child("private", ACCOUNT_NS).unwrap().text());
    let public_key = unb64(&keys.get_child("public", ACCOUNT_NS).unwrap().text());
    assert_eq!(private, protected, "the key exactly as uploaded");
    assert_eq!(public_key, public(&certified));
    // Used once.
    let reused = relay(&s, &Client::at("198.51.100.7"), &retrieve(&token)).await;
    assert_eq!(reused.error(), "cancel/item-not-found", "{}", reused.xml);

    // Expiry: 15 minutes by default.
    let again = relay(&s, &session, &upload(&protected)).await;
    let token = again.field("token").unwrap();
    s.clock.advance(Duration::from_secs(15 * 60 + 1));
    let expired = relay(&s, &Client::at("198.51.100.8"), &retrieve(&token)).await;
    assert_eq!(expired.error(), "cancel/item-not-found", "{}", expired.xml);
}

#[tokio::test]
async fn key_retrievals_are_limited_per_address() {
    let s = server_with(|c| {
        c.settings.key_retrievals_per_ip = Some("3/1h".parse().unwrap());
    })
    .await;
    let guess = |n: u32| {
        iq(
            "get",
            "t",
            &format!(
                "<query xmlns='jabber:iq:register'><account xmlns='{ACCOUNT_NS}'>\
                 <privatekey><token>{n:040}</token></privatekey></account></query>"
            ),
        )
    };
    for n in 0..3 {
        let a = relay(&s, &Client::at("198.51.100.9"), &guess(n)).await;
        assert_eq!(a.error(), "cancel/item-not-found");
    }
    let limited = relay(&s, &Client::at("198.51.100.9"), &guess(3)).await;
    assert_eq!(
        limited.error(),
        "wait/service-unavailable",
        "{}",
        limited.xml
    );
    let elsewhere = relay(&s, &Client::at("198.51.100.10"), &guess(4)).await;
    assert_eq!(elsewhere.error(), "cancel/item-not-found");
}

#[tokio::test]
async fn the_relay_is_for_the_xmpp_server_only_and_refuses_misuse() {
    // The defaults: the login check is open to loopback, the relay to the token only (it acts
    // for whichever account its caller names).
    let defaults = TestServer::start().await;
    let body = json!({
        "stanza": iq("get", "f1", "<query xmlns='jabber:iq:register'/>"),
        "host": "localhost",
        "client_ip": "192.0.2.5",
    });
    let refused = relay_raw(&defaults, body.clone()).await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(refused.headers["www-authenticate"], "Bearer");
    let login = defaults
        .post_raw("/v1/login-certificates/verify", "junk")
        .await;
    assert_eq!(
        login.status, 403,
        "the login check answers loopback: {:?}",
        login.body
    );
    let s = TestServer::start_with(|c| {
        c.login.bearer_token = Some(Secret::new("relay-token-0123456789".to_owned()));
    })
    .await;
    assert_eq!(relay_raw(&s, body.clone()).await.status, 401);
    let with_token = |body: Value| {
        s.http
            .post(s.url(RELAY))
            .bearer_auth("relay-token-0123456789")
            .json(&body)
            .send()
    };
    let ok = Reply::from(with_token(body.clone()).await.unwrap()).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    // A link that is misused answers 400 with the reason, not a stanza.
    for (bad, why) in [
        (
            json!({"stanza": "<iq", "host": "localhost", "client_ip": "192.0.2.5"}),
            "XML",
        ),
        (
            json!({"stanza": "<message/>", "host": "localhost", "client_ip": "192.0.2.5"}),
            "not an iq",
        ),
        (
            json!({"stanza": body["stanza"], "host": "example.org", "client_ip": "192.0.2.5"}),
            "domain",
        ),
        (
            json!({"stanza": body["stanza"], "host": "localhost", "client_ip": "nowhere"}),
            "invalid IP address",
        ),
        (
            json!({"stanza": body["stanza"], "host": "localhost"}),
            "missing field `client_ip`",
        ),
        (
            json!({"stanza": body["stanza"], "host": "localhost", "client_ip": "192.0.2.5", "jid": "@@"}),
            "jid",
        ),
        // A session's JID always comes with the key it logged in with.
        (
            json!({"stanza": body["stanza"], "host": "localhost", "client_ip": "192.0.2.5", "jid": format!("{}/phone", jid())}),
            "login_fingerprint",
        ),
    ] {
        let r = Reply::from(with_token(bad.clone()).await.unwrap()).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(why),
            "{bad}: {:?}",
            r.body
        );
    }
    // A malformed iq that asks for an answer gets a stanza error, as the client expects.
    let r = Reply::from(
        with_token(json!({"stanza": "<iq type='set' id='x1'/>", "host": "localhost", "client_ip": "192.0.2.5"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body["stanza"].as_str().unwrap().contains("bad-request"),
        "{:?}",
        r.body
    );
    // A result or error relayed to us needs no answer.
    let r = Reply::from(
        with_token(json!({"stanza": "<iq type='result' id='x2'/>", "host": "localhost", "client_ip": "192.0.2.5"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["stanza"], Value::Null);
}

#[tokio::test]
async fn an_android_rollover_is_proved_by_the_session_and_the_revocation() {
    // Kontalk's Android client rolls over with a new key the old one did not certify, sending
    // the old key with its revocation, from the session that logged in with the old key.
    let s = server().await;
    // (Ed25519 keys here for speed; the proof does not depend on the algorithm.)
    let (key, _) = key_and_certificate(&jid(), false);
    let certified = register(&s, "192.0.2.6", EMULATOR, &key, false).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = openpgp::generate_user_key("Kontalk user", &jid(), false).unwrap();
    let revoked = openpgp::revoke_superseded(&certified).unwrap();
    let rollover = iq(
        "set",
        "k2",
        &form(
            "http://kontalk.org/protocol/register#key",
            &[
                ("publickey", &b64(&public(&new))),
                ("revoked", &b64(&public(&revoked))),
            ],
        ),
    );
    // Without the revocation, the session alone is not enough (and without a session of the
    // old key, as over the component, the revocation is not: openpgp's unit tests).
    let session = Client::at("192.0.2.6").session(&jid(), &certified.fingerprint().to_hex());
    let bare = iq(
        "set",
        "k3",
        &form(
            "http://kontalk.org/protocol/register#key",
            &[("publickey", &b64(&public(&new)))],
        ),
    );
    assert_eq!(
        relay(&s, &session, &bare).await.error(),
        "modify/bad-request"
    );
    let rolled = relay(&s, &session, &rollover).await;
    assert_eq!(rolled.kind(), "result", "{}", rolled.xml);
    let public_key = Cert::from_bytes(&unb64(&rolled.field("publickey").unwrap())).unwrap();
    assert_eq!(public_key.fingerprint(), new.fingerprint());
    let login = bridge(&new.clone().merge_public(public_key).unwrap(), &jid());
    let checked = s.post_raw("/v1/login-certificates/verify", login).await;
    assert_eq!(checked.status, 200, "{:?}", checked.body);
}

#[tokio::test]
async fn key_transfers_keep_only_the_latest_current_key_and_no_token() {
    let s = server().await;
    let (key, _) = key_and_certificate(&jid(), false);
    let certified = register(&s, "192.0.2.7", EMULATOR, &key, false).await;
    let fingerprint = certified.fingerprint().to_hex();
    let session = Client::at("192.0.2.7").session(&jid(), &fingerprint);
    let protected = encrypted(&certified, "words");
    let upload = iq(
        "set",
        "u1",
        &form(
            "http://kontalk.org/protocol/register#privatekey",
            &[("privatekey", &b64(&protected))],
        ),
    );
    let retrieve = |token: &str| {
        iq(
            "get",
            "t1",
            &format!(
                "<query xmlns='jabber:iq:register'><account xmlns='{ACCOUNT_NS}'>\
                 <privatekey><token>{token}</token></privatekey></account></query>"
            ),
        )
    };
    let token = |a: &Answer| a.field("token").unwrap();
    // The database holds the token only as a keyed hash: looking the raw token up finds
    // nothing (and consumes nothing).
    let first = token(&relay(&s, &session, &upload).await);
    let store = open_store(&s.db_url).await;
    let now = s.clock_now();
    assert_eq!(store.take_key_transfer(&first, now).await.unwrap(), None);
    // A newer upload makes the older token useless.
    let second = token(&relay(&s, &session, &upload).await);
    let stale = relay(&s, &Client::at("198.51.100.20"), &retrieve(&first)).await;
    assert_eq!(stale.error(), "cancel/item-not-found");
    // Sessions of another domain, or of a key the account no longer has, cannot upload.
    let foreign =
        Client::at("192.0.2.7").session(&format!("{EMULATOR_ACCOUNT}@example.org"), &fingerprint);
    assert_eq!(relay(&s, &foreign, &upload).await.error(), "auth/forbidden");
    // The key is replaced (a forced re-registration from another device): the upload of the
    // old key is never handed out, and the old key's session cannot upload again.
    let (other, _) = key_and_certificate(&jid(), false);
    s.clock.advance(Duration::from_secs(120));
    register(&s, "192.0.2.8", EMULATOR, &other, true).await;
    let replaced = relay(&s, &Client::at("198.51.100.20"), &retrieve(&second)).await;
    assert_eq!(
        replaced.error(),
        "cancel/item-not-found",
        "{}",
        replaced.xml
    );
    let old_session = relay(&s, &session, &upload).await;
    assert_eq!(old_session.error(), "auth/forbidden", "{}", old_session.xml);
}

#[tokio::test]
async fn the_pumping_defence_answers_kontalk_clients_with_a_missed_call() {
    // The same rules as over HTTP: a range where nobody completes gets missed calls, and the
    // form says so in Kontalk's fields.
    let s = server_with(|c| {
        let a = &mut c.settings.abuse;
        a.start = kontalk_registrar::registrar::abuse::Limits::default();
        a.caps.total = None;
        a.caps.per_country = None;
        a.pumping.min_numbers = 3;
    })
    .await;
    for i in 0..3 {
        let a = relay(
            &s,
            &Client::at(&format!("192.0.2.{}", i + 1)),
            &step1(&format!("+3934712{i:05}"), false),
        )
        .await;
        assert_eq!(a.field("challenge").as_deref(), Some("pin"), "{}", a.xml);
    }
    let a = relay(
        &s,
        &Client::at("198.51.100.7"),
        &step1("+393471200077", false),
    )
    .await;
    assert_eq!(a.kind(), "result", "{}", a.xml);
    assert_eq!(
        a.field("challenge").as_deref(),
        Some("missedcall"),
        "{}",
        a.xml
    );
    let sent = s.provider.sent();
    let last = sent.last().unwrap();
    assert_eq!(last.challenge, registrar_providers::Challenge::MissedCall);
    assert_eq!(last.to, "+393471200077");
    // The capturing provider calls from its sender id.
    assert_eq!(a.field("from").as_deref(), Some("12345"), "{}", a.xml);
}
