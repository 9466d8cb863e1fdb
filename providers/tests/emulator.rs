//! The Android emulator provider against a fake console on 127.0.0.1 that speaks the console
//! protocol: banner (with or without the authentication request), `auth`, `sms send`, `quit`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use registrar_providers::emulator::{EmulatorConfig, EmulatorProvider};
use registrar_providers::{Challenge, DeliveredCode, ErrorKind, Outgoing, Provider};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const TOKEN: &str = "aB3dEf/gH1jK+lMn";

/// The banner of a console that wants a token, as the emulator prints it.
const AUTH_BANNER: &str = "Android Console: Authentication required\r\n\
    Android Console: type 'auth <auth_token>' to authenticate\r\n\
    Android Console: you can find your <auth_token> in\r\n\
    '/home/dev/.emulator_console_auth_token'\r\n\
    OK\r\n";
const READY: &str = "Android Console: type 'help' for a list of commands\r\nOK\r\n";

struct FakeConsole {
    port: u16,
    /// Every line received, with its line ending.
    lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl FakeConsole {
    /// A console that requires `token` (if any) and answers `sms send` with `sms_reply`.
    async fn start(token: Option<&str>, sms_reply: &str) -> FakeConsole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let recorded = lines.clone();
        let token = token.map(str::to_owned);
        let sms_reply = format!("{sms_reply}\r\n");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut authenticated = token.is_none();
            let banner = if authenticated { READY } else { AUTH_BANNER };
            write.write_all(banner.as_bytes()).await.unwrap();
            loop {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                recorded.lock().unwrap().push(line.clone());
                let command = line.trim_end();
                let answer = if let Some(given) = command.strip_prefix("auth ") {
                    if Some(given) == token.as_deref() {
                        authenticated = true;
                        READY.to_owned()
                    } else {
                        "KO: authentication token does not match \
                         ~/.emulator_console_auth_token\r\n"
                            .to_owned()
                    }
                } else if command == "quit" {
                    break;
                } else if !authenticated {
                    "KO: unknown command, try 'help'\r\n".to_owned()
                } else if command.starts_with("sms send ") {
                    sms_reply.clone()
                } else {
                    "KO: unknown command, try 'help'\r\n".to_owned()
                };
                write.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        FakeConsole { port, lines, task }
    }

    /// The lines received, once the client hung up.
    async fn received(self) -> Vec<String> {
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the console conversation ended")
            .unwrap();
        self.lines.lock().unwrap().clone()
    }
}

fn token_file(dir: &Path, content: &str) -> PathBuf {
    let path = dir.join("auth_token");
    std::fs::write(&path, content).unwrap();
    path
}

fn provider(port: u16, token_file: Option<PathBuf>) -> EmulatorProvider {
    EmulatorProvider::new(EmulatorConfig {
        port,
        // A file that does not exist unless a test gives one: never the developer's real token.
        auth_token_file: Some(token_file.unwrap_or_else(|| PathBuf::from("/nonexistent/token"))),
        ..EmulatorConfig::default()
    })
    .unwrap()
}

fn outgoing(text: &str) -> Outgoing {
    Outgoing {
        to: "+15555215554".into(),
        challenge: Challenge::Pin,
        code: "123456".into(),
        text: text.into(),
        reference: "ver-1".into(),
        valid_for: Duration::from_secs(600),
        locale: None,
    }
}

#[tokio::test]
async fn authenticates_then_sends_the_sms() {
    let dir = tempfile::tempdir().unwrap();
    let console = FakeConsole::start(Some(TOKEN), "OK").await;
    let p = provider(
        console.port,
        Some(token_file(dir.path(), &format!("{TOKEN}\n"))),
    );
    let d = p
        .send(&outgoing("Your Kontalk code: 123456"))
        .await
        .unwrap();
    assert_eq!(d.sender, "12345");
    assert_eq!(d.code, DeliveredCode::Ours);
    assert_eq!(d.provider_ref, None);
    assert_eq!(
        console.received().await,
        [
            format!("auth {TOKEN}\r\n"),
            "sms send 12345 Your Kontalk code: 123456\r\n".to_owned(),
            "quit\r\n".to_owned(),
        ]
    );
    assert_eq!(p.name(), "emulator");
    assert_eq!(p.challenges(), &[Challenge::Pin]);
}

#[tokio::test]
async fn no_auth_when_the_console_does_not_ask() {
    let dir = tempfile::tempdir().unwrap();
    let console = FakeConsole::start(None, "OK").await;
    let p = EmulatorProvider::new(EmulatorConfig {
        name: "emu".into(),
        port: console.port,
        sender: "+15555215556".into(),
        auth_token_file: Some(token_file(dir.path(), TOKEN)),
        timeout_seconds: 5,
    })
    .unwrap();
    let d = p.send(&outgoing("code 654321")).await.unwrap();
    assert_eq!(d.sender, "+15555215556");
    assert_eq!(
        console.received().await,
        ["sms send +15555215556 code 654321\r\n", "quit\r\n"]
    );
}

#[tokio::test]
async fn wrong_token_is_permanent_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let console = FakeConsole::start(Some(TOKEN), "OK").await;
    let p = provider(console.port, Some(token_file(dir.path(), "wr0ng-t0ken\n")));
    let e = p.send(&outgoing("code 1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("authentication"), "{e}");
    assert!(e.message.contains("does not match"), "{e}");
    assert!(!format!("{e} {e:?} {p:?}").contains("wr0ng-t0ken"), "{e}");
    // No SMS after a refused token.
    assert_eq!(console.received().await, ["auth wr0ng-t0ken\r\n"]);
}

#[tokio::test]
async fn missing_or_empty_token_file_is_permanent() {
    let console = FakeConsole::start(Some(TOKEN), "OK").await;
    let p = provider(console.port, None);
    let e = p.send(&outgoing("code 1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("/nonexistent/token"), "{e}");
    assert!(console.received().await.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let console = FakeConsole::start(Some(TOKEN), "OK").await;
    let p = provider(console.port, Some(token_file(dir.path(), " \n")));
    let e = p.send(&outgoing("code 1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("empty"), "{e}");
    assert!(console.received().await.is_empty());
}

#[tokio::test]
async fn console_not_running_is_transient() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = provider(port, None);
    let e = p.send(&outgoing("code 1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(
        e.message
            .contains(&format!("is the emulator running on port {port}?")),
        "{e}"
    );
}

#[tokio::test]
async fn multi_line_text_is_flattened_and_backslashes_escaped() {
    let console = FakeConsole::start(None, "OK").await;
    let p = provider(console.port, None);
    p.send(&outgoing(
        "Your code:\r\n123456\nValid 10 min.\r\\o/ ünï 🎉\n",
    ))
    .await
    .unwrap();
    assert_eq!(
        console.received().await,
        [
            "sms send 12345 Your code: 123456 Valid 10 min. \\\\o/ ünï 🎉\r\n",
            "quit\r\n"
        ]
    );
}

#[tokio::test]
async fn ko_reply_is_permanent_with_the_reason() {
    let console = FakeConsole::start(None, "KO: modem emulation not running").await;
    let p = provider(console.port, None);
    let e = p.send(&outgoing("code 1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("modem emulation not running"), "{e}");
    assert_eq!(e.provider, "emulator");
    assert_eq!(console.received().await, ["sms send 12345 code 1\r\n"]);
}

#[tokio::test]
async fn silent_console_times_out_transiently() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and says nothing.
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(stream);
    });
    let p = EmulatorProvider::new(EmulatorConfig {
        port,
        timeout_seconds: 1,
        auth_token_file: Some(PathBuf::from("/nonexistent/token")),
        ..EmulatorConfig::default()
    })
    .unwrap();
    let started = std::time::Instant::now();
    let e = p.send(&outgoing("code 1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    task.abort();
}

#[tokio::test]
async fn only_pin_is_delivered() {
    let p = provider(5554, None);
    let mut m = outgoing("code 1");
    m.challenge = Challenge::Voice;
    let e = p.send(&m).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
}

#[test]
fn configuration_is_validated() {
    let bad = |c: EmulatorConfig, expect: &str| {
        let e = EmulatorProvider::new(c).unwrap_err();
        assert!(e.contains(expect), "{expect}: {e}");
    };
    bad(
        EmulatorConfig {
            sender: "KONTALK".into(),
            ..EmulatorConfig::default()
        },
        "sender",
    );
    bad(
        EmulatorConfig {
            sender: "123 45".into(),
            ..EmulatorConfig::default()
        },
        "sender",
    );
    bad(
        EmulatorConfig {
            port: 0,
            ..EmulatorConfig::default()
        },
        "port",
    );
    bad(
        EmulatorConfig {
            timeout_seconds: 0,
            ..EmulatorConfig::default()
        },
        "timeout_seconds",
    );
    bad(
        EmulatorConfig {
            name: " ".into(),
            ..EmulatorConfig::default()
        },
        "name",
    );
}

#[test]
fn configuration_shape_and_default_token_file() {
    let c: EmulatorConfig = serde_json::from_value(serde_json::json!({"port": 5556})).unwrap();
    assert_eq!(c.name, "emulator");
    assert_eq!(c.port, 5556);
    assert_eq!(c.sender, "12345");
    assert_eq!(c.auth_token_file, None);
    assert_eq!(c.timeout_seconds, 5);
    assert!(
        serde_json::from_value::<EmulatorConfig>(serde_json::json!({"host": "10.0.0.1"})).is_err()
    );
    let p = EmulatorProvider::new(c).unwrap();
    assert_eq!(p.port(), 5556);
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        assert_eq!(
            p.auth_token_file(),
            Some(
                PathBuf::from(home)
                    .join(".emulator_console_auth_token")
                    .as_path()
            )
        );
    }
}
