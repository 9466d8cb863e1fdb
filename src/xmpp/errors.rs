//! Core errors as stanza errors, as Kontalk clients expect them (DESIGN.md's table): conflict
//! (modify) with Kontalk's text, service-unavailable of type *wait* for limits with the retry
//! time in the text and in a `<retry/>` element, bad-request for bad numbers, codes and keys,
//! not-allowed when registration is closed, item-not-found when nothing is pending.

use chrono::{DateTime, SecondsFormat, Utc};
use xmpp_parsers::minidom::Element;
use xmpp_parsers::minidom::rxml::xml_ncname;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::registrar::{Error, Refusal};

/// Namespace of the machine-readable retry element inside errors.
pub const RETRY_NS: &str = "urn:kontalk-registrar:retry";

/// A stanza error with an English text.
pub fn stanza_error(type_: ErrorType, condition: DefinedCondition, text: &str) -> StanzaError {
    StanzaError::new(type_, condition, "en", text)
}

/// `bad-request` (modify) with `text`.
pub fn bad_request(text: &str) -> StanzaError {
    stanza_error(ErrorType::Modify, DefinedCondition::BadRequest, text)
}

/// `<retry xmlns='urn:kontalk-registrar:retry' at='RFC 3339' seconds='N' limit='name'/>`.
fn retry_element(at: DateTime<Utc>, now: DateTime<Utc>, limit: Option<&str>) -> Element {
    let secs = ((at - now).num_milliseconds().max(0) + 999) / 1000;
    let mut b = Element::builder("retry", RETRY_NS)
        .attr(
            xml_ncname!("at").into(),
            at.to_rfc3339_opts(SecondsFormat::Secs, true),
        )
        .attr(xml_ncname!("seconds").into(), secs.max(1).to_string());
    if let Some(limit) = limit {
        b = b.attr(xml_ncname!("limit").into(), limit);
    }
    b.build()
}

/// Maps a core error; `now` gives the retry element its delay.
pub fn from_error(e: &Error, now: DateTime<Utc>) -> StanzaError {
    use DefinedCondition as C;
    use ErrorType as T;
    let text = e.to_string();
    let mut err = match e {
        Error::BadRequest(_)
        | Error::IdempotencyKeyReused
        | Error::InvalidPhone(_)
        | Error::WrongCode { .. }
        | Error::BadKey(_)
        | Error::RolloverRefused(_) => stanza_error(T::Modify, C::BadRequest, &text),
        Error::NoAccount | Error::NoKeyTransfer => stanza_error(T::Cancel, C::ItemNotFound, &text),
        Error::LoginRefused(_) | Error::Forbidden(_) => stanza_error(T::Auth, C::Forbidden, &text),
        Error::KeyChanged => stanza_error(T::Wait, C::Conflict, &text),
        Error::Conflict => stanza_error(T::Modify, C::Conflict, &text),
        Error::NotAllowed(Refusal::TermsNotAccepted { .. }) => {
            stanza_error(T::Modify, C::NotAllowed, &text)
        }
        Error::NotAllowed(_) => stanza_error(T::Cancel, C::NotAllowed, &text),
        Error::RateLimited { .. }
        | Error::Locked { .. }
        | Error::LimitsUnavailable { .. }
        | Error::StoreUnavailable { .. }
        | Error::Busy { .. }
        | Error::DeliveryFailed => stanza_error(T::Wait, C::ServiceUnavailable, &text),
        Error::NotFound => stanza_error(T::Cancel, C::ItemNotFound, &text),
        Error::NoProvider(_) => stanza_error(T::Modify, C::NotAcceptable, &text),
        Error::AlreadyVerified => stanza_error(T::Cancel, C::NotAcceptable, &text),
        Error::Internal => stanza_error(T::Wait, C::InternalServerError, &text),
    };
    if let Some(at) = e.retry_at() {
        let limit = match e {
            Error::RateLimited { limit, .. } => Some(limit.as_str()),
            Error::Locked { .. } => Some("locked"),
            _ => None,
        };
        err.other = Some(retry_element(at, now, limit));
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openpgp::KeyError;
    use crate::phone::PhoneError;
    use crate::registrar::Limit;
    use crate::registrar::abuse::Scope;

    #[test]
    fn the_table_of_design_md() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(42);
        use DefinedCondition as C;
        use ErrorType as T;
        let cases = [
            (Error::BadRequest("x".into()), T::Modify, C::BadRequest),
            (
                Error::InvalidPhone(PhoneError::Invalid),
                T::Modify,
                C::BadRequest,
            ),
            (Error::Conflict, T::Modify, C::Conflict),
            (
                Error::NotAllowed(Refusal::RegistrationClosed),
                T::Cancel,
                C::NotAllowed,
            ),
            (
                Error::RateLimited {
                    retry_at: later,
                    limit: Limit::Rate(Scope::Number),
                },
                T::Wait,
                C::ServiceUnavailable,
            ),
            (
                Error::WrongCode { attempts_left: 2 },
                T::Modify,
                C::BadRequest,
            ),
            (
                Error::Locked { retry_at: later },
                T::Wait,
                C::ServiceUnavailable,
            ),
            (Error::NotFound, T::Cancel, C::ItemNotFound),
            (Error::BadKey(KeyError::Encoding), T::Modify, C::BadRequest),
            (Error::NoProvider("n".into()), T::Modify, C::NotAcceptable),
            (Error::Internal, T::Wait, C::InternalServerError),
            (
                Error::StoreUnavailable { retry_at: later },
                T::Wait,
                C::ServiceUnavailable,
            ),
            (
                Error::Busy { retry_at: later },
                T::Wait,
                C::ServiceUnavailable,
            ),
        ];
        for (e, t, c) in cases {
            let s = from_error(&e, now);
            assert_eq!((s.type_, s.defined_condition.clone()), (t, c), "{e:?}");
            assert_eq!(
                s.texts.get("en").map(String::as_str),
                Some(e.to_string().as_str())
            );
            assert_eq!(s.other.is_some(), e.retry_at().is_some(), "{e:?}");
        }
        let conflict = from_error(&Error::Conflict, now);
        assert_eq!(
            conflict.texts["en"],
            "Another user is registered with the same id."
        );
        let limited = from_error(
            &Error::RateLimited {
                retry_at: later,
                limit: Limit::Rate(Scope::Number),
            },
            now,
        );
        let retry = limited.other.unwrap();
        assert!(retry.is("retry", RETRY_NS));
        assert_eq!(retry.attr("seconds"), Some("42"));
        assert_eq!(retry.attr("limit"), Some("number"));
        assert!(
            limited.texts["en"].contains(&later.to_rfc3339()[..16]),
            "time in the text"
        );
    }

    #[test]
    fn serialises_as_xmpp_expects() {
        let e = from_error(&Error::Conflict, Utc::now());
        let xml = String::from(&Element::from(e));
        assert!(
            xml.contains("type='modify'") || xml.contains("type=\"modify\""),
            "{xml}"
        );
        assert!(
            xml.contains("<conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"),
            "{xml}"
        );
        assert!(
            xml.contains("Another user is registered with the same id."),
            "{xml}"
        );
    }
}
