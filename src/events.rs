//! Delivering events to the XMPP server's side: the HTTP webhook. (The component delivers the
//! `xmpp` sink itself, as messages on its stream.)
//!
//! The core writes an event row per sink in the transaction that replaces a key or removes an
//! account; a worker here claims due rows, POSTs each as JSON and deletes it on a 2xx answer, or
//! tries again later (5 s doubling to an hour). Delivery is at least once: receivers drop
//! duplicates by the event `id`. With `webhook_secret`, each request carries
//! `X-Registrar-Signature: sha256=<hex HMAC-SHA256 of the body>`.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use registrar_providers::Secret;
use sha2::Sha256;
use tokio::sync::watch;

use crate::registrar::{Event, Registrar};

/// The webhook sink's name in the store.
pub const WEBHOOK: &str = "webhook";

/// The XMPP sink's name in the store.
pub const XMPP: &str = "xmpp";

/// How often undelivered events are looked for besides being woken (events of other instances,
/// retries).
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Longest wait for the webhook's answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The `X-Registrar-Signature` value for `body`.
pub fn signature(secret: &Secret, body: &[u8]) -> String {
    // Infallible: HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Waits until woken by the registrar, the poll interval passes, or `stop` is set; whether to
/// go on.
pub async fn wait(registrar: &Registrar, stop: &mut watch::Receiver<bool>) -> bool {
    let waker = registrar.events_waker();
    tokio::select! {
        _ = waker.notified() => true,
        _ = tokio::time::sleep(POLL_INTERVAL) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&Secret>,
    event: &Event,
) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-registrar-event", event.kind)
        .header("x-registrar-event-id", &event.id);
    if let Some(secret) = secret {
        request = request.header("x-registrar-signature", signature(secret, &body));
    }
    let response = request.body(body).send().await.map_err(|e| {
        // reqwest's text can hold the URL, which can hold a token: keep only the kind.
        if e.is_timeout() {
            "timed out".to_owned()
        } else if e.is_connect() {
            "cannot connect".to_owned()
        } else {
            "request failed".to_owned()
        }
    })?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", response.status().as_u16()))
    }
}

/// Delivers the webhook sink's events to `url` until `stop` is set.
pub async fn run_webhook(
    registrar: Arc<Registrar>,
    url: String,
    secret: Option<Secret>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook's HTTP client");
            return;
        }
    };
    loop {
        match registrar.claim_events(WEBHOOK).await {
            Ok(events) => {
                for event in events {
                    match post(&client, &url, secret.as_ref(), &event).await {
                        Ok(()) => {
                            tracing::info!(event = %event.id, kind = event.kind, "event delivered");
                            if let Err(e) = registrar.event_delivered(&event).await {
                                tracing::warn!(error = %e, "cannot mark an event delivered");
                            }
                        }
                        Err(why) => {
                            let retry = registrar.event_failed(&event).await;
                            tracing::warn!(
                                event = %event.id,
                                kind = event.kind,
                                error = %why,
                                retry_in = ?retry.ok(),
                                "webhook delivery failed"
                            );
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read events"),
        }
        if !wait(&registrar, &mut stop).await {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let s = signature(&Secret::new("Jefe"), b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
