//! A stock Prosody (Debian's package) made a Kontalk server by the modules in `prosody/`, with
//! the service behind it, driven by clients the project did not write into its protocol logic:
//! `tests/xmpp/kontalk_client.py`, which follows Kontalk's protocol document and its Android
//! client's sequence stanza by stanza (GnuPG keys, bridge certificates byte for byte as
//! Kontalk's `X509Bridge` writes them, Python's `ssl`, slixmpp for the chat), and `client
//! register --xmpp` of the real binary (rustls, tokio-xmpp's XML stream).
//!
//! Prosody listens on loopback with STARTTLS required, asks for client certificates without
//! requiring one, relays registration to the service (`POST /v1/xmpp/relay`, bearer token), asks
//! it about every login (SASL EXTERNAL), and receives its events by signed webhook. The service
//! runs in-process with a manual clock (to pass resend waits and expiries without sleeping) and
//! the development provider, whose outbox the clients read the codes from.
//!
//! `scripts/test` installs Prosody, GnuPG, OpenSSL and the virtualenv; on CI their absence fails
//! the tests instead of skipping them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kontalk_registrar::config::Secret;
use registrar_providers::{Challenge, DevelopmentProvider, Provider};
use serde_json::Value;

use crate::harness::*;
use crate::xmpp_e2e::tools;

const BIN: &str = env!("CARGO_BIN_EXE_kontalk-registrar");
const TOKEN: &str = "e2e-relay-token-0123456789";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-0123";

/// A Kontalk server on one machine: Prosody and the service.
struct Kontalk {
    server: Option<TestServer>,
    /// The service's base URL (kept when it is stopped).
    base: String,
    _prosody: Process,
    c2s: u16,
    python: PathBuf,
    outbox: PathBuf,
    /// The server certificate Prosody presents (self-signed, for `localhost`).
    ca: PathBuf,
    dir: tempfile::TempDir,
}

/// One JSON line of the Python client's output per step.
struct Steps(Vec<Value>);

impl Steps {
    /// The last line of `step`.
    fn get(&self, step: &str) -> &Value {
        self.0
            .iter()
            .rev()
            .find(|v| v["step"] == step)
            .unwrap_or_else(|| panic!("no {step} step in {:#?}", self.0))
    }

    fn ok(&self, step: &str) -> &Value {
        let v = self.get(step);
        assert_eq!(v["ok"], true, "{step} failed: {v:#}");
        v
    }

    /// `condition` of a refused step.
    fn refused(&self, step: &str) -> String {
        let v = self.get(step);
        assert_eq!(v["ok"], false, "{step} was not refused: {v:#}");
        let error = if v["error"].is_null() {
            &v["answer"]["error"]
        } else {
            &v["error"]
        };
        error["condition"].as_str().unwrap_or_default().to_owned()
    }
}

fn openssl_server_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let cnf = dir.join("openssl.cnf");
    std::fs::write(
        &cnf,
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = localhost\n[ext]\n\
         basicConstraints = critical,CA:FALSE\nsubjectAltName = DNS:localhost\n\
         keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    let (crt, key) = (dir.join("localhost.crt"), dir.join("localhost.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-extensions", "ext", "-config"])
        .arg(&cnf)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (crt, key)
}

