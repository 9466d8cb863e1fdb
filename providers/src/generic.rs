//! A generic HTTP SMS gateway: one request built from a URL, a method, headers and a body
//! template, for the many local gateways (Kannel, PlaySMS, SMS Gateway for Android, in-house
//! services) that have no dedicated provider.
//!
//! Templates hold placeholders, substituted for each message and escaped for where they stand:
//!
//! | placeholder           | value                                              |
//! |-----------------------|----------------------------------------------------|
//! | `{to}`                | destination in E.164, with `+` (`+15555215554`)    |
//! | `{to_digits}`         | destination without `+` (`15555215554`)           |
//! | `{text}`              | the rendered message                               |
//! | `{code}`              | the code                                           |
//! | `{reference}`         | the verification id                                |
//! | `{sender}`            | the configured `sender`                            |
//! | `{valid_for_seconds}` | how long the code stays valid, in seconds          |
//! | `{secret:NAME}`       | the credential `NAME` of the `secrets` table       |
//!
//! In the `url` values are percent-encoded (`+` becomes `%2B`, a space `%20`); in a `form` body
//! they are form-encoded (`application/x-www-form-urlencoded`: a space becomes `+`); in a `json`
//! body a placeholder stands inside a JSON string and its value is JSON-escaped, except
//! `{valid_for_seconds}`, which may also stand alone as a number (`"ttl": {valid_for_seconds}`);
//! in a `raw` body values are inserted as they are; in header values control characters become
//! spaces. Any other `{word}` in a template is refused when the provider is built, so a typo
//! never reaches a gateway.
//!
//! A response succeeds when its status is in `success_status` (any 2xx if empty) and, if
//! `success_pointer` is set, when the JSON value at that RFC 6901 pointer equals `success_value`
//! (a string and a number or boolean with the same text compare equal: gateways are not
//! consistent about `"0"` and `0`). `id_pointer` names where the gateway's message id is.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    Challenge, Credential, DeliveredCode, Delivery, ErrorKind, Outgoing, Provider, ProviderError,
    Secret,
};

/// The HTTP method of a [`GenericConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMethod {
    /// `GET`: the message travels in the URL; no body.
    #[serde(alias = "GET")]
    Get,
    /// `POST` (the default).
    #[default]
    #[serde(alias = "POST")]
    Post,
    /// `PUT`.
    #[serde(alias = "PUT")]
    Put,
}

impl HttpMethod {
    fn to_reqwest(self) -> reqwest::Method {
        match self {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
        }
    }
}

/// How the body template of a [`GenericConfig`] is written, and so how values are escaped in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// `key=value&key=value` (the default), values form-encoded; sent as
    /// `application/x-www-form-urlencoded`.
    #[default]
    Form,
    /// A JSON text whose strings may hold placeholders, values JSON-escaped; sent as
    /// `application/json`.
    Json,
    /// Any text, values inserted as they are; sent as `text/plain; charset=utf-8`.
    Raw,
}

impl BodyFormat {
    fn content_type(self) -> &'static str {
        match self {
            BodyFormat::Form => "application/x-www-form-urlencoded",
            BodyFormat::Json => "application/json",
            BodyFormat::Raw => "text/plain; charset=utf-8",
        }
    }
}

fn default_challenges() -> Vec<Challenge> {
    vec![Challenge::Pin]
}

fn default_timeout_seconds() -> u64 {
    crate::http::DEFAULT_TIMEOUT.as_secs()
}

