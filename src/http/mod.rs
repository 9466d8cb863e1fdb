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
//! | GET, POST | `/v1/receipts/{provider}` | delivery receipts (status callbacks) of a provider |
//! | POST | `/v1/login-certificates/verify` | check a login certificate (body: PEM or DER) |
//! | POST | `/v1/xmpp/relay` | answer a `jabber:iq:register` iq relayed by Prosody (`prosody/LINK.md`) |
//! | PUT | `/v1/accounts/{id}/key` | key rollover: `{"public_key", "revoked"?}` |
//! | DELETE | `/v1/accounts/{id}` | remove: `{"timestamp", "nonce", "signature"}` |
//! | GET | `/v1/server-key` | the server's public key, ASCII armor; with `Accept: application/json`, every trusted key |
//! | GET | `/healthz`, `/readyz` | liveness, and readiness (database answers) |
//!
//! The login check answers only clients in `login.allowed_ips` (as [`ApiState`] sees the client
//! address, through trusted proxies) or bearing `login.bearer_token`: it tells whether a key is
//! an account's current key, the XMPP server's business, not the public's. The XMPP relay
//! believes what its caller says about the XMPP client (its session's account, its
//! certificate), so it acts for any account: it answers only the token, or clients in
//! `login.relay_allowed_ips`, empty by default.

pub mod client_addr;
pub mod problem;
mod relay;
pub mod serve;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use axum::extract::ConnectInfo;
use ipnet::IpNet;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock::Clock;
use crate::phone::AccountId;
use crate::registrar::{
    Challenge, Code, Error, Origin, Registered, Registrar, RemovalProof, StartRequest,
    Verification, VerificationId,
};
pub use problem::Problem;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    registrar: Arc<Registrar>,
    clock: Arc<dyn Clock>,
    public_url: Option<Arc<str>>,
    trusted_proxies: Arc<[IpNet]>,
    proxy_header: crate::config::ProxyHeader,
    login_ips: Arc<[IpNet]>,
    relay_ips: Arc<[IpNet]>,
    /// [`token_digest`] of `login.bearer_token`: compared as a MAC so the comparison takes the
    /// same time wherever a guess differs.
    login_token: Option<Arc<[u8]>>,
    /// The XMPP handler behind the Prosody relay (answering as the domain).
    relay: Arc<crate::xmpp::Handler>,
}

/// Key of the MAC that bearer tokens are compared through (not a secret: the MAC only makes the
/// comparison constant-time).
const TOKEN_MAC_KEY: &[u8] = b"kontalk-registrar login bearer token";

fn token_mac(token: &[u8]) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(TOKEN_MAC_KEY).ok()?;
    mac.update(token);
    Some(mac)
}

fn token_digest(token: &[u8]) -> Option<Arc<[u8]>> {
    token_mac(token).map(|m| Arc::from(&m.finalize().into_bytes()[..]))
}

/// How the API is served.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// The service's address as providers call it (receipt signatures cover the full URL).
    pub public_url: Option<String>,
    /// Reverse proxies whose `proxy_header` names the client.
    pub trusted_proxies: Vec<IpNet>,
    /// The header they set.
    pub proxy_header: crate::config::ProxyHeader,
    /// Who may call the login check.
    pub login: crate::config::LoginAccess,
}

