//! One iq in, at most one iq out: disco#info, ping, and `jabber:iq:register` get/set turned into
//! core calls. Every unhandled get or set is answered with service-unavailable; results and
//! errors addressed to us are never answered. The same handler serves the external component and
//! the Prosody relay ([`super::relay`]); each transport says who sent the iq in a [`Sender`] and
//! addresses the answer itself.
//!
//! Key rollover, `<remove/>`, the private key upload and the registered user's `iq get` act on a
//! registered account, so they are taken only from that account's own JID: the XMPP server stamps
//! `from` after authenticating the user, which makes the bare JID `<account>@<domain>` the proof
//! (any other sender gets forbidden, type auth). Where the transport also knows the key the
//! session logged in with (the Prosody relay), that key must still be the account's.
//! Registration itself comes from anonymous JIDs or, through the relay, from streams that are not
//! authenticated; their `from` and address are used only as the origin for the abuse limits.
//!
//! Step 2 takes the user's key from the TLS client certificate when the transport saw one (as
//! Kontalk clients send it, see [`crate::login_cert::presented_key`]), or from the `publickey`
//! field; when both come they must be the same key. A certificate that fails any check is
//! answered as Kontalk's server does: bad-request "Invalid public key.".

use std::net::IpAddr;
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
use super::forms::{self, Query, Submission};
use crate::clock::Clock;
use crate::openpgp::UserKey;
use crate::phone::AccountId;
use crate::registrar::{Code, Error, Origin, Registrar, RemovalProof, StartRequest};

/// Kontalk's server's text for a step-2 key it cannot use, which its clients show.
pub const INVALID_PUBLIC_KEY: &str = "Invalid public key.";

/// Who sent an iq, as the transport that delivered it vouches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sender {
    /// The sender's JID as the XMPP server stamped it: over the component the anonymous or
    /// logged-in user's JID; over the Prosody relay the logged-in session's JID, `None` before
    /// the client authenticated.
    pub jid: Option<Jid>,
    /// The client's address (the relay knows it; the component does not).
    pub ip: Option<IpAddr>,
    /// The TLS client certificate the client presented, PEM or DER (the relay).
    pub certificate: Option<Vec<u8>>,
    /// The fingerprint of the key the session logged in with (the relay).
    pub login_fingerprint: Option<String>,
}

impl Sender {
    /// A sender known by its JID only (the component).
    pub fn jid(jid: Jid) -> Self {
        Self {
            jid: Some(jid),
            ..Self::default()
        }
    }

    fn origin(&self) -> Origin {
        Origin {
            ip: self.ip,
            jid: self.jid.as_ref().map(|j| j.to_bare().to_string()),
            ..Origin::default()
        }
    }
}

/// Answers iqs for the component `jid` and the Prosody relay.
pub struct Handler {
    registrar: Arc<Registrar>,
    clock: Arc<dyn Clock>,
    jid: Jid,
}

type Answer = Result<Option<Element>, StanzaError>;

// StanzaError is large, but it is the protocol's own error type, built at most once per request.
#[allow(clippy::result_large_err)]
impl Handler {
    /// A handler answering as `jid` (the component's JID; for the relay, the domain).
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

    /// The account named by the sender's JID (`<account>@<domain>`), if it names one.
    fn named_account(&self, sender: &Sender) -> Option<AccountId> {
        let domain = &self.registrar.settings().domain;
        sender
            .jid
            .as_ref()
            .filter(|from| from.domain().as_str().eq_ignore_ascii_case(domain))
            .and_then(|from| from.node())
            .and_then(|node| node.as_str().parse::<AccountId>().ok())
    }

    /// The account whose own logged-in session sent a request; forbidden for anyone else, and
    /// for a session of a key the account no longer has.
    async fn sender_account(&self, sender: &Sender) -> Result<AccountId, StanzaError> {
        let Some(account) = self.named_account(sender) else {
            return Err(stanza_error(
                ErrorType::Auth,
                DefinedCondition::Forbidden,
                "only a registered account's own JID, logged in, can do this",
            ));
        };
        match self
            .registrar
            .session_account(&account, sender.login_fingerprint.as_deref())
            .await
        {
            Ok(_) => Ok(account),
            Err(e) => Err(self.core_error(&e)),
        }
    }

    fn core_error(&self, e: &Error) -> StanzaError {
        errors::from_error(e, self.clock.now())
    }

    /// The component's answer to `iq` (from its JID to the sender), if it needs one.
    pub async fn handle(&self, iq: Iq) -> Option<Iq> {
        let from = iq.from().cloned()?;
        let reply = self.answer(iq, &Sender::jid(from.clone())).await?;
        Some(reply.with_from(self.jid.clone()).with_to(from))
    }

    /// The answer to `iq` from `sender`, without addressing (the transport sets `from` and `to`),
    /// if it needs one.
    pub async fn answer(&self, iq: Iq, sender: &Sender) -> Option<Iq> {
        let id = iq.id().to_owned();
        let answer = match iq {
            Iq::Get { payload, .. } => self.get(payload, sender).await,
            Iq::Set { payload, .. } => self.set(payload, sender).await,
            Iq::Result { .. } | Iq::Error { .. } => return None,
        };
        Some(match answer {
            Ok(payload) => Iq::Result {
                from: None,
                to: None,
                id,
                payload,
            },
            Err(error) => Iq::from_error(id, error),
        })
    }

