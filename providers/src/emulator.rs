//! The Android emulator: "delivers" an SMS by injecting it through the emulator console, the
//! telnet-like text protocol on `127.0.0.1:<port>` (5554 for `emulator-5554`), so that a
//! developer registers a Kontalk client running in the emulator end to end.
//!
//! The conversation: on connect the console prints a banner ending with a line `OK`; when it says
//! `Android Console: Authentication required`, the provider sends `auth <token>` with the trimmed
//! content of `~/.emulator_console_auth_token` (or `auth_token_file`) and expects `OK`; then
//! `sms send <sender> <text>` answered by `OK` or `KO: <reason>`; then `quit`. Lines end with
//! CRLF. The text travels on one line: line breaks and other control characters become spaces,
//! and a backslash is sent as `\\` (the console reads `\n`, `\xNN`, `\uNNNN` and `\\` escapes and
//! refuses any other backslash).
//!
//! The token is never logged nor put in an error.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::{Challenge, DeliveredCode, Delivery, ErrorKind, Outgoing, Provider, ProviderError};

/// The banner line of a console that wants `auth <token>` first.
const AUTH_REQUIRED: &str = "Authentication required";
/// The longest console line read; longer lines are cut.
const MAX_LINE: u64 = 8192;
/// The most lines of one reply (the banner is five).
const MAX_REPLY_LINES: usize = 64;

fn default_name() -> String {
    "emulator".into()
}
fn default_port() -> u16 {
    5554
}
fn default_sender() -> String {
    "12345".into()
}
fn default_timeout_seconds() -> u64 {
    5
}

/// The emulator console provider (`[[providers]] kind = "android_emulator"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Name in logs and routing; default `emulator`.
    #[serde(default = "default_name")]
    pub name: String,
    /// The console port on 127.0.0.1; default 5554 (`emulator-5554`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// The number the SMS comes from, shown to the client: digits with an optional leading `+`;
    /// default `12345`.
    #[serde(default = "default_sender")]
    pub sender: String,
    /// The console's auth token file; default `$HOME/.emulator_console_auth_token`. Read at each
    /// delivery, only when the console asks for authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token_file: Option<PathBuf>,
    /// Timeout of the whole console conversation, in seconds; default 5.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            name: default_name(),
            port: default_port(),
            sender: default_sender(),
            auth_token_file: None,
            timeout_seconds: default_timeout_seconds(),
        }
    }
}

/// Injects PIN SMS into an Android emulator through its console.
#[derive(Debug)]
pub struct EmulatorProvider {
    name: String,
    port: u16,
    sender: String,
    token_file: Option<PathBuf>,
    timeout: Duration,
}

/// How the console answered a command.
enum Reply {
    /// `OK`, after these lines.
    Ok(Vec<String>),
    /// `KO: <reason>`.
    Ko(String),
}

/// One console connection.
struct Console {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Console {
    /// Reads lines up to `OK` or `KO...`.
    async fn reply(&mut self) -> Result<Reply, String> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut raw)
                .await
                .map_err(|e| format!("reading from the console: {e}"))?;
            if n == 0 {
                return Err("the console closed the connection".into());
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.trim() == "OK" {
                return Ok(Reply::Ok(lines));
            }
            if let Some(reason) = line.strip_prefix("KO") {
                let reason = reason.trim_start_matches(':').trim();
                return Ok(Reply::Ko(crate::http::excerpt(reason)));
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err("the console does not answer OK or KO".into());
            }
            lines.push(line.to_owned());
        }
    }

    async fn send(&mut self, command: &str) -> Result<(), String> {
        let line = format!("{command}\r\n");
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("writing to the console: {e}"))?;
        self.writer
            .flush()
            .await
            .map_err(|e| format!("writing to the console: {e}"))
    }
}

/// The message as one console line: line breaks (CRLF, LF or CR) and other control characters
/// become one space each, backslashes are escaped, surrounding whitespace goes.
pub fn console_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\r' if chars.peek() == Some(&'\n') => {}
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.trim().to_owned()
}