/// One generic gateway (`[[providers]] kind = "generic"`). Templates may hold the placeholders
/// listed in the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericConfig {
    /// Name in logs and routing.
    pub name: String,
    /// The URL to call (`http` or `https`); placeholders are percent-encoded.
    pub url: String,
    /// The HTTP method; default `post`.
    #[serde(default)]
    pub method: HttpMethod,
    /// Request headers; values may hold placeholders.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request headers whose values are credentials (`Authorization`, API keys): given inline or
    /// as `{ env = "VARIABLE" }`, never printed.
    #[serde(default)]
    pub secret_headers: BTreeMap<String, Credential>,
    /// Credentials for `{secret:NAME}` placeholders, for gateways that take them in the URL or
    /// body (Kannel's `password=`): given inline or as `{ env = "VARIABLE" }`, never printed.
    #[serde(default)]
    pub secrets: BTreeMap<String, Credential>,
    /// The body template; none for an empty body. Not allowed with `get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// How `body` is written; default `form`.
    #[serde(default)]
    pub body_format: BodyFormat,
    /// The sender id shown to the client (what the gateway sends from). Never empty.
    pub sender: String,
    /// The statuses that mean success; empty (the default) for any 2xx.
    #[serde(default)]
    pub success_status: Vec<u16>,
    /// An RFC 6901 JSON pointer (`/status`) into the response whose value must equal
    /// `success_value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_pointer: Option<String>,
    /// The value expected at `success_pointer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_value: Option<Value>,
    /// An RFC 6901 JSON pointer to the gateway's message id in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_pointer: Option<String>,
    /// The challenges this gateway delivers (`pin`, `voice`); default `["pin"]`.
    #[serde(default = "default_challenges")]
    pub challenges: Vec<Challenge>,
    /// Timeout of the whole request, in seconds; default 10.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

/// A value a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    To,
    ToDigits,
    Text,
    Code,
    Reference,
    Sender,
    ValidForSeconds,
    /// An index into the resolved secrets.
    Secret(usize),
}

const KNOWN: &str =
    "{to}, {to_digits}, {text}, {code}, {reference}, {sender}, {valid_for_seconds}, {secret:NAME}";

/// How a value is escaped where its placeholder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Percent-encoded: everything but RFC 3986 unreserved characters.
    Url,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// The inside of a JSON string.
    JsonString,
    /// Control characters become spaces.
    Header,
    /// As it is.
    Verbatim,
}

#[derive(Debug, Clone)]
enum Piece {
    Literal(String),
    Var(Var, Escape),
}

/// A parsed template.
#[derive(Debug, Clone)]
struct Template {
    pieces: Vec<Piece>,
}

/// The values of one message.
struct Values<'a> {
    to: &'a str,
    text: &'a str,
    code: &'a str,
    reference: &'a str,
    sender: &'a str,
    valid_for_seconds: String,
    secrets: &'a [Secret],
}

impl Values<'_> {
    fn get(&self, var: Var) -> &str {
        match var {
            Var::To => self.to,
            Var::ToDigits => self.to.strip_prefix('+').unwrap_or(self.to),
            Var::Text => self.text,
            Var::Code => self.code,
            Var::Reference => self.reference,
            Var::Sender => self.sender,
            Var::ValidForSeconds => &self.valid_for_seconds,
            Var::Secret(i) => self.secrets.get(i).map(Secret::expose).unwrap_or(""),
        }
    }
}

/// Where a template is used, which decides how its values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Url,
    Header,
    Body(BodyFormat),
}

/// The placeholder at the start of `s` (which begins with `{`): its name and length, if `s`
/// starts with `{word}` where a word is made of ASCII letters, digits and `_:.-`.
fn placeholder_at(s: &str) -> Option<(&str, usize)> {
    let rest = s.strip_prefix('{')?;
    let end = rest.find('}')?;
    let name = &rest[..end];
    let word = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'));
    word.then_some((name, end + 2))
}

