//! Credentials: given in the configuration as a value or as the name of an environment variable
//! (`auth_token = { env = "TWILIO_AUTH_TOKEN" }`), held as a [`Secret`] whose `Debug` and
//! `Display` never show it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret value. `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// A credential in the configuration: the value itself, or `{ env = "VARIABLE" }`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Credential {
    /// Read from the environment variable `env` when the provider is built.
    Env {
        /// The variable's name.
        env: String,
    },
    /// Given inline.
    Value(Secret),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Env { env } => write!(f, "Credential(env {env})"),
            Credential::Value(_) => f.write_str("Credential(<redacted>)"),
        }
    }
}

impl Credential {
    /// The secret; `what` names the setting in the error (never the value).
    pub fn resolve(&self, what: &str) -> Result<Secret, String> {
        match self {
            Credential::Value(s) if s.expose().is_empty() => Err(format!("{what} is empty")),
            Credential::Value(s) => Ok(s.clone()),
            Credential::Env { env } => match std::env::var(env) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                _ => Err(format!("{what}: environment variable {env} is not set")),
            },
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths (tokens, signatures).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_resolve_and_never_print() {
        #[derive(Deserialize)]
        struct C {
            a: Credential,
            b: Credential,
        }
        let c: C = serde_json::from_value(serde_json::json!({
            "a": "hunter2",
            "b": {"env": "REGISTRAR_PROVIDERS_TEST_UNSET_VARIABLE"}
        }))
        .unwrap();
        assert_eq!(c.a.resolve("a").unwrap().expose(), "hunter2");
        let e = c.b.resolve("providers[x].b").unwrap_err();
        assert!(e.contains("REGISTRAR_PROVIDERS_TEST_UNSET_VARIABLE"), "{e}");
        assert!(!format!("{:?} {:?}", c.a, c.a.resolve("a").unwrap()).contains("hunter2"));
        assert_eq!(format!("{}", Secret::new("x")), "<redacted>");
    }
}
