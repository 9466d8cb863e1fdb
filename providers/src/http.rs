//! What every HTTP gateway shares: a client with a timeout, and the mapping of HTTP failures to
//! [`ProviderError`]s (transient: timeouts, connection failures, 429 and 5xx; permanent: the rest).
//! Errors never carry URLs (which may hold credentials) nor response bodies beyond a short,
//! sanitised excerpt.

use std::time::Duration;

use reqwest::StatusCode;

use crate::{ErrorKind, ProviderError};

/// Default timeout of one provider call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client for provider calls, with `timeout` on every request.
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    // reqwest is built without a default crypto provider: install ring once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("kontalk-registrar/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A transport failure (timeout, refused connection, TLS): transient.
pub fn transport_error(provider: &str, e: reqwest::Error) -> ProviderError {
    let e = e.without_url();
    let what = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        format!("request failed: {e}")
    };
    ProviderError::new(provider, ErrorKind::Transient, what)
}

/// A short, single-line excerpt of a response body for operators' logs.
pub fn excerpt(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    one_line.trim().to_owned()
}

/// The kind of failure an HTTP status means when the provider gave no more precise reason.
pub fn status_kind(status: StatusCode) -> ErrorKind {
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    }
}

/// A failure answered with `status` and `body` (numbers in it scrubbed: error texts often quote
/// the destination).
pub fn status_error(provider: &str, status: StatusCode, body: &str) -> ProviderError {
    ProviderError::new(
        provider,
        status_kind(status),
        format!(
            "HTTP {}: {}",
            status.as_u16(),
            excerpt(&scrub_numbers(body))
        ),
    )
}

/// `text` with what a message carries that must not reach a log: its text (a gateway may echo
/// it; it holds the code), the code itself, and the destination, as given and as digits;
/// then any other long digit run ([`scrub_numbers`]).
pub fn scrub_message(text: &str, message: &crate::Outgoing) -> String {
    let digits: String = message.to.chars().filter(char::is_ascii_digit).collect();
    let mut out = text.to_owned();
    for (secret, label) in [
        (message.text.as_str(), "<text>"),
        (message.code.as_str(), "<code>"),
        (message.to.as_str(), "<number>"),
        (digits.as_str(), "<number>"),
    ] {
        if !secret.is_empty() {
            out = out.replace(secret, label);
        }
    }
    scrub_numbers(&out)
}

/// `text` with every run of seven or more digits (a phone number, perhaps) replaced by
/// `<number>`, so that providers' error texts, which often quote the destination, stay safe to
/// log.
pub fn scrub_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().filter(char::is_ascii_digit).count() >= 7 {
            out.push_str("<number>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            if c == '+' {
                run.push(c);
            } else {
                out.push(c);
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_parts_are_scrubbed() {
        let m = crate::Outgoing {
            to: "+15555215554".into(),
            challenge: crate::Challenge::Pin,
            code: "4821".into(),
            text: "4821 is your code".into(),
            reference: "r".into(),
            valid_for: std::time::Duration::from_secs(60),
            locale: None,
        };
        let echoed = "refused 'to=15555215554&text=4821 is your code' for +15555215554, code 4821, id 12345678";
        let scrubbed = scrub_message(echoed, &m);
        assert!(!scrubbed.contains("4821"), "{scrubbed}");
        assert!(!scrubbed.contains("5555215554"), "{scrubbed}");
        assert!(!scrubbed.contains("12345678"), "{scrubbed}");
        assert!(
            scrubbed.contains("<text>") && scrubbed.contains("<code>"),
            "{scrubbed}"
        );
        let e = status_error("p", StatusCode::BAD_REQUEST, "bad number +15555215554");
        assert!(!e.message.contains("5555215554"), "{e}");
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(
            status_kind(StatusCode::TOO_MANY_REQUESTS),
            ErrorKind::Transient
        );
        assert_eq!(status_kind(StatusCode::BAD_GATEWAY), ErrorKind::Transient);
        assert_eq!(status_kind(StatusCode::BAD_REQUEST), ErrorKind::Permanent);
        assert_eq!(status_kind(StatusCode::UNAUTHORIZED), ErrorKind::Permanent);
        assert_eq!(excerpt("a\nb\u{0}c"), "a b c");
        assert_eq!(excerpt(&"x".repeat(1000)).len(), 200);
    }

    #[test]
    fn numbers_are_scrubbed_short_runs_kept() {
        assert_eq!(
            scrub_numbers("The 'To' number +15005550001 is invalid"),
            "The 'To' number <number> is invalid"
        );
        assert_eq!(scrub_numbers("447700900000"), "<number>");
        assert_eq!(
            scrub_numbers("code 21211, HTTP 400"),
            "code 21211, HTTP 400"
        );
        assert_eq!(scrub_numbers("a+12345678+1"), "a<number>+1");
    }
}
