//! End to end with real software: a real Prosody (Debian's package) with an anonymous virtual
//! host and our component, the real `kontalk-registrar` binary as that component, slixmpp (PyPI)
//! as the client and GnuPG for the keys. An anonymous user's `<remove/>` is forbidden; a user
//! with a password on a second virtual host is the service's `events.xmpp_to` and receives the
//! event of a forced re-registration as a message. Prosody is restarted mid-way: the component
//! must reconnect and the next registration succeed.
//!
//! `scripts/test` installs Prosody and a virtualenv with slixmpp; on CI their absence fails the
//! test instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Process, free_ports, wait_for_health, wait_for_port};

const BIN: &str = env!("CARGO_BIN_EXE_kontalk-registrar");
const SECRET: &str = "e2e-component-secret";

/// The tools, or `None` (skip) outside CI.
pub(crate) fn tools() -> Option<(PathBuf, PathBuf)> {
    let prosody = which("prosody");
    let python = std::env::var_os("KONTALK_E2E_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-venv/bin/python");
            p.exists().then_some(p)
        });
    match (prosody, python) {
        (Some(p), Some(py)) => Some((p, py)),
        missing => {
            assert!(
                std::env::var_os("CI").is_none(),
                "prosody or the slixmpp virtualenv is missing on CI ({missing:?}): run scripts/test"
            );
            eprintln!("prosody or slixmpp missing: skipping (scripts/test installs them)");
            None
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn prosody_config(dir: &Path, c2s: u16, component: u16) -> PathBuf {
    let data = dir.join("prosody-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let config = dir.join("prosody.cfg.lua");
    std::fs::write(
        &config,
        format!(
            r#"run_as_root = true
pidfile = "{dir}/prosody.pid"
data_path = "{data}"
plugin_paths = {{}}
certificates = "{dir}/certs"
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
c2s_direct_tls_ports = {{}}
s2s_ports = {{}}
component_interfaces = {{ "127.0.0.1" }}
component_ports = {{ {component} }}
http_ports = {{}}
https_ports = {{}}
modules_enabled = {{ "disco"; "ping"; "saslauth"; "posix"; }}
modules_disabled = {{ "s2s" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
storage = "internal"
log = {{ debug = "{dir}/prosody.log"; }}

VirtualHost "localhost"
    authentication = "anonymous"

VirtualHost "events.localhost"
    authentication = "internal_plain"

Component "register.localhost"
    component_secret = "{SECRET}"
"#,
            dir = dir.display(),
            data = data.display(),
        ),
    )
    .unwrap();
    config
}

/// The user that receives the events (`tests/xmpp/e2e_client.py` logs in as it).
const WATCHER: (&str, &str, &str) = ("watcher", "events.localhost", "watcher-password");

fn register_watcher(prosody: &Path, config: &Path) {
    let prosodyctl = prosody.with_file_name("prosodyctl");
    let out = Command::new(&prosodyctl)
        .arg("--config")
        .arg(config)
        .args(["register", WATCHER.0, WATCHER.1, WATCHER.2])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prosodyctl register: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_prosody(prosody: &Path, config: &Path, c2s: u16, component: u16) -> Process {
    let child = Command::new(prosody)
        .args(["-F", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Process(child, "prosody");
    wait_for_port(c2s, "prosody c2s");
    wait_for_port(component, "prosody component port");
    p
}

fn client(python: &Path, phase: &str, c2s: u16, outbox: &Path, http: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xmpp/e2e_client.py");
    let out = Command::new(python)
        .arg(&script)
        .args([phase, &c2s.to_string(), "register.localhost"])
        .arg(outbox)
        .arg(http)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains(&format!("PASS {phase}")),
        "slixmpp client phase {phase} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn registration_through_prosody_with_slixmpp_and_a_server_restart() {
    let Some((prosody, python)) = tools() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let [c2s, component, http, other_http] = free_ports();
    let config = prosody_config(dir.path(), c2s, component);
    register_watcher(&prosody, &config);
    let server = start_prosody(&prosody, &config, c2s, component);

    let data = dir.path().join("registrar-data");
    let registrar_config = dir.path().join("registrar.toml");
    std::fs::write(
        &registrar_config,
        format!(
            "data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [xmpp.component]\nserver = \"127.0.0.1:{component}\"\njid = \"register.localhost\"\n\
             ping_interval_seconds = 5\n\
             [events]\nxmpp_to = \"{}@{}\"\n",
            WATCHER.0,
            WATCHER.1,
            data = data.to_str().unwrap()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("registrar.log")).unwrap();
    // In the PostgreSQL pass of scripts/test, the component's database is PostgreSQL too.
    let database = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(crate::harness::postgres_database());
    let mut registrar = Command::new(BIN);
    if let Some(url) = &database {
        registrar.env("REGISTRAR_DATABASE__URL", url);
    }
    let registrar = registrar
        .args(["serve", "--config"])
        .arg(&registrar_config)
        .env("REGISTRAR_XMPP__COMPONENT__SECRET", SECRET)
        .env("RUST_LOG", "info,kontalk_registrar::xmpp=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let registrar = Process(registrar, "kontalk-registrar");
    wait_for_health(http);
    let base = format!("http://127.0.0.1:{http}");
    let outbox = data.join("outbox.jsonl");

    client(&python, "flow", c2s, &outbox, &base);
    client(&python, "remove", c2s, &outbox, &base);
    client(&python, "events", c2s, &outbox, &base);

    // A quiet spell of more than two ping intervals: the keepalive holds the link.
    std::thread::sleep(Duration::from_secs(12));
    client(&python, "quiet", c2s, &outbox, &base);
    let log_path = dir.path().join("registrar.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches("XMPP component connected").count(), 1, "{log}");
    assert!(!log.contains("link lost"), "{log}");

    // A second instance with a wrong secret is refused, says so, and retries.
    let wrong = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&registrar_config)
        .args(["--http", &format!("127.0.0.1:{other_http}")])
        .args(["--data-dir"])
        .arg(dir.path().join("wrong-data"))
        .env("REGISTRAR_XMPP__COMPONENT__SECRET", "not-the-secret")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("wrong.log")).unwrap())
        .spawn()
        .unwrap();
    let wrong = Process(wrong, "kontalk-registrar (wrong secret)");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(dir.path().join("wrong.log")).unwrap();
        if log.matches("the XMPP server refused the component").count() >= 2 {
            assert!(log.contains("check xmpp.component.secret"), "{log}");
            assert!(
                !log.contains("not-the-secret"),
                "the secret reached the log"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no clear, retried refusal:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(wrong);

    // Restart the XMPP server under the component.
    drop(server);
    let server = start_prosody(&prosody, &config, c2s, component);
    client(&python, "restart", c2s, &outbox, &base);

    drop(registrar);
    drop(server);
    // KONTALK_E2E_KEEP_LOG=FILE keeps the service log of the run for a look.
    if let Some(keep) = std::env::var_os("KONTALK_E2E_KEEP_LOG") {
        std::fs::copy(&log_path, keep).unwrap();
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("XMPP component disconnected"),
        "graceful shutdown closes the stream: {log}"
    );
    assert!(
        log.contains("reconnecting") || log.matches("XMPP component connected").count() >= 2,
        "{log}"
    );
    assert!(
        !log.contains(SECRET),
        "the component secret reached the log"
    );
    assert!(!log.contains("5555215554"), "a number reached the log");
}
