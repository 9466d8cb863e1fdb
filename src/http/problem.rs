//! RFC 9457 problem details: the one place where core errors become HTTP statuses. Each problem
//! has a stable `type` (`urn:kontalk-registrar:problem:<name>`) that clients can match on; the
//! retryable ones carry `Retry-After` and `retry_at`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::registrar::{Error, Refusal};

/// Prefix of every problem type.
pub const TYPE_PREFIX: &str = "urn:kontalk-registrar:problem:";

/// A problem+json response.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    name: &'static str,
    title: &'static str,
    detail: String,
    retry_after: Option<(DateTime<Utc>, u64)>,
    extra: Map<String, Value>,
}

impl Problem {
    /// A problem with `status`, stable `name`, short `title` and `detail`.
    pub fn new(
        status: StatusCode,
        name: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            name,
            title,
            detail: detail.into(),
            retry_after: None,
            extra: Map::new(),
        }
    }

    /// 400 for a request that could not be read.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    /// Adds when to retry (`Retry-After` in whole seconds, at least 1, and `retry_at`).
    pub fn retry_at(mut self, at: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        let ms = (at - now).num_milliseconds().max(0);
        let secs = u64::try_from((ms + 999) / 1000).unwrap_or(1).max(1);
        self.retry_after = Some((at, secs));
        self
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The text for people.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Maps a core error, with `now` to compute `Retry-After`.
    pub fn from_error(e: &Error, now: DateTime<Utc>) -> Self {
        let detail = e.to_string();
        let p = match e {
            Error::BadRequest(_) => Self::bad_request(detail),
            Error::InvalidPhone(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-phone",
                "Invalid phone number",
                detail,
            ),
            Error::Conflict => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "Account exists",
                format!("{detail} Send the request again with force to replace its key."),
            ),
            Error::NotAllowed(r) => {
                let name = match r {
                    Refusal::RegistrationClosed => "registration-closed",
                    Refusal::TermsNotAccepted { .. } => "terms-not-accepted",
                    Refusal::DestinationBlocked => "destination-blocked",
                    Refusal::CountryNotServed => "country-not-served",
                    Refusal::PrefixNotServed => "prefix-not-served",
                    Refusal::AddressBlocked => "address-blocked",
                };
                let p = Self::new(StatusCode::FORBIDDEN, name, "Not allowed", detail);
                match r {
                    Refusal::TermsNotAccepted { url } => p.with("terms_url", json!(url)),
                    _ => p,
                }
            }
            Error::RateLimited { limit, .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                detail,
            )
            .with("limit", json!(limit.as_str())),
            Error::Busy { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "Temporarily unavailable",
                detail,
            ),
            Error::StoreUnavailable { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database-unavailable",
                "Temporarily unavailable",
                detail,
            ),
            Error::LimitsUnavailable { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "limits-unavailable",
                "Temporarily unavailable",
                detail,
            ),
            Error::IdempotencyKeyReused => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                detail,
            ),
            Error::WrongCode { attempts_left } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "wrong-code",
                "Wrong code",
                detail,
            )
            .with("attempts_left", json!(attempts_left)),
            Error::Locked { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "locked",
                "Verification locked",
                detail,
            ),
            Error::NoKeyTransfer => Self::new(
                StatusCode::NOT_FOUND,
                "no-key-transfer",
                "No key transfer",
                detail,
            ),
            Error::NoAccount => Self::new(
                StatusCode::NOT_FOUND,
                "no-account",
                "No such account",
                detail,
            ),
            Error::LoginRefused(r) => Self::new(
                StatusCode::FORBIDDEN,
                "login-refused",
                "Login refused",
                detail,
            )
            .with("check", json!(r.code())),
            Error::RolloverRefused(r) => {
                use crate::openpgp::RolloverError as R;
                let reason = match r {
                    R::SameKey => "same-key",
                    R::NotNewer => "not-newer",
                    R::NotSignedByOldKey(_) => "not-signed-by-old-key",
                    R::RevokedIsNotCurrent => "revoked-is-not-current",
                    R::NotRevoked => "not-revoked",
                    R::RetiredKey => "retired-key",
                };
                Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "rollover-refused",
                    "Key rollover refused",
                    detail,
                )
                .with("reason", json!(reason))
            }
            Error::Forbidden(f) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
                    .with("reason", json!(f.code()))
            }
            Error::KeyChanged => {
                Self::new(StatusCode::CONFLICT, "key-changed", "Key changed", detail)
            }
            Error::NotFound => Self::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "No such verification",
                detail,
            ),
            Error::BadKey(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad-key",
                "Unacceptable public key",
                detail,
            ),
            Error::NoProvider(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "no-provider",
                "Cannot deliver",
                detail,
            ),
            Error::DeliveryFailed => Self::new(
                StatusCode::BAD_GATEWAY,
                "delivery-failed",
                "Delivery failed",
                detail,
            ),
            Error::AlreadyVerified => Self::new(
                StatusCode::CONFLICT,
                "already-verified",
                "Verification completed",
                detail,
            ),
            Error::Internal => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "internal error; try again later",
            ),
        };
        match e.retry_at() {
            Some(at) => p.retry_at(at, now),
            None => p,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("type".into(), json!(format!("{TYPE_PREFIX}{}", self.name)));
        body.insert("title".into(), json!(self.title));
        body.insert("status".into(), json!(self.status.as_u16()));
        body.insert("detail".into(), json!(self.detail));
        if let Some((at, _)) = self.retry_after {
            body.insert(
                "retry_at".into(),
                json!(at.to_rfc3339_opts(SecondsFormat::Secs, true)),
            );
        }
        body.extend(self.extra);
        let mut response = (self.status, Value::Object(body).to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some((_, secs)) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openpgp::KeyError;
    use crate::phone::PhoneError;
    use crate::registrar::Limit;
    use crate::registrar::abuse::Scope;

    fn body(p: Problem) -> (StatusCode, Option<String>, Value) {
        let r = p.into_response();
        let status = r.status();
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let retry = r
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = futures_lite_body(r);
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    fn futures_lite_body(r: Response) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec()
        })
    }

    #[test]
    fn every_error_maps_to_its_status_and_type() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(90);
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::BadRequest("x".into()), 400, "bad-request"),
            (
                Error::InvalidPhone(PhoneError::Invalid),
                422,
                "invalid-phone",
            ),
            (Error::Conflict, 409, "conflict"),
            (
                Error::NotAllowed(Refusal::RegistrationClosed),
                403,
                "registration-closed",
            ),
            (
                Error::NotAllowed(Refusal::TermsNotAccepted {
                    url: "https://t".into(),
                }),
                403,
                "terms-not-accepted",
            ),
            (
                Error::RateLimited {
                    retry_at: later,
                    limit: Limit::Rate(Scope::Ip),
                },
                429,
                "rate-limited",
            ),
            (
                Error::LimitsUnavailable { retry_at: later },
                503,
                "limits-unavailable",
            ),
            (
                Error::StoreUnavailable { retry_at: later },
                503,
                "database-unavailable",
            ),
            (Error::Busy { retry_at: later }, 503, "busy"),
            (Error::IdempotencyKeyReused, 422, "idempotency-key-reused"),
            (
                Error::NotAllowed(Refusal::CountryNotServed),
                403,
                "country-not-served",
            ),
            (
                Error::NotAllowed(Refusal::PrefixNotServed),
                403,
                "prefix-not-served",
            ),
            (
                Error::NotAllowed(Refusal::AddressBlocked),
                403,
                "address-blocked",
            ),
            (Error::WrongCode { attempts_left: 3 }, 422, "wrong-code"),
            (Error::Locked { retry_at: later }, 429, "locked"),
            (Error::NotFound, 404, "not-found"),
            (Error::BadKey(KeyError::Encoding), 422, "bad-key"),
            (Error::NoProvider("n".into()), 502, "no-provider"),
            (Error::DeliveryFailed, 502, "delivery-failed"),
            (Error::AlreadyVerified, 409, "already-verified"),
            (Error::Internal, 500, "internal"),
        ];
        for (e, status, name) in cases {
            let (s, retry, v) = body(Problem::from_error(&e, now));
            assert_eq!(s.as_u16(), status, "{e:?}");
            assert_eq!(v["type"], format!("{TYPE_PREFIX}{name}"), "{e:?}");
            assert_eq!(v["status"], status);
            assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
            if status == 429 || status == 503 {
                assert_eq!(retry.as_deref(), Some("90"), "{e:?}");
                assert!(v["retry_at"].is_string());
            } else {
                assert_eq!(retry, None, "{e:?}");
            }
        }
    }

    #[test]
    fn conflict_keeps_kontalks_text_and_wrong_code_counts() {
        let now = Utc::now();
        let (_, _, v) = body(Problem::from_error(&Error::Conflict, now));
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .starts_with("Another user is registered with the same id.")
        );
        let (_, _, v) = body(Problem::from_error(
            &Error::WrongCode { attempts_left: 2 },
            now,
        ));
        assert_eq!(v["attempts_left"], 2);
    }

    #[test]
    fn refused_rollovers_say_which_check_failed() {
        use crate::openpgp::RolloverError as R;
        let cases = [
            (R::SameKey, "same-key"),
            (R::NotNewer, "not-newer"),
            (R::NotSignedByOldKey("a@b".into()), "not-signed-by-old-key"),
            (R::RevokedIsNotCurrent, "revoked-is-not-current"),
            (R::NotRevoked, "not-revoked"),
        ];
        for (r, reason) in cases {
            let (s, _, v) = body(Problem::from_error(&Error::RolloverRefused(r), Utc::now()));
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(v["type"], format!("{TYPE_PREFIX}rollover-refused"));
            assert_eq!(v["reason"], reason);
        }
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        let now = Utc::now();
        let (_, r, _) = body(Problem::from_error(
            &Error::RateLimited {
                retry_at: now + chrono::Duration::milliseconds(1500),
                limit: Limit::ResendWait,
            },
            now,
        ));
        assert_eq!(r.as_deref(), Some("2"));
        let (_, r, _) = body(Problem::from_error(
            &Error::RateLimited {
                retry_at: now,
                limit: Limit::ResendWait,
            },
            now,
        ));
        assert_eq!(r.as_deref(), Some("1"));
    }
}
