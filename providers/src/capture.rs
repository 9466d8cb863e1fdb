//! The capturing provider: keeps every challenge in memory so that tests can read the code, and
//! fails on request so that tests can drive error paths (lettre's `StubTransport`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::{
    Challenge, DeliveredCode, Delivery, DeliveryState, Outgoing, Provider, ProviderError, Receipt,
    ReceiptError, ReceiptRequest,
};

/// The token the capturing provider expects on receipts (`authorization: Bearer <token>`).
pub const CAPTURE_RECEIPT_TOKEN: &str = "capture-receipt-token";

#[derive(Default)]
struct State {
    sent: Vec<Outgoing>,
    failures: VecDeque<ProviderError>,
}

/// A provider for tests. Clones share their state.
#[derive(Clone)]
pub struct CapturingProvider {
    name: String,
    sender: String,
    challenges: Vec<Challenge>,
    state: Arc<Mutex<State>>,
}

impl CapturingProvider {
    /// A provider named `name` that accepts every challenge type and reports `sender`.
    pub fn new(name: impl Into<String>, sender: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            sender: sender.into(),
            challenges: Challenge::ALL.to_vec(),
            state: Arc::default(),
        }
    }

    /// Restricts the challenge types this provider claims to deliver.
    pub fn with_challenges(mut self, challenges: Vec<Challenge>) -> Self {
        self.challenges = challenges;
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves usable data behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next call to `send` fail with `error` (queued: call several times to fail
    /// several sends).
    pub fn fail_next(&self, error: ProviderError) {
        self.state().failures.push_back(error);
    }

    /// Everything delivered so far, oldest first.
    pub fn sent(&self) -> Vec<Outgoing> {
        self.state().sent.clone()
    }

    /// The code of the last challenge delivered to `to`.
    pub fn last_code(&self, to: &str) -> Option<String> {
        self.state()
            .sent
            .iter()
            .rev()
            .find(|m| m.to == to)
            .map(|m| m.code.clone())
    }
}

#[async_trait]
impl Provider for CapturingProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn challenges(&self) -> &[Challenge] {
        &self.challenges
    }

    async fn send(&self, message: &Outgoing) -> Result<Delivery, ProviderError> {
        let mut state = self.state();
        if let Some(e) = state.failures.pop_front() {
            return Err(e);
        }
        state.sent.push(message.clone());
        Ok(Delivery {
            sender: self.sender.clone(),
            instructions: None,
            provider_ref: Some(format!("{}-{}", self.name, state.sent.len())),
            code: DeliveredCode::Ours,
        })
    }

    /// Receipts for tests: `authorization: Bearer` [`CAPTURE_RECEIPT_TOKEN`] and a JSON body
    /// `{"ref": "<provider ref>", "state": "delivered" | "failed" | "pending"}`.
    fn parse_receipt(&self, request: &ReceiptRequest<'_>) -> Result<Receipt, ReceiptError> {
        if request.header("authorization") != Some(&format!("Bearer {CAPTURE_RECEIPT_TOKEN}")) {
            return Err(ReceiptError::Unauthenticated);
        }
        let body: serde_json::Value = serde_json::from_slice(request.body)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let state = match body["state"].as_str() {
            Some("delivered") => DeliveryState::Delivered,
            Some("failed") => DeliveryState::Failed,
            Some("pending") => DeliveryState::Pending,
            _ => return Err(ReceiptError::Malformed("unknown state".into())),
        };
        let provider_ref = body["ref"]
            .as_str()
            .ok_or_else(|| ReceiptError::Malformed("no ref".into()))?
            .to_owned();
        Ok(Receipt {
            provider_ref,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::time::Duration;

    #[tokio::test]
    async fn captures_and_fails_on_request() {
        let p = CapturingProvider::new("cap", "999");
        let msg = Outgoing {
            to: "+15555215554".into(),
            challenge: Challenge::Pin,
            code: "1234".into(),
            text: "t".into(),
            reference: "r".into(),
            valid_for: Duration::from_secs(1),
            locale: None,
        };
        p.fail_next(ProviderError::new("cap", ErrorKind::Transient, "down"));
        assert!(p.send(&msg).await.unwrap_err().is_transient());
        assert!(p.sent().is_empty());
        let d = p.clone().send(&msg).await.unwrap();
        assert_eq!(d.sender, "999");
        assert_eq!(p.last_code("+15555215554").as_deref(), Some("1234"));
        assert_eq!(p.last_code("+1"), None);
    }
}