/// Whether `sender` is what the console accepts as an originating number: `[+](0-9)+`.
fn valid_sender(sender: &str) -> bool {
    let digits = sender.strip_prefix('+').unwrap_or(sender);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Why a conversation failed.
enum Failure {
    Transient(String),
    Permanent(String),
}

impl EmulatorProvider {
    /// Validates `config` and builds the provider. Nothing is contacted yet.
    pub fn new(config: EmulatorConfig) -> Result<Self, String> {
        let name = config.name.trim();
        if name.is_empty() {
            return Err("provider: name must not be empty".into());
        }
        let what = |field: &str| format!("provider {name}: {field}");
        if config.port == 0 {
            return Err(format!("{}: must not be 0", what("port")));
        }
        if !valid_sender(&config.sender) {
            return Err(format!(
                "{}: the emulator console takes digits with an optional leading + (\"12345\", \
                 \"+15555215556\")",
                what("sender")
            ));
        }
        if config.timeout_seconds == 0 {
            return Err(format!("{}: must be at least 1", what("timeout_seconds")));
        }
        let token_file = config.auth_token_file.or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|home| PathBuf::from(home).join(".emulator_console_auth_token"))
        });
        Ok(Self {
            name: config.name,
            port: config.port,
            sender: config.sender,
            token_file,
            timeout: Duration::from_secs(config.timeout_seconds),
        })
    }

    /// The console port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The token file read when the console asks for authentication, if any.
    pub fn auth_token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    /// The trimmed token, or why there is none.
    async fn token(&self) -> Result<String, Failure> {
        let Some(path) = &self.token_file else {
            return Err(Failure::Permanent(
                "the console requires authentication, but no auth_token_file is configured \
                 and HOME is not set"
                    .into(),
            ));
        };
        let content = tokio::fs::read_to_string(path).await.map_err(|e| {
            Failure::Permanent(format!(
                "the console requires authentication, but {} cannot be read: {e}",
                path.display()
            ))
        })?;
        let token = content.trim();
        if token.is_empty() {
            return Err(Failure::Permanent(format!(
                "the console requires authentication, but {} is empty",
                path.display()
            )));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Failure::Permanent(format!(
                "{} does not hold a single token",
                path.display()
            )));
        }
        Ok(token.to_owned())
    }

    async fn converse(&self, text: &str) -> Result<(), Failure> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .map_err(|e| {
                Failure::Transient(format!(
                    "cannot connect to the emulator console on 127.0.0.1:{port} ({e}): is the \
                     emulator running on port {port}?",
                    port = self.port
                ))
            })?;
        let (reader, writer) = stream.into_split();
        let mut console = Console {
            reader: BufReader::new(reader),
            writer,
        };
        let banner = match console.reply().await.map_err(Failure::Transient)? {
            Reply::Ok(lines) => lines,
            Reply::Ko(reason) => {
                return Err(Failure::Permanent(format!(
                    "the console refused us: {reason}"
                )));
            }
        };
        if banner.iter().any(|l| l.contains(AUTH_REQUIRED)) {
            let token = self.token().await?;
            console
                .send(&format!("auth {token}"))
                .await
                .map_err(Failure::Transient)?;
            if let Reply::Ko(reason) = console.reply().await.map_err(Failure::Transient)? {
                let file = self
                    .token_file
                    .as_deref()
                    .map(|p| format!(" (token from {})", p.display()))
                    .unwrap_or_default();
                return Err(Failure::Permanent(format!(
                    "console authentication failed{file}: {reason}"
                )));
            }
        }
        console
            .send(&format!("sms send {} {}", self.sender, console_text(text)))
            .await
            .map_err(Failure::Transient)?;
        if let Reply::Ko(reason) = console.reply().await.map_err(Failure::Transient)? {
            return Err(Failure::Permanent(format!(
                "the console refused the SMS: {reason}"
            )));
        }
        // The SMS is in; a failed goodbye changes nothing.
        let _ = console.send("quit").await;
        Ok(())
    }
}

#[async_trait]
impl Provider for EmulatorProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn challenges(&self) -> &[Challenge] {
        &[Challenge::Pin]
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        if message.challenge != Challenge::Pin {
            return Err(ProviderError::new(
                &self.name,
                ErrorKind::Unsupported,
                format!(
                    "the emulator console only injects SMS, not {}",
                    message.challenge
                ),
            ));
        }
        match tokio::time::timeout(self.timeout, self.converse(&message.text)).await {
            Ok(Ok(())) => {
                tracing::debug!(
                    provider = %self.name,
                    port = self.port,
                    reference = %message.reference,
                    "SMS injected into the emulator"
                );
                Ok(Delivery {
                    sender: self.sender.clone(),
                    instructions: None,
                    provider_ref: None,
                    code: DeliveredCode::Ours,
                })
            }
            Ok(Err(Failure::Transient(m))) => {
                Err(ProviderError::new(&self.name, ErrorKind::Transient, m))
            }
            Ok(Err(Failure::Permanent(m))) => {
                Err(ProviderError::new(&self.name, ErrorKind::Permanent, m))
            }
            Err(_) => Err(ProviderError::new(
                &self.name,
                ErrorKind::Transient,
                format!(
                    "the emulator console on port {} did not answer within {} s",
                    self.port,
                    self.timeout.as_secs()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_becomes_one_escaped_line() {
        assert_eq!(console_text("a\r\nb\nc\rd\te"), "a b c d e");
        assert_eq!(console_text("C:\\path \u{e8}\n"), "C:\\\\path \u{e8}");
    }

    #[test]
    fn senders_are_digits() {
        assert!(valid_sender("12345") && valid_sender("+15555215556"));
        assert!(!valid_sender("") && !valid_sender("+") && !valid_sender("KONTALK"));
        assert!(!valid_sender("123 45"));
    }

    #[test]
    fn defaults() {
        let c: EmulatorConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(c, EmulatorConfig::default());
        assert_eq!(
            (c.port, c.sender.as_str(), c.timeout_seconds),
            (5554, "12345", 5)
        );
        let e = serde_json::from_value::<EmulatorConfig>(serde_json::json!({"prot": 1}));
        assert!(e.is_err());
    }
}
