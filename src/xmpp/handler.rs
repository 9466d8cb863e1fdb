//! One iq in, at most one iq out: disco#info, ping, and `jabber:iq:register` get/set turned into
//! core calls. Every unhandled get or set is answered with service-unavailable; results and
//! errors addressed to us are never answered.
//!
//! Key rollover and `<remove/>` act on a registered account, so they are taken only from that
//! account's own JID: the XMPP server stamps `from` after authenticating the user, which makes
//! the bare JID `<account>@<domain>` the proof (any other sender gets forbidden, type auth).
//! Registration itself comes from anonymous JIDs, whose `from` proves nothing and is used only
//! as the origin for the abuse limits.

use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use xmpp_parsers::disco::{DiscoInfoQuery, DiscoInfoResult, Identity};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::minidom::Element;
use xmpp_parsers::ns;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use super::errors::{self, bad_request, stanza_error};
use super::forms::{self, Submission};
use crate::clock::Clock;
use crate::openpgp::UserKey;
use crate::phone::AccountId;
use crate::registrar::{Code, Error, Origin, Registrar, RemovalProof, StartRequest};

/// Answers iqs for the component `jid`.
pub struct Handler {
    registrar: Arc<Registrar>,
    clock: Arc<dyn Clock>,
    jid: Jid,
}

type Answer = Result<Option<Element>, StanzaError>;

// StanzaError is large, but it is the protocol's own error type, built at most once per request.
#[allow(clippy::result_large_err)]
impl Handler {
    /// A handler answering as `jid`.
    pub fn new(registrar: Arc<Registrar>, clock: Arc<dyn Clock>, jid: Jid) -> Self {
        Self {
            registrar,
            clock,
            jid,
        }
    }

    /// The component's JID.
    pub fn jid(&self) -> &Jid {
        &self.jid
    }

    /// The core this handler calls (the component also delivers its events).
    pub fn registrar(&self) -> &Arc<Registrar> {
        &self.registrar
    }

    /// The account whose own JID sent a request, with that bare JID; forbidden for anyone else.
    fn sender_account(&self, from: &Jid) -> Result<(AccountId, String), StanzaError> {
        let domain = &self.registrar.settings().domain;
        let account = from
            .node()
            .filter(|_| from.domain().as_str().eq_ignore_ascii_case(domain))
            .and_then(|node| node.as_str().parse::<AccountId>().ok());
        match account {
            Some(account) => Ok((account, from.to_bare().to_string())),
            None => Err(stanza_error(
                ErrorType::Auth,
                DefinedCondition::Forbidden,
                "only a registered account's own JID, logged in, can do this",
            )),
        }
    }

    fn core_error(&self, e: &Error) -> StanzaError {
        errors::from_error(e, self.clock.now())
    }

    /// The answer to `iq`, if it needs one.
    pub async fn handle(&self, iq: Iq) -> Option<Iq> {
        let from = iq.from().cloned()?;
        let id = iq.id().to_owned();
        let answer = match iq {
            Iq::Get { payload, .. } => self.get(payload),
            Iq::Set { payload, .. } => self.set(payload, &from).await,
            Iq::Result { .. } | Iq::Error { .. } => return None,
        };
        let reply = match answer {
            Ok(Some(payload)) => Iq::Result {
                from: None,
                to: None,
                id,
                payload: Some(payload),
            },
            Ok(None) => Iq::empty_result(from.clone(), id),
            Err(error) => Iq::from_error(id, error),
        };
        Some(reply.with_from(self.jid.clone()).with_to(from))
    }

    fn get(&self, payload: Element) -> Answer {
        if payload.is("query", ns::DISCO_INFO) {
            let query = DiscoInfoQuery::try_from(payload)
                .map_err(|e| bad_request(&format!("malformed disco#info query: {e}")))?;
            if query.node.is_some() {
                return Err(stanza_error(
                    ErrorType::Cancel,
                    DefinedCondition::ItemNotFound,
                    "no such node",
                ));
            }
            let name = format!("{} registration", self.registrar.settings().service_name);
            return Ok(Some(
                DiscoInfoResult {
                    node: None,
                    identities: vec![Identity {
                        category: "component".into(),
                        type_: "generic".into(),
                        lang: None,
                        name: Some(name),
                    }],
                    features: [ns::DISCO_INFO, ns::REGISTER, ns::PING]
                        .map(String::from)
                        .into_iter()
                        .collect(),
                    extensions: vec![],
                }
                .into(),
            ));
        }
        if payload.is("ping", ns::PING) {
            return Ok(None);
        }
        if payload.is("query", ns::REGISTER) {
            let settings = self.registrar.settings();
            let instructions = format!(
                "Enter your phone number in international format (+ and country code) to \
                 register with {}. A verification code will be sent to it.",
                settings.service_name
            );
            let form = forms::registration_form(
                &instructions,
                &self.registrar.challenges(),
                settings.terms_url.as_deref(),
            );
            return Ok(Some(form.into()));
        }
        Err(unsupported())
    }

    async fn set(&self, payload: Element, from: &Jid) -> Answer {
        if !payload.is("query", ns::REGISTER) {
            return Err(unsupported());
        }
        let submission =
            forms::parse_submission(payload).map_err(|e| bad_request(&e.to_string()))?;
        match submission {
            Submission::Start {
                phone,
                force,
                fallback,
                challenge,
                accept_terms,
            } => {
                let result = async {
                    let phone = self.registrar.parse_phone(&phone).await?;
                    self.registrar
                        .start(StartRequest {
                            phone,
                            force,
                            challenge,
                            accepted_terms: accept_terms,
                            fallback,
                            locale: None,
                            origin: Origin::jid(from.to_bare().to_string()),
                        })
                        .await
                }
                .await;
                match result {
                    Ok(v) => Ok(Some(forms::started_form(&v).into())),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
            Submission::Code { code, public_key } => {
                let code = Code::from_str(&code).map_err(|e| bad_request(&e.to_string()))?;
                let Some(public_key) = public_key else {
                    return Err(bad_request(
                        "the publickey field is required: base64 of your binary OpenPGP public key",
                    ));
                };
                let key =
                    UserKey::parse(&public_key).map_err(|e| self.core_error(&Error::BadKey(e)))?;
                let requester = from.to_bare().to_string();
                match self.registrar.verify_by_key(&code, key, &requester).await {
                    Ok(r) => Ok(Some(
                        forms::registered_form(
                            base64::engine::general_purpose::STANDARD.encode(&r.public_key),
                        )
                        .into(),
                    )),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
            Submission::Rollover {
                public_key,
                revoked,
            } => {
                let (account, _) = self.sender_account(from)?;
                let bad_key = |e| self.core_error(&Error::BadKey(e));
                let key = UserKey::parse(&public_key).map_err(bad_key)?;
                let revoked = revoked
                    .map(|r| UserKey::parse(&r))
                    .transpose()
                    .map_err(bad_key)?;
                match self.registrar.roll_over(&account, key, revoked).await {
                    Ok(r) => Ok(Some(
                        forms::rolled_over_form(
                            base64::engine::general_purpose::STANDARD.encode(&r.public_key),
                        )
                        .into(),
                    )),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
            Submission::Remove => {
                let (account, bare) = self.sender_account(from)?;
                match self
                    .registrar
                    .remove(&account, RemovalProof::Jid(bare))
                    .await
                {
                    Ok(()) => Ok(None),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
        }
    }
}

fn unsupported() -> StanzaError {
    stanza_error(
        ErrorType::Cancel,
        DefinedCondition::ServiceUnavailable,
        "this service does not handle that request",
    )
}