impl Template {
    /// Parses `text`, used as `field` (for error messages) in `context`; `secrets` are the names
    /// that `{secret:NAME}` may use, in the order of the resolved values.
    fn parse(
        field: &str,
        text: &str,
        context: Context,
        secrets: &[&str],
    ) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut unknown: Vec<String> = Vec::new();
        let mut misplaced: Vec<String> = Vec::new();
        // JSON bodies: whether the scan is inside a string, and after a backslash there.
        let mut in_string = false;
        let mut escaped = false;
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if c == '{'
                && !escaped
                && let Some((name, len)) = placeholder_at(rest)
            {
                let var = match name {
                    "to" => Some(Var::To),
                    "to_digits" => Some(Var::ToDigits),
                    "text" => Some(Var::Text),
                    "code" => Some(Var::Code),
                    "reference" => Some(Var::Reference),
                    "sender" => Some(Var::Sender),
                    "valid_for_seconds" => Some(Var::ValidForSeconds),
                    _ => name
                        .strip_prefix("secret:")
                        .and_then(|s| secrets.iter().position(|known| *known == s))
                        .map(Var::Secret),
                };
                let escape = match context {
                    Context::Url => Escape::Url,
                    Context::Header => Escape::Header,
                    Context::Body(BodyFormat::Form) => Escape::Form,
                    Context::Body(BodyFormat::Raw) => Escape::Verbatim,
                    Context::Body(BodyFormat::Json) if in_string => Escape::JsonString,
                    // Outside a string only a number can stand.
                    Context::Body(BodyFormat::Json) => {
                        if var.is_some() && var != Some(Var::ValidForSeconds) {
                            misplaced.push(format!("{{{name}}}"));
                        }
                        Escape::Verbatim
                    }
                };
                match var {
                    Some(var) => {
                        if !literal.is_empty() {
                            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                        }
                        pieces.push(Piece::Var(var, escape));
                    }
                    None => unknown.push(format!("{{{name}}}")),
                }
                rest = &rest[len..];
                continue;
            }
            if context == Context::Body(BodyFormat::Json) {
                if escaped {
                    escaped = false;
                } else if in_string && c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = !in_string;
                }
            }
            literal.push(c);
            rest = &rest[c.len_utf8()..];
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !unknown.is_empty() {
            unknown.dedup();
            let secret_hint = if unknown.iter().any(|u| u.starts_with("{secret:")) {
                " ({secret:NAME} needs NAME in the secrets table)"
            } else {
                ""
            };
            return Err(format!(
                "{field}: unknown placeholder{} {}{secret_hint}; known: {KNOWN}",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", "),
            ));
        }
        if !misplaced.is_empty() {
            return Err(format!(
                "{field}: {} must stand inside a JSON string (only {{valid_for_seconds}} may \
                 stand alone, as a number)",
                misplaced.join(", ")
            ));
        }
        Ok(Template { pieces })
    }

    fn render(&self, values: &Values<'_>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Var(var, escape) => {
                    let value = values.get(*var);
                    match escape {
                        Escape::Url => percent_encode(&mut out, value, false),
                        Escape::Form => percent_encode(&mut out, value, true),
                        Escape::JsonString => json_escape(&mut out, value),
                        Escape::Header => {
                            out.extend(value.chars().map(|c| if c.is_control() { ' ' } else { c }))
                        }
                        Escape::Verbatim => out.push_str(value),
                    }
                }
            }
        }
        out
    }
}

/// Percent-encodes `value` into `out`: as a URL component (everything but RFC 3986 unreserved
/// characters), or as `application/x-www-form-urlencoded` (WHATWG: a space becomes `+`).
fn percent_encode(out: &mut String, value: &str, form: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => out.push(char::from(b)),
            b'~' if !form => out.push('~'),
            b'*' if form => out.push('*'),
            b' ' if form => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
}

/// Escapes `value` for the inside of a JSON string.
fn json_escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
}

/// Whether `pointer` is an RFC 6901 JSON pointer.
fn check_pointer(field: &str, pointer: &str) -> Result<(), String> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{field}: \"{pointer}\" is not a JSON pointer (RFC 6901: \"/status\", \"/messages/0/id\")"
        ))
    }
}

/// Whether a response value matches the expected one; a string equals a number or boolean with
/// the same text.
fn value_matches(actual: &Value, expected: &Value) -> bool {
    if actual == expected {
        return true;
    }
    let same_text = |text: &str, scalar: &Value| {
        serde_json::from_str::<Value>(text).is_ok_and(|parsed| parsed == *scalar)
    };
    match (actual, expected) {
        (Value::String(a), Value::Number(_) | Value::Bool(_)) => same_text(a, expected),
        (Value::Number(_) | Value::Bool(_), Value::String(e)) => same_text(e, actual),
        _ => false,
    }
}

/// Sends challenges through a gateway described by a [`GenericConfig`].
pub struct GenericProvider {
    config: GenericConfig,
    client: reqwest::Client,
    url: Template,
    headers: Vec<(HeaderName, Template)>,
    secret_headers: Vec<(HeaderName, HeaderValue)>,
    secrets: Vec<Secret>,
    body: Option<Template>,
}