/// The API's router. Serve it with [`serve::serve`] (or with `ConnectInfo<SocketAddr>` in each
/// request's extensions some other way) so that the limits see client addresses.
pub fn router(registrar: Arc<Registrar>, clock: Arc<dyn Clock>, options: HttpOptions) -> Router {
    let max_body_bytes = options.max_body_bytes;
    let domain = registrar.settings().domain.clone();
    // Config validation refuses a domain that is no JID; this only guards the library entry.
    let relay_jid = xmpp_parsers::jid::Jid::new(&domain)
        .or_else(|_| xmpp_parsers::jid::Jid::new("localhost"))
        .unwrap_or_else(|_| unreachable!("localhost is a JID"));
    let state = ApiState {
        relay: Arc::new(crate::xmpp::Handler::new(
            registrar.clone(),
            clock.clone(),
            relay_jid,
        )),
        registrar,
        clock,
        public_url: options
            .public_url
            .map(|u| Arc::from(u.trim_end_matches('/'))),
        trusted_proxies: options.trusted_proxies.into(),
        proxy_header: options.proxy_header,
        login_ips: options.login.allowed_ips.into(),
        relay_ips: options.login.relay_allowed_ips.into(),
        login_token: options
            .login
            .bearer_token
            .as_ref()
            .and_then(|t| token_digest(t.expose().as_bytes())),
    };
    Router::new()
        .route("/v1/verifications", post(start))
        .route("/v1/verifications/{id}", get(status).delete(cancel))
        .route("/v1/verifications/{id}/resend", post(resend))
        .route("/v1/verifications/{id}/code", post(verify))
        .route("/v1/receipts/{provider}", get(receipt).post(receipt))
        .route("/v1/login-certificates/verify", post(check_login))
        .route("/v1/xmpp/relay", post(relay::relay_iq))
        .route("/v1/accounts/{id}/key", put(roll_over))
        .route("/v1/accounts/{id}", delete(remove))
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
/// Every body is a JSON object whose members the endpoint knows (each body type denies unknown
/// fields): an array is not read positionally, and the errors name members, not Rust types.
pub struct ApiJson<T>(pub T);

/// The JSON kind of `v`, as a person calls it.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Reads a request body as the JSON object `T`; the problem's detail says what is wrong.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let value: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| Problem::bad_request(format!("the request body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Problem::bad_request(format!(
            "the request body must be a JSON object ({{\"member\": value, ...}}), not {}",
            json_kind(&value)
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| Problem::bad_request(format!("the request body is not usable: {e}")))
}

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
        parse_body(&bytes).map(ApiJson)
    }
}

impl ApiState {
    fn problem(&self, e: Error) -> Problem {
        Problem::from_error(&e, self.clock.now())
    }

    /// The client of a request: the peer, or, when the peer is a trusted proxy, what the
    /// proxies say ([`client_addr`]).
    fn client_addr(&self, parts: &axum::http::request::Parts) -> Option<client_addr::ClientAddr> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()?
            .0
            .ip();
        let hops = client_addr::hops(&parts.headers, self.proxy_header);
        Some(client_addr::client(peer, &hops, &self.trusted_proxies))
    }

    /// The request's [`Origin`].
    fn origin(&self, parts: &axum::http::request::Parts) -> Origin {
        let client = self.client_addr(parts);
        let idempotency_key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(|k| k.trim().trim_matches('"').to_owned())
            .filter(|k| !k.is_empty() && k.len() <= 255);
        Origin {
            ip: client.map(|c| c.ip),
            ip_stand_in: client.is_some_and(|c| c.stand_in),
            jid: None,
            idempotency_key,
        }
    }
}

/// The request's [`Origin`].
pub struct Client(pub Origin);

impl axum::extract::FromRequestParts<ApiState> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Client(state.origin(parts)))
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
        "next_call_at": v.next_call_at.map(time),
        "attempts_left": v.attempts_left,
        "status": v.state.as_str(),
        "can_fallback": v.can_fallback,
        "delivery": v.delivery,
    })
}

fn verification_id(raw: &str) -> Result<VerificationId, Error> {
    raw.parse().map_err(|_| Error::NotFound)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(default)]
    locale: Option<String>,
}

