//! The external component (XEP-0114) link to the XMPP server, kept up for as long as the service
//! runs: it connects and authenticates, reconnects with capped exponential backoff when the
//! server goes away or refuses, pings the server after a quiet spell, and hands every iq to the
//! [`Handler`] in its own task, so that one slow or bad request never holds up the others.
//!
//! With `events.xmpp_to` set, each connection also runs a delivery task for the `xmpp` event
//! sink: it claims due events, hands each message to the loop (which owns the stream's sink and
//! says whether the send succeeded), and marks it delivered or failed. It runs beside the iq
//! handling, never in its way; while the link is down nobody claims, so events wait in the store.
//!
//! tokio-xmpp's `Component` stream yields `None` for every read failure (a quiet spell, an
//! unparsable stanza, the server closing the stream) and keeps working when polled again. A
//! `None` is therefore a cue to ping: if the ping is not answered before the next `None`, the link
//! is dead and we reconnect.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::connect::TcpServerConnector;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Component, Stanza};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::ping::Ping;

use super::Handler;
use super::events::{event_message, owner_message};
use crate::config::ComponentConfig;
use crate::registrar::Registrar;

/// A stanza for the loop to send, and where to say whether it went out.
type Outgoing = (Stanza, oneshot::Sender<bool>);

/// First wait before reconnecting.
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest wait between two connection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Requests handled at once; beyond it the loop stops reading, and the XMPP server buffers.
pub const MAX_IN_FLIGHT: usize = 64;

