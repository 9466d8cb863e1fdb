//! The binary as a newcomer uses it: `serve` on embedded defaults, `client register` against it,
//! reading the code from the development outbox; plus `keygen`, `export-server-key`, `migrate`,
//! `abuse report` and `abuse unblock`, refusals of bad configuration, and what `serve` logs.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kontalk_registrar::registrar::abuse::Cost;

use crate::gpg::gpg_available;
use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_kontalk-registrar");

/// Runs `serve` in `dir` (as the working directory, so `./data` is inside it).
fn serve(dir: &Path, extra: &[&str]) -> (Process, String) {
    let [port] = free_ports();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .current_dir(dir)
        .args(["serve", "--http", &addr])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let served = Process(child, "kontalk-registrar");
    wait_for_health(port);
    (served, format!("http://{addr}"))
}

fn outbox_code(outbox: &Path, phone: &str) -> Option<String> {
    let text = std::fs::read_to_string(outbox).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["to"] == phone)
        .map(|v| v["code"].as_str().unwrap().to_owned())
}

#[test]
fn newcomer_serves_defaults_and_registers_with_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[]);
    let data = dir.path().join("data");
    assert!(
        data.join("server-key.asc").exists(),
        "a development key was generated"
    );
    assert!(data.join("server-secret").exists());
    assert!(data.join("registrar.db").exists());

    let out = dir.path().join("keys");
    let mut client = Command::new(BIN)
        .args([
            "client",
            "register",
            "+1 555 521 5554",
            "--server",
            &url,
            "--out",
        ])
        .arg(&out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The client asks for the code; a person reads it from the outbox (or the console).
    let outbox = data.join("outbox.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(c) = outbox_code(&outbox, EMULATOR) {
            break c;
        }
        assert!(Instant::now() < deadline, "no code in the outbox");
        std::thread::sleep(Duration::from_millis(50));
    };
    writeln!(client.stdin.take().unwrap(), "{code}").unwrap();
    let result = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        stdout.contains(&format!("registered {EMULATOR_ACCOUNT}@localhost")),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("Verification code:"), "{stderr}");

    let public = std::fs::read(out.join(format!("{EMULATOR_ACCOUNT}.pub.gpg"))).unwrap();
    let cert = kontalk_registrar::openpgp::parse_cert(&public).unwrap();
    let server = std::fs::read(data.join("server-key.asc")).unwrap();
    let server = kontalk_registrar::openpgp::parse_cert(&server).unwrap();
    assert!(kontalk_registrar::openpgp::has_certification(
        &cert,
        &server,
        &format!("{EMULATOR_ACCOUNT}@localhost")
    ));
    let secret = out.join(format!("{EMULATOR_ACCOUNT}.key.asc"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        kontalk_registrar::openpgp::parse_cert(&std::fs::read(&secret).unwrap())
            .unwrap()
            .is_tsk()
    );

    // Registering again without --force is a conflict the client explains.
    let again = Command::new(BIN)
        .args([
            "client", "register", EMULATOR, "--server", &url, "--code", "000000", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // With --force and a code given up front (read from the outbox once it is sent), the
    // client replaces the key; a wrong code given up front is reported, not retried.
    let wrong = Command::new(BIN)
        .args([
            "client", "register", EMULATOR, "--server", &url, "--force", "--code", "1", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("wrong code"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

#[test]
fn keygen_and_export_server_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("server.asc");
    let out = Command::new(BIN)
        .args(["keygen", "--domain", "example.org", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let fpr = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(fpr.len(), 40);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let again = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen never overwrites a key");

    let config = dir.path().join("registrar.toml");
    std::fs::write(
        &config,
        format!("[server]\nkey_file = {:?}\n", key.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["export-server-key", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    assert!(!text.contains("PRIVATE"));
    let cert = kontalk_registrar::openpgp::parse_cert(text.as_bytes()).unwrap();
    assert_eq!(cert.fingerprint().to_hex(), fpr);
}

#[test]
fn migrate_creates_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["migrate", "--data-dir", "d"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("d/registrar.db").exists());
}

#[test]
fn bad_configuration_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[http]\nlisen = \"127.0.0.1:1\"\n", "lisen"),
        (
            "[verification]\ncode_length = 12\n",
            "verification.code_length",
        ),
        ("mode = \"production\"\n", "server.key_file"),
    ];
    for (toml, key) in cases {
        let config = dir.path().join("c.toml");
        std::fs::write(&config, toml).unwrap();
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve"])
        .env("REGISTRAR_SERVER__SECRET", "too-short-secret-value")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.secret") && !stderr.contains("too-short-secret-value"),
        "{stderr}"
    );
}

/// A code of the same length that is not `code`.
fn wrong_code(code: &str) -> String {
    code.bytes()
        .map(|b| char::from(b'0' + (b - b'0' + 1) % 10))
        .collect()
}

#[test]
fn serve_logs_pseudonyms_never_numbers_addresses_or_codes() {
    let dir = tempfile::tempdir().unwrap();
    let [port] = free_ports();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve", "--http", &addr])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read_all = |pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            BufReader::new(pipe)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let served = Process(child, "kontalk-registrar");
    wait_for_health(port);
    let outbox = dir.path().join("data/outbox.jsonl");
    let client = http_client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        let base = format!("http://{addr}/v1/verifications");
        let started = Reply::from(
            client
                .post(&base)
                .json(&serde_json::json!({"phone": EMULATOR}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(started.status, 201, "{:?}", started.body);
        let id = started.body["id"].as_str().unwrap().to_owned();
        let jid = started.body["account"].as_str().unwrap().to_owned();
        let key = b64(&public(&user_key(&jid)));
        let code = outbox_code(&outbox, EMULATOR).unwrap();
        let submit = |code: String| {
            client
                .post(format!("{base}/{id}/code"))
                .json(&serde_json::json!({"code": code, "public_key": key}))
                .send()
        };
        let wrong = Reply::from(submit(wrong_code(&code)).await.unwrap()).await;
        assert_eq!(wrong.problem_type(), "wrong-code", "{:?}", wrong.body);
        let right = Reply::from(submit(code.clone()).await.unwrap()).await;
        assert!(right.status < 300, "{:?}", right.body);
        code
    });
    // SIGTERM: graceful shutdown, which closes both pipes.
    Command::new("kill")
        .arg(served.0.id().to_string())
        .status()
        .unwrap();
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    drop(served);
    let log = stderr.join("\n");

    // Standard output is the development provider's delivery channel: the console stands in for
    // the user's phone, so the number and the message with its code are meant to be there.
    let console = stdout.join("\n");
    assert!(
        console.contains("+15555215554") && console.contains(&code),
        "stdout: {console}"
    );

    // Standard error is the log (tracing): it names numbers and clients by keyed hash only.
    assert!(log.contains("kontalk-registrar is ready"), "{log}");
    assert!(log.contains("wrong code"), "{log}");
    let started: Vec<&String> = stderr
        .iter()
        .filter(|l| l.contains("verification started"))
        .collect();
    assert_eq!(started.len(), 1, "{log}");
    let pseudonym = started[0]
        .split_whitespace()
        .find_map(|f| f.strip_prefix("phone="))
        .unwrap_or_else(|| panic!("no phone field: {}", started[0]));
    assert!(
        pseudonym.len() == 16 && pseudonym.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        started[0]
    );
    for line in &stderr {
        assert!(
            !line.contains("5555215554"),
            "a number reached the log: {line}"
        );
        // The timestamp's fractional seconds could match a code by chance: look past it.
        let message = line.split_once(' ').map_or(line.as_str(), |(_, m)| m);
        assert!(
            !message.contains(&code) && !message.contains(&wrong_code(&code)),
            "a code reached the log: {line}"
        );
        // The client's address: only the ready line names 127.0.0.1, as the listen address.
        if line.contains("127.0.0.1") {
            assert!(
                line.contains("kontalk-registrar is ready")
                    && line.matches("127.0.0.1").count() == 1
                    && line.contains(&format!("http={addr}")),
                "a client address reached the log: {line}"
            );
        }
    }
    let secret = std::fs::read_to_string(dir.path().join("data/server-secret")).unwrap();
    assert!(!log.contains(secret.trim()));
}

/// Runs `kontalk-registrar abuse <args> --config <config> --data-dir <data>` on database `db`.
fn abuse(args: &[&str], config: &Path, data: &Path, db: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .current_dir(data)
        .arg("abuse")
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("REGISTRAR_DATABASE__URL", db)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "{args:?}: {:?}\n{stdout}{stderr}",
        out.status
    );
    (out.status.success(), format!("{stdout}{stderr}"))
}

/// The lines of `report` from the one starting with `title` to the next blank line.
fn section<'a>(report: &'a str, title: &str) -> Vec<&'a str> {
    report
        .lines()
        .skip_while(|l| !l.starts_with(title))
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

fn fields(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test]
async fn abuse_report_shows_spend_caps_and_blocks_and_unblock_lifts_a_block() {
    let server = TestServer::start_with(|c| {
        c.settings.abuse.costs = vec![Cost {
            provider: "capture".into(),
            country: "39".into(),
            price: 0.05,
        }];
    })
    .await;
    for phone in ["+393471234567", "+393201234567"] {
        let r = server.start_verification(phone, false).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let db = server.db_url.clone();
    // The UTC day the messages were counted on (by the server's clock).
    let today = server.clock_now().format("%Y-%m-%d").to_string();
    let data = server.stop().await;
    execute(
        &db,
        "INSERT INTO blocks (scope, until, reason, created_at) \
         VALUES ('prefix:4479111', 4102444800, 'test', 0)",
    )
    .await;
    execute(
        &db,
        "INSERT INTO blocks (scope, measure, until, reason, created_at) \
         VALUES ('country:44', 'call', 4102444800, 'few', 86400)",
    )
    .await;
    // The operator's configuration: prices come from it (not from the database), as do caps.
    let config = data.path().join("operator.toml");
    std::fs::write(
        &config,
        "[abuse]\ncurrency = \"USD\"\n\
         [abuse.caps]\ndaily_total = 100\n\
         [[abuse.costs]]\nprovider = \"capture\"\ncountry = \"+39\"\nprice = 0.05\n",
    )
    .unwrap();
    let (data, config) = (data.path(), config.as_path());

    let (ok, report) = abuse(&["report"], config, data, &db);
    assert!(ok, "{report}");
    let spend = section(&report, "Messages sent, last 7 UTC day(s)");
    let row = spend
        .iter()
        .find(|l| l.contains("capture"))
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(
        fields(row),
        [
            &today, "capture", "+39", "IT/VA", "pin", "2", "0.1000", "USD"
        ],
        "{report}"
    );
    let total = spend.iter().find(|l| l.starts_with("total")).unwrap();
    assert_eq!(fields(total), ["total", "2", "0.1000", "USD"], "{report}");

    let caps = section(&report, "Daily caps, today");
    assert!(caps[0].contains(&today), "{report}");
    let country = caps.iter().find(|l| l.starts_with("country")).unwrap();
    assert_eq!(
        fields(country),
        ["country", "+39", "IT/VA", "2", "2000"],
        "{report}"
    );
    let total = caps.iter().find(|l| l.starts_with("total")).unwrap();
    assert_eq!(fields(total), ["total", "2", "100"], "{report}");

    let blocks = section(&report, "Pumping measures");
    assert!(
        blocks.iter().any(|l| fields(l)
            == [
                "+4479111",
                "block",
                "1970-01-01T00:00:00Z",
                "2100-01-01T00:00:00Z",
                "test"
            ]),
        "{report}"
    );
    assert!(
        blocks.iter().any(|l| fields(l)
            == [
                "+44",
                "(country)",
                "call",
                "1970-01-02T00:00:00Z",
                "2100-01-01T00:00:00Z",
                "few"
            ]),
        "{report}"
    );
    // The country's missed calls are lifted by its calling code.
    let (ok, out) = abuse(&["unblock", "+44"], config, data, &db);
    assert!(ok && out.contains("+44: pumping measure lifted"), "{out}");

    let (ok, out) = abuse(&["unblock", "+4479111"], config, data, &db);
    assert!(
        ok && out.contains("+4479111: pumping measure lifted"),
        "{out}"
    );
    let (ok, report) = abuse(&["report", "--days", "1"], config, data, &db);
    assert!(ok, "{report}");
    assert!(!report.contains("4479111"), "{report}");
    assert_eq!(section(&report, "Pumping measures")[1].trim(), "(none)");
    // Lifting it again says there was nothing to lift, and succeeds.
    let (ok, out) = abuse(&["unblock", "4479111"], config, data, &db);
    assert!(
        ok && out.contains("+4479111: had no pumping measure"),
        "{out}"
    );
    let (ok, out) = abuse(&["unblock", "44-79"], config, data, &db);
    assert!(!ok && out.contains("not an E.164 prefix"), "{out}");
}

#[test]
fn provider_test_sends_one_message_through_the_named_provider() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["provider", "test", "development", "+1 555 521 5554"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("development accepted the pin for +15555215554"),
        "{stdout}"
    );
    let code = outbox_code(&dir.path().join("data/outbox.jsonl"), EMULATOR).unwrap();
    assert!(
        stdout.contains(&format!("the code sent is {code}")),
        "{stdout}"
    );

    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["provider", "test", "nobody", EMULATOR])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no provider is named \"nobody\" (configured: development)"),
        "{stderr}"
    );
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["provider", "test", "development", "garbage"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Runs `client register` against `url`, typing the code the development outbox receives.
fn register_with_client(url: &str, outbox: &Path, out: &Path, force: bool) -> String {
    let force: &[&str] = if force { &["--force"] } else { &[] };
    register_with_client_args(url, outbox, out, force)
}

/// [`register_with_client`] with more arguments.
fn register_with_client_args(url: &str, outbox: &Path, out: &Path, extra: &[&str]) -> String {
    let before = std::fs::read_to_string(outbox)
        .unwrap_or_default()
        .lines()
        .count();
    let mut client = Command::new(BIN)
        .args(["client", "register", EMULATOR, "--server", url, "--out"])
        .arg(out)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        let text = std::fs::read_to_string(outbox).unwrap_or_default();
        if text.lines().count() > before {
            break outbox_code(outbox, EMULATOR).unwrap();
        }
        assert!(Instant::now() < deadline, "no new code in the outbox");
        std::thread::sleep(Duration::from_millis(50));
    };
    writeln!(client.stdin.take().unwrap(), "{code}").unwrap();
    let result = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    stdout
}

/// `login-cert verify` in `dir` (whose `./data` the server uses); exit status and stdout.
fn login_cert_verify(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, String) {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(["login-cert", "verify"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_client_writes_a_login_certificate_that_openssl_reads_and_login_cert_verify_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[]);
    let outbox = dir.path().join("data/outbox.jsonl");
    let out = dir.path().join("keys");
    let stdout = register_with_client(&url, &outbox, &out, false);
    let cert = out.join(format!("{EMULATOR_ACCOUNT}.crt.pem"));
    let key = out.join(format!("{EMULATOR_ACCOUNT}.crt.key.pem"));
    assert!(
        stdout.contains(&format!("login certificate {}", cert.display())),
        "{stdout}"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the certificate's key is private");

    // OpenSSL reads the certificate, and the key file is the certificate's key.
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let text = openssl(&["x509", "-in", cert_s, "-noout", "-text"]);
    assert!(
        text.contains("O=OpenPGP to X.509 Bridge") || text.contains("O = OpenPGP to X.509 Bridge"),
        "{text}"
    );
    assert!(
        text.contains("2.25.49058212633447845622587297037800555803"),
        "{text}"
    );
    assert_eq!(
        openssl(&["x509", "-in", cert_s, "-noout", "-pubkey"]),
        openssl(&["pkey", "-in", key_s, "-pubout"]),
    );

    let jid = format!("{EMULATOR_ACCOUNT}@localhost");
    let (ok, said) = login_cert_verify(dir.path(), &[cert_s], None);
    assert!(ok, "{said}");
    assert!(said.contains(&format!("accepted {jid}")), "{said}");
    let (ok, said) = login_cert_verify(
        dir.path(),
        &["--json", "-"],
        Some(&std::fs::read(&cert).unwrap()),
    );
    assert!(ok, "{said}");
    let v: serde_json::Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
    assert_eq!(v["jid"], jid.as_str());
    assert_eq!(v["account"], EMULATOR_ACCOUNT);

    // A forced re-registration replaces the key: the old certificate no longer logs in.
    let old = dir.path().join("old.crt.pem");
    std::fs::copy(&cert, &old).unwrap();
    register_with_client(&url, &outbox, &out, true);
    let (ok, said) = login_cert_verify(dir.path(), &[old.to_str().unwrap()], None);
    assert!(!ok, "{said}");
    assert!(said.contains("refused key-replaced"), "{said}");
    let (ok, said) = login_cert_verify(dir.path(), &[cert_s], None);
    assert!(ok, "the new certificate logs in: {said}");

    // Garbage is refused with the check that failed, in JSON too.
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (ok, said) = login_cert_verify(dir.path(), &["--json", garbage.to_str().unwrap()], None);
    assert!(!ok);
    let v: serde_json::Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
    assert_eq!(v["check"], "malformed", "{said}");
    let (ok, said) = login_cert_verify(dir.path(), &["/nonexistent/cert.pem"], None);
    assert!(!ok);
    assert!(said.contains("cannot read"), "{said}");
}

/// Runs `program` with `args`; its exit status and its output (stdout then stderr).
fn run(program: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_client_writes_a_key_pack_that_gnupg_openssl_and_the_login_check_read() {
    if !gpg_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(dir.path(), &[]);
    let outbox = dir.path().join("data/outbox.jsonl");
    let out = dir.path().join("keys");
    let pack = dir.path().join("kontalk-keys.zip");
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    let stdout = register_with_client_args(
        &url,
        &outbox,
        &out,
        &[
            "--keypack",
            pack.to_str().unwrap(),
            "--passphrase-file",
            passphrase.to_str().unwrap(),
            "--rsa",
        ],
    );
    assert!(
        stdout.contains(&format!("key pack {}", pack.display())),
        "{stdout}"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&pack).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the key pack holds a private key");

    // Unzipped by Python's zipfile, not by the crate that wrote it.
    let unpacked = dir.path().join("unpacked");
    let (ok, said) = run(
        "python3",
        &[
            "-m",
            "zipfile",
            "-e",
            pack.to_str().unwrap(),
            unpacked.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(ok, "{said}");
    let mut names: Vec<String> = std::fs::read_dir(&unpacked)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = kontalk_registrar::client::keypack::ENTRIES
        .map(str::to_owned)
        .to_vec();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(
        std::fs::read_to_string(unpacked.join("account-info.properties")).unwrap(),
        format!("phoneNumber={EMULATOR}\n")
    );

    // GnuPG imports both keys; the secret key opens with the passphrase only.
    let home = tempfile::tempdir().unwrap();
    let file = |name: &str| unpacked.join(name).to_str().unwrap().to_owned();
    let (public_asc, private_asc) = (file("kontalk-public.asc"), file("kontalk-private.asc"));
    let (message, signature) = (file("message"), file("message.sig"));
    let gpg_with = |pass: &str, args: &[&str]| crate::gpg::gpg_with(home.path(), pass, args);
    let (ok, _, said) = gpg_with("", &["--import", &public_asc]);
    assert!(ok, "{said}");
    let (ok, _, said) = gpg_with("", &["--import", &private_asc]);
    assert!(ok, "{said}");
    assert!(said.contains("secret keys imported: 1"), "{said}");
    std::fs::write(&message, "hello").unwrap();
    let (ok, _, _) = gpg_with("wrong", &["--yes", "--detach-sign", &message]);
    assert!(!ok, "a wrong passphrase must not open the secret key");
    let (ok, _, said) = gpg_with(
        "correct horse battery staple",
        &["--yes", "--detach-sign", &message],
    );
    assert!(ok, "{said}");
    let (ok, _, said) = gpg_with("", &["--verify", &signature, &message]);
    assert!(ok && said.contains("Good signature"), "{said}");

    // OpenSSL reads the PKCS#12 with the passphrase; its key is the login key.
    let pass_arg = format!("file:{}", passphrase.display());
    let (ok, _) = run(
        "openssl",
        &[
            "pkcs12",
            "-in",
            "kontalk-login.p12",
            "-passin",
            "pass:wrong",
            "-nokeys",
        ],
        &unpacked,
    );
    assert!(!ok, "a wrong passphrase must not open the PKCS#12");
    let (ok, said) = run(
        "openssl",
        &[
            "pkcs12",
            "-in",
            "kontalk-login.p12",
            "-passin",
            &pass_arg,
            "-nodes",
            "-out",
            "p12.pem",
        ],
        &unpacked,
    );
    assert!(ok, "{said}");
    let (_, from_p12) = run("openssl", &["pkey", "-in", "p12.pem", "-pubout"], &unpacked);
    let (_, from_key) = run(
        "openssl",
        &["pkey", "-in", "kontalk-login.key", "-pubout"],
        &unpacked,
    );
    assert!(from_key.contains("BEGIN PUBLIC KEY"), "{from_key}");
    assert_eq!(from_p12, from_key);

    // The pack's certificate, in Kontalk's own layout, passes the login check.
    let (ok, said) = login_cert_verify(
        dir.path(),
        &[unpacked.join("kontalk-login.crt").to_str().unwrap()],
        None,
    );
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("accepted {EMULATOR_ACCOUNT}@localhost")),
        "{said}"
    );
}
