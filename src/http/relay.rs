//! `POST /v1/xmpp/relay`: the HTTP side of the Prosody link (`prosody/LINK.md`). It trusts what
//! its caller says of the client (address, certificate, session JID and login key), so it acts
//! for any account: open to `login.bearer_token`, or to `login.relay_allowed_ips` (none by
//! default). The stanza work is [`crate::xmpp::relay`]; every protocol outcome is a 200 with the
//! stanza to send.

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiJson, ApiState, Problem, unauthorized};
use crate::xmpp::relay::{Relayed, relay};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayBody {
    stanza: String,
    host: String,
    client_ip: std::net::IpAddr,
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    jid: Option<String>,
    #[serde(default)]
    login_fingerprint: Option<String>,
}

pub(super) async fn relay_iq(State(s): State<ApiState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if !s.relay_allowed(&parts) {
        return unauthorized(
            "the XMPP relay is open to holders of the bearer token (and to \
             login.relay_allowed_ips)",
        );
    }
    let request = Request::from_parts(parts, body);
    let body = match <ApiJson<RelayBody> as axum::extract::FromRequest<ApiState>>::from_request(
        request, &s,
    )
    .await
    {
        Ok(ApiJson(b)) => b,
        Err(problem) => return problem.into_response(),
    };
    let relayed = Relayed {
        stanza: body.stanza,
        host: body.host,
        client_ip: crate::registrar::abuse::canonical(body.client_ip),
        certificate: body.certificate.filter(|c| !c.trim().is_empty()),
        jid: body.jid.filter(|j| !j.is_empty()),
        login_fingerprint: body.login_fingerprint.filter(|f| !f.is_empty()),
    };
    match relay(&s.relay, relayed).await {
        Ok(stanza) => Json(json!({ "stanza": stanza })).into_response(),
        Err(e) => Problem::bad_request(format!("unusable relay request: {e}")).into_response(),
    }
}