enum Ended {
    Stopped,
    Lost,
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// The server's own domain, for keepalive pings: the component JID without its first label
/// (`register.example.org` -> `example.org`). Any answer, even an error, proves the link alive.
fn server_domain(component: &str) -> String {
    match component.split_once('.') {
        Some((_, rest)) if !rest.is_empty() => rest.to_owned(),
        _ => component.to_owned(),
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the component until `stop` turns true.
pub async fn run(config: ComponentConfig, handler: Arc<Handler>, mut stop: watch::Receiver<bool>) {
    // Config validation already refused a bad JID; this only guards the library entry point.
    let events_to = config
        .events_to
        .as_deref()
        .and_then(|to| match Jid::new(to) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::error!(error = %e, "events.xmpp_to is not a JID: events are not sent");
                None
            }
        });
    let mut backoff = BACKOFF_START;
    loop {
        if *stop.borrow() {
            return;
        }
        let timeouts = Timeouts {
            read_timeout: config.ping_interval,
            response_timeout: config.ping_interval.min(Duration::from_secs(15)),
        };
        let connect = Component::new_plaintext(
            &config.jid,
            config.secret.expose(),
            DnsConfig::addr(&config.server.to_string()),
            timeouts,
        );
        let component = tokio::select! {
            _ = stopped(&mut stop) => return,
            c = connect => c,
        };
        match component {
            Ok(component) => {
                tracing::info!(jid = %config.jid, server = %config.server, "XMPP component connected");
                backoff = BACKOFF_START;
                match serve(
                    component,
                    &config,
                    handler.clone(),
                    events_to.clone(),
                    &mut stop,
                )
                .await
                {
                    Ended::Stopped => return,
                    Ended::Lost => {
                        tracing::warn!(server = %config.server, "XMPP component link lost; reconnecting");
                    }
                }
            }
            Err(tokio_xmpp::Error::Auth(_)) => tracing::error!(
                jid = %config.jid,
                server = %config.server,
                retry_in = ?backoff,
                "the XMPP server refused the component: check xmpp.component.secret, and that \
                 the server has a Component entry for this JID"
            ),
            Err(e) => tracing::warn!(
                server = %config.server,
                error = %e,
                retry_in = ?backoff,
                "cannot connect the XMPP component"
            ),
        }
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(jittered(backoff)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn serve(
    component: Component<TcpServerConnector>,
    config: &ComponentConfig,
    handler: Arc<Handler>,
    events_to: Option<Jid>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let me = handler.jid().clone();
    let server = match Jid::new(&server_domain(&config.jid)) {
        Ok(j) => j,
        Err(_) => me.clone(),
    };
    let (mut sink, mut stream) = component.split();
    // Answers come back from the handler tasks through this channel; the loop owns the sink. The
    // channel holds more answers than there can be tasks, so a task never waits to send.
    let (answers_tx, mut answers) = mpsc::channel::<Stanza>(MAX_IN_FLIGHT * 2);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Event messages: the delivery task ends when this receiver is dropped with the connection.
    let (events_tx, mut events) = mpsc::channel::<Outgoing>(1);
    if let Some(to) = events_to {
        tokio::spawn(deliver_events(
            handler.registrar().clone(),
            me.clone(),
            to,
            events_tx,
            stop.clone(),
        ));
    } else {
        drop(events_tx);
    }
    let mut pings = 0u64;
    let mut ping_outstanding = false;
    loop {
        tokio::select! {
            _ = stopped(stop) => {
                if let Err(e) = sink.close().await {
                    tracing::debug!(error = %e, "closing the component stream");
                }
                tracing::info!("XMPP component disconnected");
                return Ended::Stopped;
            }
            Some(answer) = answers.recv() => {
                if let Err(e) = sink.send(answer).await {
                    tracing::warn!(error = %e, "cannot send to the XMPP server");
                    return Ended::Lost;
                }
            }
            Some((message, sent)) = events.recv() => {
                let result = sink.send(message).await;
                let _ = sent.send(result.is_ok());
                if let Err(e) = result {
                    tracing::warn!(error = %e, "cannot send to the XMPP server");
                    return Ended::Lost;
                }
            }
            item = stream.next() => match item {
                Some(Stanza::Iq(iq)) => {
                    ping_outstanding = false;
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return Ended::Lost;
                    };
                    let (handler, tx) = (handler.clone(), answers_tx.clone());
                    tokio::spawn(async move {
                        if let Some(answer) = handler.handle(iq).await {
                            let _ = tx.send(answer.into()).await;
                        }
                        drop(permit);
                    });
                }
                // Messages and presence are not for us; their arrival proves the link alive.
                Some(_) => ping_outstanding = false,
                None => {
                    if ping_outstanding {
                        return Ended::Lost;
                    }
                    tracing::debug!(
                        "component stream: nothing readable (quiet spell, unparsable stanza or \
                         closed stream); pinging the server"
                    );
                    pings += 1;
                    let ping = Iq::from_get(format!("keepalive-{pings}"), Ping)
                        .with_from(me.clone())
                        .with_to(server.clone());
                    if sink.send(ping.into()).await.is_err() {
                        return Ended::Lost;
                    }
                    ping_outstanding = true;
                }
            },
        }
    }
}

/// Delivers the `xmpp` sink's events as messages from `me` to `to` through `out`, until the
/// connection ends (`out` closes) or `stop` is set.
async fn deliver_events(
    registrar: Arc<Registrar>,
    me: Jid,
    to: Jid,
    out: mpsc::Sender<Outgoing>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match registrar.claim_events(crate::events::XMPP).await {
            Ok(claimed) => {
                for event in claimed {
                    // The event for the server's module, then, for an event the account's owner
                    // is told of, the message to the account.
                    let mut sent = true;
                    for message in std::iter::once(event_message(&event, &me, &to))
                        .chain(owner_message(&event, &me))
                    {
                        let (sent_tx, sent_rx) = oneshot::channel();
                        sent = out.send((message.into(), sent_tx)).await.is_ok()
                            && sent_rx.await.unwrap_or(false);
                        if !sent {
                            break;
                        }
                    }
                    if sent {
                        tracing::info!(event = %event.id, kind = event.kind, "event sent over XMPP");
                        if let Err(e) = registrar.event_delivered(&event).await {
                            tracing::warn!(error = %e, "cannot mark an event delivered");
                        }
                    } else {
                        // The link went down: this event (and the rest of the batch, whose
                        // lease then runs out) waits for the next connection.
                        let retry = registrar.event_failed(&event).await;
                        tracing::warn!(
                            event = %event.id,
                            kind = event.kind,
                            retry_in = ?retry.ok(),
                            "cannot send an event over XMPP"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read events"),
        }
        tokio::select! {
            _ = out.closed() => return,
            go = crate::events::wait(&registrar, &mut stop) => if !go { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_go_to_the_servers_domain() {
        assert_eq!(server_domain("register.localhost"), "localhost");
        assert_eq!(server_domain("reg.xmpp.example.org"), "xmpp.example.org");
        assert_eq!(server_domain("localhost"), "localhost");
    }

    #[test]
    fn backoff_is_jittered_within_a_fifth() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(12));
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried_until_stopped() {
        // Nothing listens on this port: the loop keeps retrying and stops promptly when told.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = ComponentConfig {
            server: format!("127.0.0.1:{port}").parse().unwrap(),
            jid: "register.localhost".into(),
            secret: "s".into(),
            ping_interval: Duration::from_secs(60),
            events_to: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let app = crate::App::build(
            crate::Config::development(dir.path()).unwrap(),
            crate::Services::default(),
        )
        .await
        .unwrap();
        let handler = Arc::new(Handler::new(
            app.registrar.clone(),
            app.clock.clone(),
            Jid::new("register.localhost").unwrap(),
        ));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(config, handler, rx));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!task.is_finished(), "it keeps retrying");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops promptly")
            .unwrap();
    }
}