// Credentials stay redacted: the configuration's `Debug` shows them as `Credential(..)`, and the
// resolved values are left out.
impl fmt::Debug for GenericProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GenericProvider {
    /// Validates `config` and builds the provider: credentials are resolved, the URL must parse
    /// once its placeholders are filled in, unknown placeholders are refused, a JSON body must be
    /// JSON.
    pub fn new(config: GenericConfig) -> Result<Self, String> {
        let name = config.name.trim();
        if name.is_empty() {
            return Err("provider: name must not be empty".into());
        }
        let what = |field: &str| format!("provider {name}: {field}");
        if config.sender.trim().is_empty() {
            return Err(format!("{}: must not be empty", what("sender")));
        }
        if config.timeout_seconds == 0 {
            return Err(format!("{}: must be at least 1", what("timeout_seconds")));
        }
        if config.challenges.is_empty() {
            return Err(format!("{}: must not be empty", what("challenges")));
        }
        if config.challenges.contains(&Challenge::MissedCall) {
            return Err(format!(
                "{}: a generic gateway cannot place missed calls (use pin or voice)",
                what("challenges")
            ));
        }
        if let Some(bad) = config
            .success_status
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(format!(
                "{}: {bad} is not an HTTP status",
                what("success_status")
            ));
        }
        match (&config.success_pointer, &config.success_value) {
            (Some(p), Some(_)) => check_pointer(&what("success_pointer"), p)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(format!(
                    "{}: success_pointer needs success_value",
                    what("success_value")
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{}: success_value needs success_pointer",
                    what("success_pointer")
                ));
            }
        }
        if let Some(p) = &config.id_pointer {
            check_pointer(&what("id_pointer"), p)?;
        }

        let mut secret_names = Vec::new();
        let mut secrets = Vec::new();
        for (key, credential) in &config.secrets {
            secret_names.push(key.as_str());
            secrets.push(credential.resolve(&what(&format!("secrets.{key}")))?);
        }

        let url = Template::parse(&what("url"), &config.url, Context::Url, &secret_names)?;
        let mut headers = Vec::new();
        for (key, value) in &config.headers {
            let field = what(&format!("headers.{key}"));
            let header = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| format!("{field}: not a valid header name"))?;
            let template = Template::parse(&field, value, Context::Header, &secret_names)?;
            headers.push((header, template));
        }
        let mut secret_headers = Vec::new();
        for (key, credential) in &config.secret_headers {
            let field = what(&format!("secret_headers.{key}"));
            let header = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| format!("{field}: not a valid header name"))?;
            if headers.iter().any(|(h, _)| *h == header) {
                return Err(format!("{field}: also given in headers"));
            }
            let secret = credential.resolve(&field)?;
            let mut value = HeaderValue::from_str(secret.expose())
                .map_err(|_| format!("{field}: the value is not a valid header value"))?;
            value.set_sensitive(true);
            secret_headers.push((header, value));
        }
        let body = match &config.body {
            None => None,
            Some(_) if config.method == HttpMethod::Get => {
                return Err(format!(
                    "{}: a GET request has no body; put the parameters in the url or use \
                     method = \"post\"",
                    what("body")
                ));
            }
            Some(text) => Some(Template::parse(
                &what("body"),
                text,
                Context::Body(config.body_format),
                &secret_names,
            )?),
        };

        // Fill the templates in with sample values and check what comes out.
        let sample = Values {
            to: "+15555215554",
            text: "Your code is 123456 \"&=?#/\\\n",
            code: "123456",
            reference: "reference",
            sender: &config.sender,
            valid_for_seconds: "600".into(),
            secrets: &secrets,
        };
        let sample_url = url.render(&sample);
        let parsed = reqwest::Url::parse(&sample_url)
            .map_err(|e| format!("{}: not a valid URL ({e})", what("url")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "{}: must be an http or https URL with a host",
                what("url")
            ));
        }
        for ((key, _), (_, template)) in config.headers.iter().zip(&headers) {
            HeaderValue::from_bytes(template.render(&sample).as_bytes()).map_err(|_| {
                format!(
                    "{}: not a valid header value",
                    what(&format!("headers.{key}"))
                )
            })?;
        }
        if let Some(template) = &body {
            let sample_body = template.render(&sample);
            match config.body_format {
                BodyFormat::Json => {
                    serde_json::from_str::<Value>(&sample_body).map_err(|e| {
                        format!(
                            "{}: not JSON once its placeholders are filled in ({e})",
                            what("body")
                        )
                    })?;
                }
                BodyFormat::Form => {
                    if sample_body
                        .split('&')
                        .any(|pair| !pair.is_empty() && !pair.contains('='))
                    {
                        return Err(format!(
                            "{}: a form body is key=value pairs joined by & (set body_format = \
                             \"json\" or \"raw\" for other bodies)",
                            what("body")
                        ));
                    }
                }
                BodyFormat::Raw => {}
            }
        }

        let client = crate::http::client(Duration::from_secs(config.timeout_seconds))?;
        Ok(Self {
            config,
            client,
            url,
            headers,
            secret_headers,
            secrets,
            body,
        })
    }

    /// The configuration the provider was built from (credentials unresolved).
    pub fn config(&self) -> &GenericConfig {
        &self.config
    }

    fn error(&self, kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError::new(&self.config.name, kind, message)
    }

    /// The JSON value at `pointer` in `json`, as an id.
    fn message_id(json: Option<&Value>, pointer: &str) -> Option<String> {
        match json?.pointer(pointer)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

#[async_trait]
impl Provider for GenericProvider {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn challenges(&self) -> &[Challenge] {
        &self.config.challenges
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        if !self.config.challenges.contains(&message.challenge) {
            return Err(self.error(
                ErrorKind::Unsupported,
                format!("challenge {} is not enabled", message.challenge),
            ));
        }
        let values = Values {
            to: &message.to,
            text: &message.text,
            code: &message.code,
            reference: &message.reference,
            sender: &self.config.sender,
            valid_for_seconds: message.valid_for.as_secs().to_string(),
            secrets: &self.secrets,
        };
        // The URL may hold credentials and the number: never in an error.
        let url = reqwest::Url::parse(&self.url.render(&values)).map_err(|_| {
            self.error(
                ErrorKind::Permanent,
                "the url is not valid once its placeholders are filled in",
            )
        })?;
        let mut headers = HeaderMap::new();
        if self.body.is_some() {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static(self.config.body_format.content_type()),
            );
        }
        for (name, template) in &self.headers {
            let value =
                HeaderValue::from_bytes(template.render(&values).as_bytes()).map_err(|_| {
                    self.error(
                        ErrorKind::Permanent,
                        format!("header {name} is not a valid header value once filled in"),
                    )
                })?;
            headers.insert(name.clone(), value);
        }
        for (name, value) in &self.secret_headers {
            headers.insert(name.clone(), value.clone());
        }
        let mut request = self
            .client
            .request(self.config.method.to_reqwest(), url)
            .headers(headers);
        if let Some(body) = &self.body {
            request = request.body(body.render(&values));
        }

        let response = request
            .send()
            .await
            .map_err(|e| crate::http::transport_error(&self.config.name, e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| crate::http::transport_error(&self.config.name, e))?;
        let accepted = if self.config.success_status.is_empty() {
            status.is_success()
        } else {
            self.config.success_status.contains(&status.as_u16())
        };
        // The gateway's answer may echo the message (its code) and the number: never in errors.
        let body_shown = crate::http::scrub_message(&body, message);
        if !accepted {
            return Err(crate::http::status_error(
                &self.config.name,
                status,
                &body_shown,
            ));
        }

        let json = if self.config.success_pointer.is_some() || self.config.id_pointer.is_some() {
            serde_json::from_str::<Value>(&body).ok()
        } else {
            None
        };
        if let (Some(pointer), Some(expected)) =
            (&self.config.success_pointer, &self.config.success_value)
        {
            let Some(json) = &json else {
                return Err(self.error(
                    ErrorKind::Permanent,
                    format!(
                        "HTTP {}: the response is not JSON: {}",
                        status.as_u16(),
                        crate::http::excerpt(&body_shown)
                    ),
                ));
            };
            let actual = json.pointer(pointer);
            if !actual.is_some_and(|a| value_matches(a, expected)) {
                let found = actual.map_or_else(|| "missing".to_owned(), Value::to_string);
                return Err(self.error(
                    ErrorKind::Permanent,
                    format!(
                        "HTTP {}: {pointer} is {}, expected {expected}: {}",
                        status.as_u16(),
                        crate::http::excerpt(&crate::http::scrub_message(&found, message)),
                        crate::http::excerpt(&body_shown)
                    ),
                ));
            }
        }
        let provider_ref = match &self.config.id_pointer {
            Some(pointer) => {
                let id = Self::message_id(json.as_ref(), pointer);
                if id.is_none() {
                    tracing::warn!(
                        provider = %self.config.name,
                        reference = %message.reference,
                        "the gateway accepted the message but its response has no id at {pointer}"
                    );
                }
                id
            }
            None => None,
        };
        tracing::debug!(
            provider = %self.config.name,
            reference = %message.reference,
            status = status.as_u16(),
            "the gateway accepted the message"
        );
        Ok(Delivery {
            sender: self.config.sender.clone(),
            instructions: None,
            provider_ref,
            code: DeliveredCode::Ours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(text: &'a str, secrets: &'a [Secret]) -> Values<'a> {
        Values {
            to: "+15555215554",
            text,
            code: "012345",
            reference: "ref",
            sender: "KONTALK",
            valid_for_seconds: "600".into(),
            secrets,
        }
    }

    #[test]
    fn escapes_per_context() {
        let text = "a \"b\" & c=d\n\u{e8}/+~*";
        let v = values(text, &[]);
        let url = Template::parse("u", "http://h/?t={text}&to={to}", Context::Url, &[]).unwrap();
        assert_eq!(
            url.render(&v),
            "http://h/?t=a%20%22b%22%20%26%20c%3Dd%0A%C3%A8%2F%2B~%2A&to=%2B15555215554"
        );
        let form = Template::parse("b", "t={text}", Context::Body(BodyFormat::Form), &[]).unwrap();
        assert_eq!(form.render(&v), "t=a+%22b%22+%26+c%3Dd%0A%C3%A8%2F%2B%7E*");
        let json = Template::parse(
            "b",
            r#"{"t": "x{text}", "n": {valid_for_seconds}, "e": "\"{code}\\"}"#,
            Context::Body(BodyFormat::Json),
            &[],
        )
        .unwrap();
        let rendered = json.render(&v);
        let parsed: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(parsed["t"], format!("x{text}"));
        assert_eq!(parsed["n"], 600);
        assert_eq!(parsed["e"], "\"012345\\");
        let header = Template::parse("h", "{text}", Context::Header, &[]).unwrap();
        assert_eq!(header.render(&v), "a \"b\" & c=d \u{e8}/+~*");
    }

    #[test]
    fn json_control_characters_are_escaped() {
        let mut out = String::new();
        json_escape(&mut out, "\u{1}\t\u{1f}");
        assert_eq!(out, "\\u0001\\t\\u001f");
    }

    #[test]
    fn unknown_and_misplaced_placeholders_are_refused() {
        let e = Template::parse("u", "http://h/{phone}/{to}/{msg}", Context::Url, &[]).unwrap_err();
        assert!(e.contains("{phone}") && e.contains("{msg}"), "{e}");
        let e = Template::parse("u", "{secret:key}", Context::Url, &["other"]).unwrap_err();
        assert!(
            e.contains("{secret:key}") && e.contains("secrets table"),
            "{e}"
        );
        let e = Template::parse(
            "b",
            r#"{"t": {text}}"#,
            Context::Body(BodyFormat::Json),
            &[],
        )
        .unwrap_err();
        assert!(e.contains("inside a JSON string"), "{e}");
        // JSON braces and `{}` are not placeholders.
        Template::parse(
            "b",
            r#"{"a": {"b": {}}}"#,
            Context::Body(BodyFormat::Json),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn lenient_value_comparison() {
        assert!(value_matches(
            &serde_json::json!("0"),
            &serde_json::json!(0)
        ));
        assert!(value_matches(
            &serde_json::json!(true),
            &serde_json::json!("true")
        ));
        assert!(!value_matches(
            &serde_json::json!("ok"),
            &serde_json::json!("OK")
        ));
        assert!(!value_matches(
            &serde_json::json!(null),
            &serde_json::json!("null")
        ));
    }
}