    async fn get(&self, payload: Element, sender: &Sender) -> Answer {
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
            return match forms::parse_query(&payload).map_err(|e| bad_request(&e.0))? {
                Query::PrivateKey { token } => self.retrieve_private_key(&token, sender).await,
                Query::Form => self.registration_query(sender).await,
            };
        }
        Err(unsupported())
    }

    /// The registration form; for a registered account's own session, `<registered/>` and what
    /// it can change (XEP-0077 3.2.1).
    async fn registration_query(&self, sender: &Sender) -> Answer {
        let settings = self.registrar.settings();
        // A registered account's own session sees what it can change; an unregistered JID, or
        // a session of a replaced key, the registration form; a store failure, an error.
        let registered = match self.named_account(sender) {
            None => None,
            Some(account) => match self
                .registrar
                .session_account(&account, sender.login_fingerprint.as_deref())
                .await
            {
                Ok(_) => Some(account),
                Err(Error::NoAccount | Error::Forbidden(_)) => None,
                Err(e) => return Err(self.core_error(&e)),
            },
        };
        if let Some(account) = registered {
            let instructions = format!(
                "{} is registered with {}. You can replace its key (form {}), store your \
                 passphrase-protected private key for another device (form {}), or remove the \
                 account (<remove/>).",
                account.jid(&settings.domain),
                settings.service_name,
                forms::KEY_FORM_TYPE,
                forms::PRIVATE_KEY_FORM_TYPE,
            );
            return Ok(Some(forms::registered_query(&instructions)));
        }
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
        Ok(Some(form.into()))
    }

    async fn retrieve_private_key(&self, token: &str, sender: &Sender) -> Answer {
        let b64 = base64::engine::general_purpose::STANDARD;
        match self
            .registrar
            .retrieve_private_key(token, &sender.origin())
            .await
        {
            Ok(k) => Ok(Some(forms::account_query(
                &b64.encode(&k.private_key),
                &b64.encode(&k.public_key),
            ))),
            Err(e) => Err(self.core_error(&e)),
        }
    }

    async fn set(&self, payload: Element, sender: &Sender) -> Answer {
        if !payload.is("query", ns::REGISTER) {
            return Err(unsupported());
        }
        let submission =
            forms::parse_submission(payload).map_err(|e| bad_request(&e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
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
                            origin: sender.origin(),
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
                let key = self.step2_key(sender, public_key.as_deref()).await?;
                match self
                    .registrar
                    .verify_by_key(&code, key, &sender.origin())
                    .await
                {
                    Ok(r) => Ok(Some(
                        forms::registered_form(b64.encode(&r.public_key)).into(),
                    )),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
            Submission::Rollover {
                public_key,
                revoked,
            } => {
                let account = self.sender_account(sender).await?;
                self.registrar
                    .throttle_account_request(&sender.origin())
                    .await
                    .map_err(|e| self.core_error(&e))?;
                let parse = |text| async {
                    self.registrar
                        .parse_key(text)
                        .await
                        .map_err(|e| self.core_error(&e))
                };
                let key = parse(public_key).await?;
                let revoked = match revoked {
                    Some(r) => Some(parse(r).await?),
                    None => None,
                };
                match self
                    .registrar
                    .roll_over(&account, key, revoked, sender.login_fingerprint.as_deref())
                    .await
                {
                    Ok(r) => Ok(Some(
                        forms::rolled_over_form(b64.encode(&r.public_key)).into(),
                    )),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
            Submission::PrivateKey { private_key } => {
                let account = self.sender_account(sender).await?;
                self.registrar
                    .throttle_account_request(&sender.origin())
                    .await
                    .map_err(|e| self.core_error(&e))?;
                let compact: String = private_key
                    .chars()
                    .filter(|c| !c.is_ascii_whitespace())
                    .collect();
                let bytes = b64
                    .decode(compact.as_bytes())
                    .map_err(|_| bad_request("the privatekey field must be base64"))?;
                match self.registrar.upload_private_key(&account, bytes).await {
                    Ok(t) => Ok(Some(forms::private_key_token_form(&t.token).into())),
                    Err(e) => Err(self.core_error(&e)),
                }
            }
            Submission::Remove => {
                let account = self.sender_account(sender).await?;
                self.registrar
                    .throttle_account_request(&sender.origin())
                    .await
                    .map_err(|e| self.core_error(&e))?;
                let bare = account.jid(&self.registrar.settings().domain);
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

    /// The key of step 2: from the TLS client certificate and/or the `publickey` field.
    async fn step2_key(
        &self,
        sender: &Sender,
        public_key: Option<&str>,
    ) -> Result<UserKey, StanzaError> {
        let core_error = |e: Error| self.core_error(&e);
        // Counted before any key or certificate is parsed.
        self.registrar
            .admit_key_check(&sender.origin())
            .await
            .map_err(core_error)?;
        let from_form = match public_key {
            Some(text) => Some(
                self.registrar
                    .parse_key(text.to_owned())
                    .await
                    .map_err(core_error)?,
            ),
            None => None,
        };
        let Some(certificate) = sender.certificate.clone() else {
            return from_form.ok_or_else(|| {
                bad_request(
                    "the publickey field is required (base64 of your binary OpenPGP public \
                     key), or present your bridge certificate over TLS",
                )
            });
        };
        let presented = self
            .registrar
            .key_from_certificate(certificate)
            .await
            .map_err(|e| self.core_error(&e))?;
        let key = presented.map_err(|check| {
            tracing::info!(check, "step 2 certificate refused");
            bad_request(INVALID_PUBLIC_KEY)
        })?;
        match from_form {
            Some(form) if form.fingerprint() != key.fingerprint() => {
                tracing::info!("step 2 certificate and publickey field differ");
                Err(bad_request(INVALID_PUBLIC_KEY))
            }
            _ => Ok(key),
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
