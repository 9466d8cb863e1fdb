//! Registered accounts over HTTP (issue 7): the login-certificate check and who may call it,
//! server key rotation, key rollover, signed account removal, and the webhook events these
//! changes send.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use kontalk_registrar::config::Secret;
use kontalk_registrar::openpgp::{self, ServerKey};
use kontalk_registrar::registrar::removal_message;
use kontalk_registrar::{clock::Clock, login_cert};
use registrar_providers::CapturingProvider;
use sequoia_openpgp::Cert;
use sequoia_openpgp::cert::CertBuilder;
use sequoia_openpgp::parse::Parse;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::gpg::{gpg, gpg_available};
use crate::harness::*;

const VERIFY: &str = "/v1/login-certificates/verify";

fn jid() -> String {
    format!("{EMULATOR_ACCOUNT}@localhost")
}

fn account_path() -> String {
    format!("/v1/accounts/{EMULATOR_ACCOUNT}")
}

fn key_path() -> String {
    format!("/v1/accounts/{EMULATOR_ACCOUNT}/key")
}

/// The secret key with the server's certification merged in (what a client keeps).
fn certified(secret: &Cert, reply: &Reply) -> Cert {
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let public = Cert::from_bytes(&unb64(reply.body["public_key"].as_str().unwrap())).unwrap();
    secret.clone().merge_public(public).unwrap()
}

/// Registers `phone` with `key` (which must name the number's JID).
async fn register_with(s: &TestServer, phone: &str, force: bool, key: &Cert) -> Reply {
    let started = s.start_verification(phone, force).await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    s.submit(&id, &s.code_for(phone), &public(key)).await
}

/// Registers the emulator's number; the client's key with our certification.
async fn register(s: &TestServer, force: bool) -> Cert {
    let (key, reply) = s.register(EMULATOR, force).await;
    certified(&key, &reply)
}

fn now(s: &TestServer) -> SystemTime {
    s.clock_now().into()
}

fn bridge(s: &TestServer, key: &Cert) -> login_cert::BridgeCertificate {
    login_cert::build(key, &jid(), now(s)).unwrap()
}

async fn post_cert(s: &TestServer, body: impl Into<reqwest::Body>, token: Option<&str>) -> Reply {
    let mut r = s
        .http
        .post(s.url(VERIFY))
        .header("content-type", "application/octet-stream")
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    Reply::from(r.send().await.unwrap()).await
}

async fn login(s: &TestServer, key: &Cert) -> Reply {
    post_cert(s, bridge(s, key).pem(), None).await
}

fn assert_login_ok(r: &Reply, key: &Cert) {
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["jid"], jid());
    assert_eq!(r.body["account"], EMULATOR_ACCOUNT);
    assert_eq!(r.body["fingerprint"], key.fingerprint().to_hex());
}

fn assert_refused(r: &Reply, check: &str) {
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.problem_type(), "login-refused");
    assert_eq!(r.body["check"], check, "{:?}", r.body);
}

// ------------------------------------------------------------------------------------------------
// Login check
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn login_certificates_are_checked_against_the_current_key() {
    let s = TestServer::start().await;
    let key = register(&s, false).await;
    let cert = bridge(&s, &key);
    assert_login_ok(&post_cert(&s, cert.pem(), None).await, &key);
    assert_login_ok(&post_cert(&s, cert.der().to_vec(), None).await, &key);

    let garbage = post_cert(&s, "not a certificate", None).await;
    assert_refused(&garbage, "malformed");

    // A forced re-registration with another key ends the old key's logins.
    let newer = register(&s, true).await;
    assert_refused(&post_cert(&s, cert.pem(), None).await, "key-replaced");
    assert_login_ok(&login(&s, &newer).await, &newer);

    // Removed: no key logs in.
    remove_signed(&s, &newer, "login-test-nonce-0001", 0).await;
    assert_refused(&login(&s, &newer).await, "unknown-account");
}

