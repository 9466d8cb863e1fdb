//! The development provider: "delivers" by appending a JSON line to an outbox file and printing a
//! line on the console, so that a developer can register without any gateway. The console line
//! shows the code: that is this provider's delivery channel, not a log line of the service.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::Serialize;

use crate::{Challenge, DeliveredCode, Delivery, ErrorKind, Outgoing, Provider, ProviderError};

/// Writes every challenge to `<data dir>/outbox.jsonl` (one JSON object a line: `to`, `channel`,
/// `challenge`, `sender`, `text`, `code`, `reference`) and prints it.
pub struct DevelopmentProvider {
    name: String,
    sender: String,
    caller_prefix: String,
    outbox: PathBuf,
    challenges: Vec<Challenge>,
    print: bool,
    // Serialises appends so that concurrent deliveries never interleave their lines.
    lock: Mutex<()>,
}

#[derive(Serialize)]
struct OutboxLine<'a> {
    to: &'a str,
    channel: &'a str,
    challenge: Challenge,
    sender: &'a str,
    text: &'a str,
    code: &'a str,
    reference: &'a str,
}

impl DevelopmentProvider {
    /// A provider named `name` that appends to `outbox`, shows `sender` as the SMS sender, and for
    /// missed calls "calls" from `caller_prefix` followed by the code.
    pub fn new(
        name: impl Into<String>,
        outbox: impl Into<PathBuf>,
        sender: impl Into<String>,
        caller_prefix: impl Into<String>,
        challenges: Vec<Challenge>,
    ) -> Self {
        Self {
            name: name.into(),
            sender: sender.into(),
            caller_prefix: caller_prefix.into(),
            outbox: outbox.into(),
            challenges,
            print: true,
            lock: Mutex::new(()),
        }
    }

    /// Whether to print each delivery on standard output (on by default).
    pub fn with_console(mut self, print: bool) -> Self {
        self.print = print;
        self
    }

    /// Where the outbox is.
    pub fn outbox(&self) -> &Path {
        &self.outbox
    }

    fn io_error(&self, e: std::io::Error) -> ProviderError {
        ProviderError::new(
            &self.name,
            ErrorKind::Transient,
            format!("cannot append to outbox {}: {e}", self.outbox.display()),
        )
    }
}

#[async_trait]
impl Provider for DevelopmentProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn challenges(&self) -> &[Challenge] {
        &self.challenges
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        if !self.challenges.contains(&message.challenge) {
            return Err(ProviderError::new(
                &self.name,
                ErrorKind::Unsupported,
                format!("challenge {} is not enabled", message.challenge),
            ));
        }
        let (channel, sender) = match message.challenge {
            Challenge::Pin => ("sms", self.sender.clone()),
            Challenge::Voice => ("voice", self.sender.clone()),
            Challenge::MissedCall => (
                "call",
                crate::missed_call_mask(
                    &format!("{}{}", self.caller_prefix, message.code),
                    message.code.len(),
                ),
            ),
        };
        let line = OutboxLine {
            to: &message.to,
            channel,
            challenge: message.challenge,
            sender: &sender,
            text: &message.text,
            code: &message.code,
            reference: &message.reference,
        };
        let mut json = serde_json::to_string(&line).map_err(|e| {
            ProviderError::new(&self.name, ErrorKind::Permanent, format!("encoding: {e}"))
        })?;
        json.push('\n');
        {
            // One small append to a local file, as a log line is written: done in place, with no
            // hop to the blocking pool. One write, so that readers never see half a line.
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.outbox)
                .and_then(|mut file| file.write_all(json.as_bytes()))
                .map_err(|e| self.io_error(e))?;
        }
        if self.print {
            println!(
                "[development provider {}] {} to {} from {}: {}",
                self.name, channel, message.to, sender, message.text
            );
        }
        Ok(Delivery {
            sender,
            instructions: None,
            provider_ref: None,
            code: DeliveredCode::Ours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outgoing(challenge: Challenge, code: &str) -> Outgoing {
        Outgoing {
            to: "+15555215554".into(),
            challenge,
            code: code.into(),
            text: format!("{code} is your code"),
            reference: "ref1".into(),
            valid_for: Duration::from_secs(600),
            locale: None,
        }
    }

    #[tokio::test]
    async fn appends_one_json_line_per_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let p = DevelopmentProvider::new(
            "dev",
            dir.path().join("outbox.jsonl"),
            "12345",
            "+1555000",
            Challenge::ALL.to_vec(),
        )
        .with_console(false);
        let d = p.send(&outgoing(Challenge::Pin, "123456")).await.unwrap();
        assert_eq!(d.sender, "12345");
        assert_eq!(d.code, DeliveredCode::Ours);
        let d = p
            .send(&outgoing(Challenge::MissedCall, "4321"))
            .await
            .unwrap();
        assert_eq!(d.sender, "+1555000????");
        let text = std::fs::read_to_string(p.outbox()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["to"], "+15555215554");
        assert_eq!(lines[0]["channel"], "sms");
        assert_eq!(lines[0]["code"], "123456");
        assert_eq!(lines[0]["sender"], "12345");
        assert_eq!(lines[1]["channel"], "call");
        assert_eq!(lines[1]["challenge"], "missedcall");
    }

    #[tokio::test]
    async fn refuses_disabled_challenge_permanently() {
        let dir = tempfile::tempdir().unwrap();
        let p =
            DevelopmentProvider::new("dev", dir.path().join("o"), "1", "+1", vec![Challenge::Pin])
                .with_console(false);
        let e = p
            .send(&outgoing(Challenge::Voice, "1234"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(!p.outbox().exists());
    }

    #[tokio::test]
    async fn unwritable_outbox_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let p = DevelopmentProvider::new(
            "dev",
            dir.path().join("missing-dir").join("o"),
            "1",
            "+1",
            vec![Challenge::Pin],
        )
        .with_console(false);
        let e = p.send(&outgoing(Challenge::Pin, "1234")).await.unwrap_err();
        assert!(e.is_transient());
    }
}
