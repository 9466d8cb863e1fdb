//! The binary as a newcomer uses it: `serve` on embedded defaults, `client register` against it,
//! reading the code from the development outbox; plus `keygen`, `export-server-key`, `migrate`
//! and refusals of bad configuration.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

#[test]
fn serve_logs_no_codes_or_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let [port] = free_ports();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve", "--http", &addr])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let served = Process(child, "kontalk-registrar");
    wait_for_health(port);
    let client = http_client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = client
            .post(format!("http://{addr}/v1/verifications"))
            .json(&serde_json::json!({"phone": EMULATOR}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    });
    let code = outbox_code(&dir.path().join("data/outbox.jsonl"), EMULATOR).unwrap();
    // SIGTERM: graceful shutdown.
    let pid = served.0.id();
    Command::new("kill").arg(pid.to_string()).status().unwrap();
    let lines = lines.join().unwrap();
    let log = lines.join("\n");
    assert!(log.contains("verification started"), "{log}");
    assert!(!log.contains(&code), "a code reached the log:\n{log}");
    assert!(
        !log.contains("5555215554"),
        "a number reached the log:\n{log}"
    );
    let secret = std::fs::read_to_string(dir.path().join("data/server-secret")).unwrap();
    assert!(!log.contains(secret.trim()));
    drop(served);
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