/// Prosody's configuration: the example in `prosody/kontalk.cfg.lua.example`, on test ports and
/// paths.
fn prosody_config(
    dir: &Path,
    c2s: u16,
    http: u16,
    registrar: &str,
    cert: (&Path, &Path),
) -> PathBuf {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("prosody");
    let data = dir.join("prosody-data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.join("prosody.cfg.lua");
    std::fs::write(
        &config,
        format!(
            r#"run_as_root = true
pidfile = "{dir}/prosody.pid"
data_path = "{data}"
plugin_paths = {{ "{modules}" }}
log = {{ debug = "{dir}/prosody.log"; }}
modules_enabled = {{ "tls"; "saslauth"; "roster"; "disco"; "ping"; "offline"; "posix" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ {http} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{ }}
http_default_host = "localhost"

VirtualHost "localhost"
    ssl = {{ certificate = "{crt}"; key = "{key}" }}
    c2s_ssl = {{ verify = {{ "peer", "client_once" }}; verifyext = {{ "lsec_continue", "lsec_ignore_purpose" }} }}
    c2s_require_encryption = true
    authentication = "kontalk"
    modules_enabled = {{ "kontalk_register"; "kontalk_events" }}
    modules_disabled = {{ "register"; "invites_register"; "invites_adhoc"; "invites" }}
    kontalk_registrar_url = "{registrar}"
    kontalk_registrar_token = "{TOKEN}"
    kontalk_registrar_timeout = 30
    kontalk_events_secret = "{WEBHOOK_SECRET}"
"#,
            dir = dir.display(),
            data = data.display(),
            modules = modules.display(),
            crt = cert.0.display(),
            key = cert.1.display(),
        ),
    )
    .unwrap();
    config
}

impl Kontalk {
    /// Starts the service, then Prosody in front of it; `None` (skip) outside CI without tools.
    async fn start() -> Option<Self> {
        let (prosody, python) = tools()?;
        let dir = tempfile::tempdir().unwrap();
        let [c2s, http] = free_ports();
        let outbox = dir.path().join("outbox.jsonl");
        let development: Arc<dyn Provider> = Arc::new(DevelopmentProvider::new(
            "development",
            outbox.clone(),
            "12345",
            "+1555000",
            vec![Challenge::Pin, Challenge::Voice, Challenge::MissedCall],
        ));
        let webhook = format!("http://127.0.0.1:{http}/kontalk_events");
        let server = TestServer::start_on(0, vec![development], move |c| {
            // Only the token opens the link: Prosody is on loopback, but must prove itself.
            c.login.allowed_ips = Vec::new();
            c.login.bearer_token = Some(Secret::new(TOKEN));
            c.events.webhook = Some((webhook, Some(Secret::new(WEBHOOK_SECRET))));
            c.settings.event_sinks = c.events.sinks();
        })
        .await;
        let (crt, key) = openssl_server_certificate(dir.path());
        let config = prosody_config(dir.path(), c2s, http, &server.base, (&crt, &key));
        let child = Command::new(&prosody)
            .args(["-F", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let prosody = Process(child, "prosody");
        wait_for_port(c2s, "prosody c2s");
        wait_for_port(http, "prosody http");
        Some(Self {
            base: server.base.clone(),
            server: Some(server),
            _prosody: prosody,
            c2s,
            python,
            outbox,
            ca: crt,
            dir,
        })
    }

    fn server(&self) -> &TestServer {
        self.server.as_ref().unwrap()
    }

    fn home(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// Runs the Python client; its steps. Exit 0 means the exchange completed, refusals
    /// included.
    async fn kc(&self, args: &[&str]) -> Steps {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xmpp/kontalk_client.py");
        let mut command = Command::new(&self.python);
        command
            .arg(&script)
            .args(["--port", &self.c2s.to_string(), "--domain", "localhost"])
            .args(["--http", &self.base])
            .args(args);
        // A blocking child on the blocking pool: the service runs on this test's runtime.
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kontalk_client.py {args:?} exited {:?}:\n{stdout}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        Steps(
            stdout
                .lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }

    /// A variant of `home`'s bridge certificate (`kontalk_client.py cert --variant`, for the
    /// refusals): the certificate file and its key file.
    async fn variant(&self, home: &str, variant: &str) -> (String, String) {
        let crt = self.home(&format!("{variant}.crt.pem"));
        let key = self.home(&format!("{variant}.key.pem"));
        self.kc(&[
            "cert",
            "--home",
            home,
            "--variant",
            variant,
            "--out",
            &crt,
            "--key-out",
            &key,
        ])
        .await
        .ok("cert");
        (crt, key)
    }

    /// Registers `phone` as the Android client does and logs in with the certified key.
    async fn register(&self, home: &str, phone: &str, key: &str, extra: &[&str]) -> Steps {
        let outbox = self.outbox.to_str().unwrap().to_owned();
        let mut args = vec![
            "register", "--home", home, "--phone", phone, "--outbox", &outbox, "--type", key,
            "--login",
        ];
        args.extend_from_slice(extra);
        let steps = self.kc(&args).await;
        let login = steps.ok("login");
        assert_eq!(login["jid_matches"], true, "{login:#}");
        assert_eq!(login["sasl_initial_response"], "=");
        // Only EXTERNAL, or Kontalk's client (Smack 4.3) would pick a password mechanism.
        assert_eq!(
            login["mechanisms"],
            serde_json::json!(["EXTERNAL"]),
            "{login:#}"
        );
        steps
    }
}

fn account_jid(phone: &str) -> String {
    use sha1::Digest as _;
    format!("{}@localhost", hex::encode(sha1::Sha1::digest(phone)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kontalk_clients_register_log_in_and_chat_through_prosody() {
    let Some(k) = Kontalk::start().await else {
        return;
    };
    // Both kinds of bridge certificate: Ed25519, and RSA-2048 signed with SHA-1 as Android does.
    let (a, b) = (k.home("a"), k.home("b"));
    let steps = k.register(&a, "+15555215554", "ed25519", &[]).await;
    // Step 1 before login on a TLS stream without certificate; step 2 with the bridge
    // certificate of the uncertified key (which OpenSSL refuses to load the usual way).
    let instructions = steps.ok("instructions");
    assert_eq!(instructions["register_feature"], true);
    // A stream without a client certificate is offered no SASL mechanism at all.
    assert_eq!(
        instructions["mechanisms"],
        serde_json::json!([]),
        "{instructions:#}"
    );
    assert_eq!(steps.ok("request")["sender"], "12345");
    let code = steps.ok("code");
    assert_eq!(code["tls"]["client_certificate"], true);
    assert!(
        code["tls"]["certificate_loading"]
            .as_str()
            .unwrap()
            .contains("INVALID_CERTIFICATE"),
        "{code:#}"
    );
    assert_eq!(
        code["certified"], true,
        "GnuPG sees our certification: {code:#}"
    );
    let login = steps.ok("login");
    assert!(
        login["jid"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/", account_jid("+15555215554")))
    );
    k.register(&b, "+15555215556", "rsa", &[]).await;
    // The two accounts chat through Prosody (slixmpp, SASL EXTERNAL).
    let chat = k.kc(&["chat", "--home", &a, "--to-home", &b]).await;
    let chat = chat.ok("chat");
    assert_eq!(chat["received_from"], chat["from"], "{chat:#}");

    // The binary's own Kontalk client, with the CA checked, and a key pack.
    let keys = k.dir.path().join("keys");
    let pack = k.dir.path().join("kontalk-keys.zip");
    let passphrase = k.dir.path().join("passphrase");
    std::fs::write(&passphrase, "pack passphrase\n").unwrap();
    let phone = "+15555215558";
    let before = std::fs::read_to_string(&k.outbox).unwrap().lines().count();
    let mut client = Command::new(BIN)
        .args([
            "client",
            "register",
            phone,
            "--xmpp",
            &format!("127.0.0.1:{}", k.c2s),
        ])
        .args([
            "--xmpp-domain",
            "localhost",
            "--xmpp-ca",
            k.ca.to_str().unwrap(),
        ])
        .args([
            "--server",
            &k.server().base,
            "--out",
            keys.to_str().unwrap(),
        ])
        .args(["--keypack", pack.to_str().unwrap()])
        .args(["--passphrase-file", passphrase.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let code = loop {
        let text = std::fs::read_to_string(&k.outbox).unwrap();
        if text.lines().count() > before {
            let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(line["to"], phone);
            break line["code"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    {
        use std::io::Write as _;
        let mut stdin = client.stdin.take().unwrap();
        writeln!(stdin, "{code}").unwrap();
    }
    let out = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jid = account_jid(phone);
    assert!(stdout.contains(&format!("logged in as {jid}/")), "{stdout}");
    // The pack's certificate logs in to Prosody from the Python client.
    let unpacked = k.dir.path().join("unpacked");
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&pack)
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success());
    let (crt, key) = (
        unpacked.join("kontalk-login.crt"),
        unpacked.join("kontalk-login.key"),
    );
    let login = k
        .kc(&[
            "login",
            "--home",
            &k.home("pack"),
            "--cert",
            crt.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
        .await;
    let login = login.ok("login");
    assert!(
        login["jid"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{jid}/")),
        "{login:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_end_sessions_and_their_keys_stop_logging_in() {
    let Some(k) = Kontalk::start().await else {
        return;
    };
    let (first, second) = (k.home("first"), k.home("second"));
    let phone = "+15555215554";
    let steps = k.register(&first, phone, "ed25519", &[]).await;
    let old_fingerprint = steps.ok("code")["fingerprint"].as_str().unwrap().to_owned();
    // The first device stays logged in while a second device registers the number.
    let held = {
        let first = first.clone();
        let k = &k;
        async move { k.kc(&["login", "--home", &first, "--hold", "25"]).await }
    };
    let second_device = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Past the first verification's resend wait.
        k.server().clock.advance(Duration::from_secs(120));
        let refused = k
            .kc(&[
                "register",
                "--home",
                &second,
                "--phone",
                phone,
                "--outbox",
                k.outbox.to_str().unwrap(),
                "--type",
                "ed25519",
            ])
            .await;
        assert_eq!(refused.refused("request"), "conflict");
        k.register(&second, phone, "ed25519", &["--force"]).await
    };
    let (held, _) = tokio::join!(held, second_device);
    let held = held.ok("login");
    assert_eq!(
        held["closed_by_server"]["condition"], "not-authorized",
        "the first device's session was not closed for its replaced key: {held:#}"
    );
    // Before that, the forced start was told to the account: a chat message from the server.
    let told = held["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["type"] == "chat" && m["from"] == "localhost")
        .unwrap_or_else(|| panic!("no message about the re-registration: {held:#}"));
    assert!(
        told["body"].as_str().unwrap().contains("someone asked at"),
        "{told:#}"
    );
    // The first device's key no longer logs in; the second's does.
    let again = k
        .kc(&["login", "--home", &first, "--fingerprint", &old_fingerprint])
        .await;
    assert_eq!(again.refused("login"), "not-authorized");

    // From the logged-in session: the registered get, a rollover, and removal.
    let registered = k.kc(&["registered-get", "--home", &second]).await;
    assert_eq!(registered.ok("registered-get")["registered"], true);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&second).join("state.json")).unwrap(),
    )
    .unwrap();
    let second_key = state["fingerprint"].as_str().unwrap().to_owned();
    let rolled = k.kc(&["rollover", "--home", &second]).await;
    rolled.ok("rollover");
    let old = k
        .kc(&["login", "--home", &second, "--fingerprint", &second_key])
        .await;
    assert_eq!(
        old.refused("login"),
        "not-authorized",
        "the rolled-over key"
    );
    k.kc(&["login", "--home", &second]).await.ok("login");
    // As Kontalk's Android client rolls over: a new key the old one did not certify, with the
    // old key's revocation, from the session of the old key.
    let android = k
        .kc(&["rollover", "--home", &second, "--no-certify", "--revoked"])
        .await;
    android.ok("rollover");
    k.kc(&["login", "--home", &second]).await.ok("login");
    let removed = k.kc(&["remove", "--home", &second]).await;
    removed.ok("remove");
    let gone = k.kc(&["login", "--home", &second]).await;
    assert_eq!(gone.refused("login"), "not-authorized", "a removed account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_end_to_end_and_the_service_stopped() {
    let Some(mut k) = Kontalk::start().await else {
        return;
    };
    let (a, b) = (k.home("a"), k.home("b"));
    let phone = "+15555215554";
    k.kc(&[
        "keygen", "--home", &a, "--phone", phone, "--type", "ed25519",
    ])
    .await
    .ok("keygen");
    k.kc(&["request", "--phone", phone]).await.ok("request");
    // A wrong code.
    let wrong = k
        .kc(&["submit-code", "--home", &a, "--code", "000000"])
        .await;
    assert_eq!(wrong.refused("code"), "bad-request");
    // A certificate whose key differs from the key in its extension.
    let (mismatch, mismatch_key) = k.variant(&a, "mismatch").await;
    let step2 = "<iq type='set'><query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' \
                 type='submit'><field var='FORM_TYPE' type='hidden'><value>\
                 http://kontalk.org/protocol/register#code</value></field><field var='code'>\
                 <value>123456</value></field></x></query></iq>";
    let invalid = k
        .kc(&[
            "raw",
            "--stanza",
            step2,
            "--with-cert",
            "--cert",
            &mismatch,
            "--key",
            &mismatch_key,
        ])
        .await;
    let answer = invalid.get("raw");
    assert_eq!(
        answer["answer"]["error"]["condition"], "bad-request",
        "{answer:#}"
    );
    assert_eq!(answer["answer"]["error"]["text"], "Invalid public key.");
    // The bridge certificate of another account finds nothing pending for it.
    k.kc(&[
        "keygen",
        "--home",
        &b,
        "--phone",
        "+15555215556",
        "--type",
        "ed25519",
    ])
    .await
    .ok("keygen");
    let other = k
        .kc(&["raw", "--stanza", step2, "--home", &b, "--with-cert"])
        .await;
    assert_eq!(
        other.get("raw")["answer"]["error"]["condition"],
        "item-not-found"
    );
    // An uncertified key, and a certificate of another domain, do not log in.
    let uncertified = k.kc(&["login", "--home", &a]).await;
    assert_eq!(uncertified.refused("login"), "not-authorized");
    // Past the first verification's resend wait, the number registers with a new key.
    k.server().clock.advance(Duration::from_secs(120));
    k.register(&a, phone, "ed25519", &["--new-key"]).await;
    let (elsewhere, elsewhere_key) = k.variant(&a, "other-domain").await;
    let foreign = k
        .kc(&[
            "login",
            "--home",
            &a,
            "--cert",
            &elsewhere,
            "--key",
            &elsewhere_key,
        ])
        .await;
    assert_eq!(foreign.refused("login"), "not-authorized");

    // The service stops: logins fail (never open), registration answers an error, Prosody
    // stays up.
    k.server.take().unwrap().stop().await;
    let login = k.kc(&["login", "--home", &a]).await;
    assert_eq!(login.refused("login"), "temporary-auth-failure");
    let form = k.kc(&["instructions"]).await;
    assert_eq!(form.refused("instructions"), "service-unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_key_to_a_new_device_through_prosody() {
    let Some(k) = Kontalk::start().await else {
        return;
    };
    let (old, new) = (k.home("old"), k.home("new"));
    let phone = "+15555215554";
    k.register(&old, phone, "ed25519", &[]).await;
    let uploaded = k
        .kc(&[
            "upload-key",
            "--home",
            &old,
            "--passphrase",
            "transfer words",
        ])
        .await;
    let token = uploaded.ok("upload-key")["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(token.len(), 40);
    // The new device: before login, the key with the token; GnuPG opens it with the
    // passphrase, and it logs in.
    let retrieved = k
        .kc(&[
            "retrieve-key",
            "--home",
            &new,
            "--token",
            &token,
            "--passphrase",
            "transfer words",
            "--phone",
            phone,
            "--login",
        ])
        .await;
    retrieved.ok("retrieve-key");
    retrieved.ok("login");
    // Used once.
    let reused = k
        .kc(&[
            "retrieve-key",
            "--home",
            &k.home("third"),
            "--token",
            &token,
            "--passphrase",
            "transfer words",
        ])
        .await;
    assert_eq!(reused.refused("retrieve-key"), "item-not-found");
    // Expired after 15 minutes.
    let again = k
        .kc(&[
            "upload-key",
            "--home",
            &old,
            "--passphrase",
            "transfer words",
        ])
        .await;
    let token = again.ok("upload-key")["token"].as_str().unwrap().to_owned();
    k.server().clock.advance(Duration::from_secs(15 * 60 + 1));
    let expired = k
        .kc(&[
            "retrieve-key",
            "--home",
            &k.home("fourth"),
            "--token",
            &token,
            "--passphrase",
            "transfer words",
        ])
        .await;
    assert_eq!(expired.refused("retrieve-key"), "item-not-found");
}