/// The client's language: the body's `locale`, else the first tag of `Accept-Language`.
fn locale(body: Option<String>, headers: &HeaderMap) -> Option<String> {
    body.or_else(|| {
        headers
            .get(header::ACCEPT_LANGUAGE)?
            .to_str()
            .ok()?
            .split(',')
            .next()
            .map(|tag| tag.split(';').next().unwrap_or(tag).trim().to_owned())
            .filter(|tag| !tag.is_empty() && tag != "*")
    })
    .filter(|tag| {
        tag.len() <= 35
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

async fn start(
    State(s): State<ApiState>,
    Client(origin): Client,
    headers: HeaderMap,
    ApiJson(body): ApiJson<StartBody>,
) -> Response {
    let result = async {
        let phone = s.registrar.parse_phone(&body.phone).await?;
        s.registrar
            .start(StartRequest {
                phone,
                force: body.force,
                challenge: body.challenge,
                accepted_terms: body.accept_terms,
                fallback: body.fallback,
                locale: locale(body.locale, &headers),
                origin,
            })
            .await
    }
    .await;
    match result {
        Ok(v) if v.replayed => {
            let mut r = (StatusCode::OK, Json(verification_json(&v))).into_response();
            r.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            r
        }
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
#[serde(deny_unknown_fields)]
struct ResendBody {
    #[serde(default)]
    challenge: Option<Challenge>,
    #[serde(default)]
    fallback: bool,
}

async fn resend(
    State(s): State<ApiState>,
    Client(origin): Client,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ResendBody>,
) -> Response {
    let result = async {
        s.registrar
            .resend(
                &verification_id(&id)?,
                body.challenge,
                body.fallback,
                &origin,
            )
            .await
    }
    .await;
    match result {
        Ok(v) => Json(verification_json(&v)).into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    code: String,
    public_key: String,
}

async fn verify(
    State(s): State<ApiState>,
    Client(origin): Client,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CodeBody>,
) -> Response {
    let result = async {
        let id = verification_id(&id)?;
        let code: Code = body
            .code
            .parse()
            .map_err(|e: crate::registrar::BadCode| Error::BadRequest(e.to_string()))?;
        s.registrar.admit_key_check(&origin).await?;
        let key = s.registrar.parse_key(body.public_key).await?;
        s.registrar.verify(&id, &code, key, &origin).await
    }
    .await;
    match result {
        Ok(r) => Json(registered_json(&r)).into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

/// A certified key, as registration and rollover hand it back (`account` is the JID, as the
/// registration answer has always said).
fn registered_json(r: &Registered) -> serde_json::Value {
    json!({
        "account": r.jid,
        "fingerprint": r.fingerprint,
        "public_key": base64::engine::general_purpose::STANDARD.encode(&r.public_key),
    })
}

fn account_id(raw: &str) -> Result<AccountId, Problem> {
    raw.parse().map_err(|e: crate::phone::BadAccountId| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "no-account",
            "No such account",
            format!("{raw:?} names no account: {e}"),
        )
    })
}

fn unauthorized(detail: &str) -> Response {
    let mut r = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

impl ApiState {
    /// Whether the request may use the login check: the client is in `login.allowed_ips`, or
    /// it bears `login.bearer_token`.
    fn login_allowed(&self, parts: &axum::http::request::Parts) -> bool {
        self.allowed(parts, &self.login_ips)
    }

    /// Whether the request may use the XMPP relay: the client is in `login.relay_allowed_ips`
    /// (empty by default), or it bears `login.bearer_token`.
    fn relay_allowed(&self, parts: &axum::http::request::Parts) -> bool {
        self.allowed(parts, &self.relay_ips)
    }

    fn allowed(&self, parts: &axum::http::request::Parts, networks: &[IpNet]) -> bool {
        // A proxy's own address standing in for a client it did not name never counts.
        if let Some(c) = self.client_addr(parts)
            && !c.stand_in
            && networks.iter().any(|n| n.contains(&c.ip))
        {
            return true;
        }
        let Some(expected) = &self.login_token else {
            return false;
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        presented
            .and_then(|t| token_mac(t.as_bytes()))
            .is_some_and(|mac| mac.verify_slice(expected).is_ok())
    }
}

async fn check_login(State(s): State<ApiState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if !s.login_allowed(&parts) {
        return unauthorized(
            "the login check is open to the configured networks and to holders of the bearer token",
        );
    }
    let body = match Bytes::from_request(Request::from_parts(parts, body), &s).await {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                "the request body is larger than this server accepts",
            )
            .into_response();
        }
        Err(rejection) => {
            return Problem::bad_request(format!("cannot read the request body: {rejection}"))
                .into_response();
        }
    };
    match s.registrar.check_login(body.to_vec()).await {
        Ok(identity) => Json(json!({
            "jid": identity.jid,
            "account": identity.account,
            "fingerprint": identity.fingerprint,
        }))
        .into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloverBody {
    public_key: String,
    #[serde(default)]
    revoked: Option<String>,
}

async fn roll_over(
    State(s): State<ApiState>,
    Client(origin): Client,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RolloverBody>,
) -> Response {
    let account = match account_id(&id) {
        Ok(a) => a,
        Err(p) => return p.into_response(),
    };
    let result = async {
        // Counted before any key is parsed.
        s.registrar.throttle_account_request(&origin).await?;
        let key = s.registrar.parse_key(body.public_key).await?;
        let revoked = match body.revoked {
            Some(r) => Some(s.registrar.parse_key(r).await?),
            None => None,
        };
        s.registrar.roll_over(&account, key, revoked, None).await
    }
    .await;
    match result {
        Ok(r) => Json(registered_json(&r)).into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemovalBody {
    timestamp: i64,
    nonce: String,
    signature: String,
}

/// A detached signature as sent: ASCII armor as is, anything else as base64 of the binary form.
fn signature_bytes(text: &str) -> Result<Vec<u8>, Error> {
    let text = text.trim();
    if text.starts_with("-----BEGIN PGP") {
        return Ok(text.as_bytes().to_vec());
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| {
            Error::BadRequest(
                "signature: send an ASCII-armored signature or base64 of a binary one".into(),
            )
        })
}

async fn remove(
    State(s): State<ApiState>,
    Client(origin): Client,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RemovalBody>,
) -> Response {
    let account = match account_id(&id) {
        Ok(a) => a,
        Err(p) => return p.into_response(),
    };
    let result = async {
        // Counted before the signature is parsed.
        s.registrar.throttle_account_request(&origin).await?;
        let proof = RemovalProof::Signed {
            timestamp: body.timestamp,
            nonce: body.nonce,
            signature: signature_bytes(&body.signature)?,
        };
        s.registrar.remove(&account, proof).await
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => s.problem(e).into_response(),
    }
}

async fn receipt(
    State(s): State<ApiState>,
    Path(provider): Path<String>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = match (
        &s.public_url,
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) {
        (Some(base), _) => format!("{base}{path}"),
        (None, Some(host)) => format!("http://{host}{path}"),
        (None, None) => path.to_owned(),
    };
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let request = registrar_providers::ReceiptRequest {
        method: method.as_str(),
        url: &url,
        headers: &headers,
        body: &body,
    };
    use registrar_providers::ReceiptError as R;
    match s.registrar.receipt(&provider, &request).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(R::Unauthenticated) => Problem::new(
            StatusCode::UNAUTHORIZED,
            "receipt-unauthenticated",
            "Unauthenticated receipt",
            "the receipt's signature or token does not match",
        )
        .into_response(),
        Err(R::Malformed(why)) => {
            Problem::bad_request(format!("malformed receipt: {why}")).into_response()
        }
        Err(R::Unsupported) => Problem::new(
            StatusCode::NOT_FOUND,
            "no-receipts",
            "No receipts",
            "no configured provider of that name takes delivery receipts",
        )
        .into_response(),
    }
}

/// Whether the client asked for JSON rather than the armored key.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| {
            m.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        })
}

/// Every server key a login is judged against: the current one, and previous ones with the end
/// of their grace period (so that the XMPP server can follow a rotation).
fn server_keys_json(s: &ApiState) -> Result<serde_json::Value, Error> {
    let keys = s
        .registrar
        .trust()
        .keys()
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let armored = crate::openpgp::public_armored(&k.cert).map_err(|e| {
                tracing::error!(error = %e, "cannot armor a server key");
                Error::Internal
            })?;
            Ok(json!({
                "fingerprint": k.cert.fingerprint().to_hex(),
                "current": i == 0,
                "until": k.until.map(|u| time(DateTime::<Utc>::from(u))),
                "public_key": String::from_utf8_lossy(&armored),
            }))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(json!({
        "current": s.registrar.server_key().fingerprint(),
        "keys": keys,
    }))
}

async fn server_key(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if wants_json(&headers) {
        return match server_keys_json(&s) {
            Ok(v) => Json(v).into_response(),
            Err(e) => s.problem(e).into_response(),
        };
    }
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

/// How long readiness waits for the database: a load balancer's check must get an answer
/// however the database behaves.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn readyz(State(s): State<ApiState>) -> Response {
    let store = s.registrar.store();
    let version = tokio::time::timeout(READY_TIMEOUT, store.schema_version())
        .await
        .unwrap_or_else(|_| {
            Err(crate::registrar::ports::StoreError::Unavailable(format!(
                "the database did not answer within {}s",
                READY_TIMEOUT.as_secs()
            )))
        });
    match version {
        Ok(version) => Json(json!({
            "status": "ready",
            "database": store.kind(),
            "schema_version": version,
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            let now = s.clock.now();
            let detail = match &e {
                crate::registrar::ports::StoreError::Unavailable(why)
                    if why.contains("did not answer") =>
                {
                    why.clone()
                }
                _ => "the database does not answer".to_owned(),
            };
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database-unavailable",
                "Not ready",
                detail,
            )
            .with("status", json!("unavailable"))
            .with("database", json!(store.kind()))
            .retry_at(
                now + chrono::Duration::seconds(crate::registrar::STORE_RETRY_SECS),
                now,
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail<T: DeserializeOwned + std::fmt::Debug>(body: &str) -> String {
        let p = parse_body::<T>(body.as_bytes()).unwrap_err();
        assert_eq!(p.status(), StatusCode::BAD_REQUEST, "{body}");
        p.detail().to_owned()
    }

    #[test]
    fn bodies_are_json_objects_of_known_members() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Start {
            phone: String,
            #[serde(default)]
            force: bool,
        }
        let ok = parse_body::<Start>(br#"{"phone": "+15555215554", "force": true}"#).unwrap();
        assert_eq!((ok.phone.as_str(), ok.force), ("+15555215554", true));
        // An array is not read member by member, and its error names no Rust type.
        for (body, said) in [
            (r#"["+15555215554", true]"#, "must be a JSON object"),
            ("[]", "not an array"),
            ("\"+15555215554\"", "not a string"),
            ("5", "not a number"),
            ("null", "not null"),
            (r#"{"phone": "+1", "forse": true}"#, "unknown field `forse`"),
            (r#"{"force": true}"#, "missing field `phone`"),
            (
                r#"{"phone": 5}"#,
                "invalid type: integer `5`, expected a string",
            ),
            ("{", "not JSON"),
        ] {
            let d = detail::<Start>(body);
            assert!(d.contains(said), "{body}: {d}");
            assert!(!d.contains("struct") && !d.contains("Start"), "{body}: {d}");
        }
        // An empty body is the empty object.
        assert!(detail::<Start>("  ").contains("missing field `phone`"));
    }

    #[test]
    fn json_is_chosen_only_when_asked_for() {
        let accept = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static(v));
            wants_json(&h)
        };
        assert!(!wants_json(&HeaderMap::new()));
        assert!(accept("application/json"));
        assert!(accept("text/plain, Application/JSON; q=0.5"));
        assert!(!accept("application/pgp-keys"));
        assert!(!accept("*/*"));
    }

    #[test]
    fn signatures_are_armored_or_base64() {
        let armored = "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n";
        assert_eq!(
            signature_bytes(armored).ok(),
            Some(armored.trim().as_bytes().to_vec())
        );
        assert_eq!(signature_bytes(" AQID ").ok(), Some(vec![1, 2, 3]));
        assert!(matches!(signature_bytes("%%%"), Err(Error::BadRequest(_))));
    }

    #[test]
    fn bearer_tokens_compare_by_digest() {
        let expected = token_digest(b"a-token-of-16-chars");
        let matches = |t: &[u8]| {
            token_mac(t).is_some_and(|m| {
                m.verify_slice(expected.as_deref().unwrap_or_default())
                    .is_ok()
            })
        };
        assert!(matches(b"a-token-of-16-chars"));
        assert!(!matches(b"a-token-of-16-charS"));
        assert!(!matches(b""));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        phone: String,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        challenge: Option<Challenge>,
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("phone".to_owned()),
                        Just("force".to_owned()),
                        Just("challenge".to_owned()),
                        any::<String>()
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any JSON: accepted only as an object of known members, else a 400 whose detail
        /// names no Rust type.
        #[test]
        fn any_json_is_an_object_of_known_members_or_a_readable_400(v in json()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            match parse_body::<Body>(&bytes) {
                Ok(_) => {
                    let object = v.as_object().unwrap();
                    prop_assert!(object.keys().all(|k| ["phone", "force", "challenge"].contains(&k.as_str())));
                }
                Err(p) => {
                    prop_assert_eq!(p.status(), StatusCode::BAD_REQUEST);
                    prop_assert!(!p.detail().contains("struct"), "{}", p.detail());
                }
            }
        }

        /// Any bytes: never a panic, always an answer.
        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_body::<Body>(&bytes);
        }
    }
}
