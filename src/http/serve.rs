//! Serving the API with bounds a public endpoint needs, which `axum::serve` does not set: a
//! client must send its request head within `http.header_timeout_seconds` (hyper's header-read
//! timeout, which needs a timer to apply), a request must be answered within
//! `http.request_timeout_seconds` (its body read included: a client that trickles a body is cut
//! off with 408), and at most `http.max_connections` connections are open at once (beyond,
//! a new connection is closed at once, and a warning says so, at most once a minute).
//! Shutdown stops accepting, lets the requests in flight finish, and closes idle connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

use super::Problem;

/// The bounds of the HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Longest wait for a request's head (request line and headers).
    pub header_timeout: Duration,
    /// Longest time for a whole request, from its head to the answer.
    pub request_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            max_connections: 1024,
        }
    }
}

/// Answers 408 when `next` takes longer than `limit`.
async fn time_limit(limit: Duration, request: Request<axum::body::Body>, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "Request timeout",
            format!("the request was not completed within {} s", limit.as_secs()),
        )
        .into_response(),
    }
}

/// Serves `router` on `listener` within `bounds` until `shutdown` completes, then finishes the
/// requests in flight (at most `drain` long).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let limit = bounds.request_timeout;
    let router = router.layer(axum::middleware::from_fn(move |req, next| {
        time_limit(limit, req, next)
    }));
    let connections = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut last_warning: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, do not spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            let now = tokio::time::Instant::now();
            if last_warning.is_none_or(|t| now - t > Duration::from_secs(60)) {
                last_warning = Some(now);
                tracing::warn!(
                    max_connections = bounds.max_connections,
                    "connection limit reached: closing new connections (http.max_connections)"
                );
            }
            continue;
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                router.clone().oneshot(request)
            });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(bounds.header_timeout);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {drain:?}: closing them");
    }
    Ok(())
}
