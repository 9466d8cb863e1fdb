//! The JSON HTTP API (axum): a thin adapter that parses requests into core types, calls the
//! [`Registrar`], and renders results as JSON and errors as problem+json ([`problem`]).
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/v1/verifications` | start: `{"phone", "force"?, "challenge"?, "accept_terms"?}` |
//! | GET | `/v1/verifications/{id}` | status |
//! | DELETE | `/v1/verifications/{id}` | cancel |
//! | POST | `/v1/verifications/{id}/resend` | fresh code: `{"challenge"?}` |
//! | POST | `/v1/verifications/{id}/code` | verify: `{"code", "public_key"}` |
//! | GET | `/v1/server-key` | the server's public key, ASCII armor |
//! | GET | `/healthz`, `/readyz` | liveness, and readiness (database answers) |

pub mod problem;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::clock::Clock;
use crate::openpgp::UserKey;
use crate::registrar::{
    Challenge, Code, Error, Registrar, StartRequest, Verification, VerificationId,
};
pub use problem::Problem;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    registrar: Arc<Registrar>,
    clock: Arc<dyn Clock>,
}

/// The API's router, limiting request bodies to `max_body_bytes` (413 beyond).
pub fn router(registrar: Arc<Registrar>, clock: Arc<dyn Clock>, max_body_bytes: usize) -> Router {
    let state = ApiState { registrar, clock };
    Router::new()
        .route("/v1/verifications", post(start))
        .route("/v1/verifications/{id}", get(status).delete(cancel))
        .route("/v1/verifications/{id}/resend", post(resend))
        .route("/v1/verifications/{id}/code", post(verify))
        .route("/v1/server-key", get(server_key))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
        .with_state(state)
}

fn on_panic(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    Problem::from_error(&Error::Internal, Utc::now()).into_response()
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-route",
        "Not found",
        "no such endpoint",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this endpoint does not accept that method",
    )
}

/// A JSON body. Any content type is read as JSON (clients such as `curl -d` send form types);
/// an empty body reads as `{}`. Unreadable bodies are 400, oversized ones 413, as problem+json.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload-too-large",
                    "Payload too large",
                    "the request body is larger than this server accepts",
                )
            } else {
                Problem::bad_request(format!("cannot read the request body: {rejection}"))
            }
        })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(ApiJson)
            .map_err(|e| Problem::bad_request(format!("malformed JSON request: {e}")))
    }
}

impl ApiState {
    fn problem(&self, e: Error) -> Problem {
        Problem::from_error(&e, self.clock.now())
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn verification_json(v: &Verification) -> serde_json::Value {
    json!({
        "id": v.id.as_str(),
        "account": v.jid,
        "challenge": v.challenge,
        "sender": v.sender,
        "code_length": v.code_length,
        "instructions": v.instructions,
        "expires_at": time(v.expires_at),
        "next_resend_at": time(v.next_resend_at),
        "attempts_left": v.attempts_left,
        "status": v.state.as_str(),
        "can_fallback": v.can_fallback,
    })
}

fn verification_id(raw: &str) -> Result<VerificationId, Error> {
    raw.parse().map_err(|_| Error::NotFound)
}

#[derive(Deserialize)]
struct StartBody {
    phone: String,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    challenge: Option<Challenge>,
    #[serde(default)]
    accept_terms: bool,
    #[serde(default)]
    fallback: bool,
}

async fn start(State(s): State<ApiState>, ApiJson(body): ApiJson<StartBody>) -> Response {
    let result = async {
        let phone = s.registrar.parse_phone(&body.phone).await?;
        s.registrar
            .start(StartRequest {
                phone,
                force: body.force,
                challenge: body.challenge,
                accepted_terms: body.accept_terms,
                fallback: body.fallback,
            })
            .await
    }
    .await;
    match result {
        Ok(v) => (StatusCode::CREATED, Json(verification_json(&v))).into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

async fn status(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let result = async { s.registrar.status(&verification_id(&id)?).await }.await;
    match result {
        Ok(v) => Json(verification_json(&v)).into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

async fn cancel(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    let result = async { s.registrar.cancel(&verification_id(&id)?).await }.await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

#[derive(Deserialize, Default)]
struct ResendBody {
    #[serde(default)]
    challenge: Option<Challenge>,
}

async fn resend(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ResendBody>,
) -> Response {
    let result = async {
        s.registrar
            .resend(&verification_id(&id)?, body.challenge)
            .await
    }
    .await;
    match result {
        Ok(v) => Json(verification_json(&v)).into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

#[derive(Deserialize)]
struct CodeBody {
    code: String,
    public_key: String,
}

async fn verify(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CodeBody>,
) -> Response {
    let result = async {
        let id = verification_id(&id)?;
        let code: Code = body
            .code
            .parse()
            .map_err(|e: crate::registrar::BadCode| Error::BadRequest(e.to_string()))?;
        let key = UserKey::parse(&body.public_key)?;
        s.registrar.verify(&id, &code, key).await
    }
    .await;
    match result {
        Ok(r) => Json(json!({
            "account": r.jid,
            "fingerprint": r.fingerprint,
            "public_key": base64::engine::general_purpose::STANDARD.encode(&r.public_key),
        }))
        .into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

async fn server_key(State(s): State<ApiState>) -> Response {
    let mut r = s.registrar.server_key().public_armored().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pgp-keys"),
    );
    r
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(s): State<ApiState>) -> Response {
    match s.registrar.store().ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}