#[tokio::test]
async fn the_login_check_is_closed_to_other_networks_without_the_token() {
    let token = "a-login-token-of-some-length";
    let closed = TestServer::start_with(|c| c.login.allowed_ips.clear()).await;
    let key = register(&closed, false).await;
    let r = post_cert(&closed, bridge(&closed, &key).pem(), None).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.problem_type(), "unauthorized");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    // A token is useless where none is configured.
    let r = post_cert(&closed, bridge(&closed, &key).pem(), Some(token)).await;
    assert_eq!(r.status, 401);

    let s = TestServer::start_with(|c| {
        c.login.allowed_ips.clear();
        c.login.bearer_token = Some(Secret::new(token));
    })
    .await;
    let key = register(&s, false).await;
    let pem = bridge(&s, &key).pem();
    assert_login_ok(&post_cert(&s, pem.clone(), Some(token)).await, &key);
    for wrong in ["a-login-token-of-some-lengtH", "a-login-token", ""] {
        let r = post_cert(&s, pem.clone(), Some(wrong)).await;
        assert_eq!(r.status, 401, "{wrong:?}: {:?}", r.body);
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    let r = post_cert(&s, pem.clone(), None).await;
    assert_eq!(r.status, 401);
    // The scheme is case-insensitive; another scheme is not a bearer token.
    let r = s
        .http
        .post(s.url(VERIFY))
        .header("authorization", format!("bearer {token}"))
        .body(pem.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .post(s.url(VERIFY))
        .header("authorization", format!("Basic {token}"))
        .body(pem)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_rotated_server_key_keeps_old_logins_until_its_end_date() {
    let s = TestServer::start().await;
    let key = register(&s, false).await;
    let pem = bridge(&s, &key).pem();
    let old_fingerprint = s.get_text("/v1/server-key").await;
    let old_fingerprint = Cert::from_bytes(old_fingerprint.as_bytes())
        .unwrap()
        .fingerprint()
        .to_hex();
    let clock = s.clock.clone();
    let provider: CapturingProvider = s.provider.clone();
    let dir = s.stop().await;

    let new_key = ServerKey::generate("localhost").unwrap();
    let new_file = dir.path().join("server-key-2.asc");
    new_key.save(&new_file).unwrap();
    let until = clock.now() + chrono::Duration::hours(1);
    let s = TestServer::start_in(
        dir,
        clock.clone(),
        vec![Arc::new(provider.clone())],
        provider,
        |c| {
            let old = std::mem::replace(&mut c.key_file, new_file.clone());
            c.previous_keys = vec![(old, until)];
        },
    )
    .await;

    let keys = Reply::from(
        s.http
            .get(s.url("/v1/server-key"))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(keys.status, 200);
    assert_eq!(keys.headers["content-type"], "application/json");
    let b = &keys.body;
    assert_eq!(b["current"], new_key.fingerprint());
    let list = b["keys"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{b:?}");
    assert_eq!(list[0]["fingerprint"], new_key.fingerprint());
    assert_eq!(list[0]["current"], true);
    assert_eq!(list[0]["until"], Value::Null);
    assert_eq!(list[1]["fingerprint"], old_fingerprint);
    assert_eq!(list[1]["current"], false);
    let listed_until =
        chrono::DateTime::parse_from_rfc3339(list[1]["until"].as_str().unwrap()).unwrap();
    assert_eq!(listed_until.timestamp(), until.timestamp());
    for k in list {
        let cert = Cert::from_bytes(k["public_key"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(cert.fingerprint().to_hex(), k["fingerprint"]);
        assert!(!cert.is_tsk());
    }
    // Without asking for JSON, the current key, armored, as before.
    let armored = s.http.get(s.url("/v1/server-key")).send().await.unwrap();
    assert_eq!(armored.headers()["content-type"], "application/pgp-keys");
    let current = Cert::from_bytes(&armored.bytes().await.unwrap()).unwrap();
    assert_eq!(current.fingerprint().to_hex(), new_key.fingerprint());

    // Certified by the previous key: still logs in during the grace period, not after.
    assert_login_ok(&post_cert(&s, pem.clone(), None).await, &key);
    clock.advance(Duration::from_secs(3601));
    assert_refused(&post_cert(&s, pem, None).await, "not-certified");
}

// ------------------------------------------------------------------------------------------------
// Rollover
// ------------------------------------------------------------------------------------------------

/// A key naming the account, created `offset` seconds after `old` (1-second resolution).
fn key_created(old: &Cert, offset: i64) -> Cert {
    let created = old.primary_key().key().creation_time();
    let when = if offset >= 0 {
        created + Duration::from_secs(offset.unsigned_abs())
    } else {
        created - Duration::from_secs(offset.unsigned_abs())
    };
    CertBuilder::general_purpose(Some(format!("Test User <{}>", jid())))
        .set_creation_time(when)
        .generate()
        .unwrap()
        .0
}

fn armored(cert: &Cert) -> String {
    String::from_utf8(openpgp::public_armored(cert).unwrap()).unwrap()
}

async fn put_key(s: &TestServer, path: &str, body: Value) -> Reply {
    Reply::from(s.http.put(s.url(path)).json(&body).send().await.unwrap()).await
}

/// A newer key handed over by `old` (cross-certified).
fn successor(s: &TestServer, old: &Cert) -> Cert {
    let new = key_created(old, 60);
    openpgp::cross_certify(old, &new, &jid(), now(s)).unwrap()
}

fn assert_rollover_refused(r: &Reply, reason: &str) {
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.problem_type(), "rollover-refused");
    assert_eq!(r.body["reason"], reason, "{:?}", r.body);
}

#[tokio::test]
async fn a_key_certified_by_the_old_one_rolls_over() {
    let s = TestServer::start().await;
    let old = register(&s, false).await;
    // The new key is a minute newer; let the server's clock pass its creation.
    s.clock.advance(Duration::from_secs(120));
    let new = successor(&s, &old);
    let r = put_key(&s, &key_path(), json!({"public_key": b64(&public(&new))})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["account"], jid());
    assert_eq!(r.body["fingerprint"], new.fingerprint().to_hex());
    let new = certified(&new, &r);
    assert_login_ok(&login(&s, &new).await, &new);
    assert_refused(&login(&s, &old).await, "key-replaced");

    // Again, armored, with the old key's revocation.
    s.clock.advance(Duration::from_secs(120));
    let third = successor(&s, &new);
    let revoked = openpgp::revoke_superseded(&new).unwrap();
    let r = put_key(
        &s,
        &key_path(),
        json!({"public_key": armored(&third), "revoked": armored(&revoked)}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["fingerprint"], third.fingerprint().to_hex());
    let third = certified(&third, &r);
    assert_login_ok(&login(&s, &third).await, &third);
    assert_refused(&login(&s, &new).await, "key-replaced");
}

#[tokio::test]
async fn rollovers_without_the_old_keys_consent_are_refused() {
    let s = TestServer::start().await;
    let old = register(&s, false).await;
    s.clock.advance(Duration::from_secs(120));
    let path = key_path();
    let put = |body: Value| put_key(&s, &path, body);

    // Not certified at all.
    let bare = key_created(&old, 60);
    let r = put(json!({"public_key": b64(&public(&bare))})).await;
    assert_rollover_refused(&r, "not-signed-by-old-key");

    // Certified by some other key.
    let stranger = key_created(&old, 30);
    let forged = openpgp::cross_certify(&stranger, &bare, &jid(), now(&s)).unwrap();
    let r = put(json!({"public_key": b64(&public(&forged))})).await;
    assert_rollover_refused(&r, "not-signed-by-old-key");

    // Older, and as old, as the current key (though certified by it).
    for offset in [-60, 0] {
        let key =
            openpgp::cross_certify(&old, &key_created(&old, offset), &jid(), now(&s)).unwrap();
        let r = put(json!({"public_key": b64(&public(&key))})).await;
        assert_rollover_refused(&r, "not-newer");
    }

    // The current key itself.
    let r = put(json!({"public_key": b64(&public(&old))})).await;
    assert_rollover_refused(&r, "same-key");

    // `revoked` names another key than the current one.
    let good = successor(&s, &old);
    let other_revoked = openpgp::revoke_superseded(&stranger).unwrap();
    let r = put(json!({
        "public_key": b64(&public(&good)),
        "revoked": armored(&other_revoked),
    }))
    .await;
    assert_rollover_refused(&r, "revoked-is-not-current");

    // `revoked` is the current key, but not revoked.
    let r = put(json!({"public_key": b64(&public(&good)), "revoked": armored(&old)})).await;
    assert_rollover_refused(&r, "not-revoked");

    // Garbage key.
    let r = put(json!({"public_key": "bm90IGEga2V5"})).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.problem_type(), "bad-key");

    // An unknown account is refused as an uncertified key is (the answers do not tell
    // registered numbers apart); a bad account id, a malformed body.
    let stranger = user_key(&format!("{}@localhost", "0".repeat(40)));
    let r = put_key(
        &s,
        &format!("/v1/accounts/{}/key", "0".repeat(40)),
        json!({"public_key": b64(&public(&stranger))}),
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.problem_type(), "rollover-refused");
    assert_eq!(r.body["reason"], "not-signed-by-old-key");
    let r = put_key(
        &s,
        "/v1/accounts/not-an-account/key",
        json!({"public_key": b64(&public(&good))}),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(r.problem_type(), "no-account");
    let r = put(json!({"key": "x"})).await;
    assert_eq!(r.status, 400, "{:?}", r.body);

    // Nothing changed: the old key still logs in, and the good key still rolls over.
    assert_login_ok(&login(&s, &old).await, &old);
    let r = put(json!({"public_key": b64(&public(&good))})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

// ------------------------------------------------------------------------------------------------
// Removal
// ------------------------------------------------------------------------------------------------

async fn delete_with(s: &TestServer, path: &str, body: impl Into<reqwest::Body>) -> Reply {
    Reply::from(
        s.http
            .delete(s.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Moves the server's clock up to the wall clock: signatures (ours, gpg's) are made at the wall
/// clock's time, and the server does not accept a signature made after its own now.
fn catch_up(s: &TestServer) {
    let lag = chrono::Utc::now() - s.clock_now();
    if lag > chrono::TimeDelta::zero() {
        s.clock
            .advance(lag.to_std().unwrap() + Duration::from_secs(1));
    }
}

/// The removal request body, signed by `signer` for `account_jid` at server time + `skew`.
fn removal_body(s: &TestServer, signer: &Cert, account_jid: &str, nonce: &str, skew: i64) -> Value {
    catch_up(s);
    let timestamp = s.clock_now().timestamp() + skew;
    let message = removal_message(account_jid, timestamp, nonce);
    let signature = openpgp::sign_detached(signer, message.as_bytes()).unwrap();
    json!({
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": String::from_utf8(signature).unwrap(),
    })
}

async fn remove_signed(s: &TestServer, key: &Cert, nonce: &str, skew: i64) -> Reply {
    let body = removal_body(s, key, &jid(), nonce, skew);
    let r = delete_with(s, &account_path(), body.to_string()).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    r
}

fn assert_forbidden(r: &Reply, reason: &str) {
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.problem_type(), "forbidden");
    assert_eq!(r.body["reason"], reason, "{:?}", r.body);
}

#[tokio::test]
async fn a_signed_removal_removes_the_account_once() {
    let s = TestServer::start().await;
    let (secret, reply) = s.register(EMULATOR, false).await;
    let key = certified(&secret, &reply);
    assert_login_ok(&login(&s, &key).await, &key);
    let body = removal_body(&s, &key, &jid(), "once-only-nonce-0001", 0).to_string();
    let r = delete_with(&s, &account_path(), body.clone()).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(r.body, Value::Null);
    assert_refused(&login(&s, &key).await, "unknown-account");
    // Gone: the same request is refused as a bad signature would be.
    let r = delete_with(&s, &account_path(), body.clone()).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.body["reason"], "bad-signature");

    // Registered again with the same key, the identical request is a replay.
    let again = register_with(&s, EMULATOR, true, &secret).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    let r = delete_with(&s, &account_path(), body).await;
    assert_forbidden(&r, "replayed");
    assert_login_ok(&login(&s, &key).await, &key);

    // A binary signature, base64, with a fresh nonce.
    catch_up(&s);
    let timestamp = s.clock_now().timestamp();
    let nonce = "binary-signature-nonce";
    let message = removal_message(&jid(), timestamp, nonce);
    let armored_sig = openpgp::sign_detached(&key, message.as_bytes()).unwrap();
    let binary = dearmor(&armored_sig);
    let body = json!({"timestamp": timestamp, "nonce": nonce, "signature": b64(&binary)});
    let r = delete_with(&s, &account_path(), body.to_string()).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
}

fn dearmor(armored: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut reader = sequoia_openpgp::armor::Reader::from_bytes(
        armored,
        sequoia_openpgp::armor::ReaderMode::Tolerant(None),
    );
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    out
}

#[tokio::test]
async fn unauthorised_removals_are_refused() {
    let s = TestServer::start().await;
    let key = register(&s, false).await;
    let path = account_path();

    for skew in [-301i64, 301] {
        let body = removal_body(
            &s,
            &key,
            &jid(),
            &format!("stale-nonce-{}-0001", skew.unsigned_abs()),
            skew,
        );
        assert_forbidden(
            &delete_with(&s, &path, body.to_string()).await,
            "stale-timestamp",
        );
    }
    let stranger = user_key(&jid());
    let body = removal_body(&s, &stranger, &jid(), "stranger-nonce-0001", 0);
    assert_forbidden(
        &delete_with(&s, &path, body.to_string()).await,
        "bad-signature",
    );
    let other_account = format!("{}@localhost", "0".repeat(40));
    let body = removal_body(&s, &key, &other_account, "other-acct-nonce-01", 0);
    assert_forbidden(
        &delete_with(&s, &path, body.to_string()).await,
        "bad-signature",
    );
    let mut body = removal_body(&s, &key, &jid(), "garbled-signature-01", 0);
    body["signature"] =
        json!("-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n");
    assert_forbidden(
        &delete_with(&s, &path, body.to_string()).await,
        "bad-signature",
    );

    for nonce in ["short", "has spaces in the nonce", &"n".repeat(129)] {
        let body = removal_body(&s, &key, &jid(), nonce, 0);
        let r = delete_with(&s, &path, body.to_string()).await;
        assert_eq!(r.status, 400, "{nonce:?}: {:?}", r.body);
        assert_eq!(r.problem_type(), "bad-request");
    }
    let mut body = removal_body(&s, &key, &jid(), "not-base64-signature", 0);
    body["signature"] = json!("%%% not base64 %%%");
    let r = delete_with(&s, &path, body.to_string()).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    for bad in [
        "{",
        "{\"timestamp\": \"soon\", \"nonce\": \"x\", \"signature\": \"y\"}",
        "",
    ] {
        let r = delete_with(&s, &path, bad).await;
        assert_eq!(r.status, 400, "{bad:?}: {:?}", r.body);
        assert_eq!(r.problem_type(), "bad-request");
    }
    let body = removal_body(&s, &key, &jid(), "bad-account-id-0001", 0);
    let r = delete_with(&s, "/v1/accounts/NOT-HEX", body.to_string()).await;
    assert_eq!(r.status, 404, "{:?}", r.body);

    // Still there; a good request (300 s off is still inside the window) removes it.
    assert_login_ok(&login(&s, &key).await, &key);
    remove_signed(&s, &key, "finally-a-good-nonce", -300).await;
}

#[tokio::test]
async fn a_removal_signed_by_gpg_is_accepted() {
    if !gpg_available() {
        return;
    }
    let s = TestServer::start().await;
    let key = register(&s, false).await;
    let home = tempfile::tempdir().unwrap();
    let secret_file = home.path().join("secret.asc");
    std::fs::write(&secret_file, openpgp::secret_armored(&key).unwrap()).unwrap();
    gpg(home.path(), &["--import", secret_file.to_str().unwrap()]);

    catch_up(&s);
    let timestamp = s.clock_now().timestamp();
    let nonce = "signed-by-gnupg-0001";
    let message_file = home.path().join("message.txt");
    std::fs::write(&message_file, removal_message(&jid(), timestamp, nonce)).unwrap();
    let signature = gpg(
        home.path(),
        &[
            "--armor",
            "--local-user",
            &key.fingerprint().to_hex(),
            "--detach-sign",
            "--output",
            "-",
            message_file.to_str().unwrap(),
        ],
    );
    let body = json!({
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": signature,
    });
    let r = delete_with(&s, &account_path(), body.to_string()).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_refused(&login(&s, &key).await, "unknown-account");
}

// ------------------------------------------------------------------------------------------------
// Webhook events
// ------------------------------------------------------------------------------------------------

const WEBHOOK_SECRET: &str = "a-webhook-secret-123";

#[derive(Clone, Debug)]
struct Delivery {
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

/// A webhook receiver on loopback that records every POST and answers 500 to the first
/// `failures` of them.
async fn receiver(failures: usize) -> (String, Arc<Mutex<Vec<Delivery>>>) {
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let app = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let seen = seen.clone();
                    async move {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Delivery {
                            headers,
                            body: body.to_vec(),
                        });
                        if seen.len() <= failures {
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            axum::http::StatusCode::NO_CONTENT
                        }
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

async fn with_webhook(url: String) -> TestServer {
    TestServer::start_with(move |c| {
        c.events.webhook = Some((url, Some(Secret::new(WEBHOOK_SECRET))));
        c.settings.event_sinks = c.events.sinks();
    })
    .await
}

/// Waits (at most 15 s) until `seen` holds `n` deliveries; returns them.
async fn wait_for(seen: &Mutex<Vec<Delivery>>, n: usize) -> Vec<Delivery> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = seen.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} webhook deliveries arrived: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the delivery's signature and headers independently of the service's code; its body.
fn checked(d: &Delivery) -> Value {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(&d.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(d.headers["x-registrar-signature"], expected.as_str());
    assert_eq!(d.headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(
        d.headers["x-registrar-event"],
        body["type"].as_str().unwrap()
    );
    assert_eq!(
        d.headers["x-registrar-event-id"],
        body["id"].as_str().unwrap()
    );
    body
}

#[tokio::test]
async fn key_changes_and_removals_reach_the_webhook_signed() {
    let (url, seen) = receiver(0).await;
    let s = with_webhook(url).await;
    let first = register(&s, false).await;
    let second = register(&s, true).await;
    s.clock.advance(Duration::from_secs(120));
    let third = successor(&s, &second);
    let r = put_key(&s, &key_path(), json!({"public_key": b64(&public(&third))})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    remove_signed(&s, &certified(&third, &r), "webhook-removal-0001", 0).await;

    let deliveries = wait_for(&seen, 4).await;
    let events: Vec<Value> = deliveries.iter().map(checked).collect();
    let fp = |c: &Cert| json!(c.fingerprint().to_hex());
    let expected = [
        // The forced start, told to the owner of the first key, then its completion.
        ("reregistration-started", fp(&first), Value::Null),
        ("key-replaced", fp(&first), fp(&second)),
        ("key-rolled-over", fp(&second), fp(&third)),
        ("account-removed", fp(&third), Value::Null),
    ];
    // Registration, rollover and removal can share a second: find each by type.
    for (kind, old, new) in expected {
        let e = events
            .iter()
            .find(|e| e["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {events:?}"));
        assert_eq!(e["jid"], jid(), "{e:?}");
        assert_eq!(e["account"], EMULATOR_ACCOUNT);
        assert_eq!(e["old_fingerprint"], old, "{kind}");
        assert_eq!(e["new_fingerprint"], new, "{kind}");
        assert_eq!(e["id"].as_str().unwrap().len(), 32);
        chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap();
    }
    // Only the start's event carries a text for the owner.
    for e in &events {
        assert_eq!(
            e.get("text").is_some(),
            e["type"] == "reregistration-started",
            "{e:?}"
        );
    }
    let told = events
        .iter()
        .find(|e| e["type"] == "reregistration-started")
        .unwrap();
    assert!(
        told["text"].as_str().unwrap().contains("someone asked at"),
        "{told:?}"
    );
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!(ids.len(), 4, "each event once: {events:?}");
    // Nothing more arrives (each was acknowledged).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_failed_webhook_delivery_is_tried_again() {
    let (url, seen) = receiver(1).await;
    let s = with_webhook(url).await;
    let first = register(&s, false).await;
    let second = register(&s, true).await;

    // The forced start's event and the key replacement's: the first delivery fails.
    let failed = wait_for(&seen, 1).await;
    let event = checked(&failed[0]);
    assert_eq!(event["old_fingerprint"], first.fingerprint().to_hex());

    // The retry is due 5 s later by the server's clock; the worker looks every 5 s. The failure
    // is recorded after the receiver answered, so move the clock until the retry comes.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let retried = |seen: &Mutex<Vec<Delivery>>| {
        let seen = seen.lock().unwrap();
        seen.iter()
            .skip(1)
            .map(checked)
            .find(|e| e["id"] == event["id"])
    };
    let again = loop {
        if let Some(again) = retried(&seen) {
            break again;
        }
        assert!(std::time::Instant::now() < deadline, "no retry came");
        s.clock.advance(Duration::from_secs(6));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(again, event, "the same event, the same id");
    let all: Vec<Value> = seen.lock().unwrap().iter().map(checked).collect();
    let replaced = all
        .iter()
        .find(|e| e["type"] == "key-replaced")
        .expect("the key replacement's event");
    assert_eq!(replaced["new_fingerprint"], second.fingerprint().to_hex());
}

#[tokio::test]
async fn account_endpoints_do_not_tell_registered_numbers_apart_and_are_limited() {
    let s = TestServer::start_with(|c| {
        c.settings.account_requests_per_client = Some("6/1h".parse().unwrap());
    })
    .await;
    let (secret, reply) = s.register(EMULATOR, false).await;
    let key = certified(&secret, &reply);
    let unregistered = format!("/v1/accounts/{}", "1".repeat(40));
    // Garbage, a stranger's signature, a well-formed signature: a registered and an
    // unregistered account answer alike.
    let stranger = user_key(&jid());
    let now = s.clock_now().timestamp();
    for body in [
        json!({"timestamp": now, "nonce": "enumeration-probe-01", "signature": "AAAA"}),
        removal_body(&s, &stranger, &jid(), "enumeration-probe-02", 0),
    ] {
        let registered = delete_with(&s, &account_path(), body.to_string()).await;
        let other = delete_with(&s, &unregistered, body.to_string()).await;
        assert_eq!(registered.status, 403, "{:?}", registered.body);
        assert_eq!(
            (
                registered.status,
                registered.problem_type(),
                &registered.body["reason"]
            ),
            (other.status, other.problem_type(), &other.body["reason"]),
            "{:?} / {:?}",
            registered.body,
            other.body
        );
    }
    // Rollover alike: a key the account's key did not certify.
    let fresh = user_key(&jid());
    let registered = put_key(&s, &key_path(), json!({"public_key": b64(&public(&fresh))})).await;
    let other_jid = format!("{}@localhost", "1".repeat(40));
    let other_key = user_key(&other_jid);
    let other = put_key(
        &s,
        &format!("{unregistered}/key"),
        json!({"public_key": b64(&public(&other_key))}),
    )
    .await;
    assert_eq!(
        (
            registered.status,
            registered.problem_type(),
            &registered.body["reason"]
        ),
        (other.status, other.problem_type(), &other.body["reason"])
    );
    // Six requests on accounts per client an hour here: the seventh waits, before anything is
    // parsed, and says until when.
    let r = delete_with(
        &s,
        &account_path(),
        "{\"timestamp\": 1, \"nonce\": \"x\", \"signature\": \"y\"}",
    )
    .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert!(r.retry_after().is_some());
    let _ = key;
}

#[tokio::test]
async fn old_rollover_proofs_are_not_replayed_and_retired_keys_do_not_return() {
    let s = TestServer::start().await;
    let first = register(&s, false).await;
    s.clock.advance(Duration::from_secs(120));
    let second = successor(&s, &first);
    let proof = json!({"public_key": b64(&public(&second))});
    let r = put_key(&s, &key_path(), proof.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // An hour later the user goes back to the first key by registering it again (SMS).
    s.clock.advance(Duration::from_secs(3600));
    let back = register_with(&s, EMULATOR, true, &first).await;
    assert_eq!(back.status, 200, "{:?}", back.body);
    // Whoever kept the old proof cannot roll the account over to the second key with it.
    let replayed = put_key(&s, &key_path(), proof).await;
    assert_eq!(replayed.status, 422, "{:?}", replayed.body);
    assert_eq!(replayed.body["reason"], "not-signed-by-old-key");
    // Nor with a fresh proof: the account retired that key.
    let fresh = openpgp::cross_certify(&first, &second, &jid(), now(&s)).unwrap();
    let retired = put_key(&s, &key_path(), json!({"public_key": b64(&public(&fresh))})).await;
    assert_eq!(retired.status, 422, "{:?}", retired.body);
    assert_eq!(retired.body["reason"], "retired-key");
    // A new key, handed over now, is fine.
    s.clock.advance(Duration::from_secs(120));
    let third = successor(&s, &first);
    let r = put_key(&s, &key_path(), json!({"public_key": b64(&public(&third))})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}
