//! The Prosody relay: `mod_kontalk_register` hands us each `jabber:iq:register` iq a client sent
//! on Prosody's client port (before or after login), with what Prosody knows of the client (its
//! address, its TLS client certificate, the JID and login key of its session), and sends back the
//! stanza we answer. The iq goes through the same [`Handler`] as the component's, so no protocol
//! logic is written twice; this module only moves stanzas between the client stream's namespace
//! (`jabber:client`) and the one xmpp-parsers is built for (`jabber:component:accept`), and
//! addresses the answer as the server would. The HTTP side (who may call, body limits) is
//! `http::relay`; the contract is `prosody/LINK.md`.

use std::net::IpAddr;

use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::minidom::{Element, Node};
use xmpp_parsers::ns;
use xmpp_parsers::stanza_error::DefinedCondition;

use super::errors::bad_request;
use super::handler::{Handler, Sender};

/// Namespace of client streams.
const CLIENT_NS: &str = "jabber:client";

/// Nesting deeper than this is refused before any tree is built (Kontalk's stanzas are six
/// deep; a tree thousands deep would exhaust the stack of whoever walks or drops it).
pub const MAX_DEPTH: usize = 32;

/// One relayed iq, as `prosody/LINK.md` describes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The iq as the client sent it, serialised by Prosody (its namespace absent or
    /// `jabber:client`).
    pub stanza: String,
    /// The virtual host that received it.
    pub host: String,
    /// The client's address.
    pub client_ip: IpAddr,
    /// The client's TLS certificate (PEM), when it presented one.
    pub certificate: Option<String>,
    /// The session's full JID, when the client is logged in.
    pub jid: Option<String>,
    /// The fingerprint of the key the session logged in with.
    pub login_fingerprint: Option<String>,
}

impl std::fmt::Debug for Relayed {
    /// The stanza holds phone numbers, codes and keys: only its size is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("stanza_len", &self.stanza.len())
            .field("host", &self.host)
            .field("certificate", &self.certificate.is_some())
            .field("session", &self.jid.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a relay request itself is unusable (the link is misused, not the protocol).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RelayError(pub String);

/// `element` and its descendants with namespace `from` moved to `to`.
fn renamespace(mut element: Element, from: &str, to: &str) -> Element {
    let ns = if element.ns() == from {
        to.to_owned()
    } else {
        element.ns()
    };
    let mut out = Element::builder(element.name(), ns).build();
    *out.attrs_mut() = element.attrs().clone();
    for node in element.take_nodes() {
        match node {
            Node::Element(child) => {
                out.append_child(renamespace(child, from, to));
            }
            text @ Node::Text(_) => out.append_node(text),
        }
    }
    out
}

/// Refuses XML nested deeper than [`MAX_DEPTH`], with rxml's streaming parser (no tree, no
/// recursion); malformed XML is left for the real parse to describe.
fn check_depth(xml: &str) -> Result<(), RelayError> {
    use xmpp_parsers::minidom::rxml::{RawEvent, RawReader};
    let mut reader = RawReader::new(xml.as_bytes());
    let mut depth = 0usize;
    loop {
        match reader.read() {
            Ok(Some(RawEvent::ElementHeadOpen(..))) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(RelayError(format!(
                        "the stanza is nested deeper than {MAX_DEPTH} elements"
                    )));
                }
            }
            Ok(Some(RawEvent::ElementFoot(..))) => depth = depth.saturating_sub(1),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return Ok(()),
        }
    }
}

/// Reads the relayed stanza as the component namespace's iq; an iq xmpp-parsers refuses but
/// whose `id` and type ask for an answer gets bad-request, anything else is the link's error.
fn read_iq(stanza: &str) -> Result<Result<Iq, Iq>, RelayError> {
    check_depth(stanza)?;
    let element = Element::from_reader_with_prefixes(stanza.as_bytes(), ns::DEFAULT_NS.to_owned())
        .map_err(|e| RelayError(format!("the stanza is not XML: {e}")))?;
    let element = renamespace(element, CLIENT_NS, ns::DEFAULT_NS);
    if !element.is("iq", ns::DEFAULT_NS) {
        return Err(RelayError("the stanza is not an iq".into()));
    }
    let id = element.attr("id").map(str::to_owned);
    let asks = matches!(element.attr("type"), Some("get" | "set"));
    match Iq::try_from(element) {
        Ok(iq) => Ok(Ok(iq)),
        Err(e) => match id {
            Some(id) if asks => Ok(Err(Iq::from_error(
                id,
                bad_request(&format!("malformed iq: {e}")),
            ))),
            _ => Err(RelayError(format!("the iq does not parse: {e}"))),
        },
    }
}

/// The answer to a relayed iq, serialised for the client stream, or `None` when nothing is to
/// be sent (a result or error addressed to us).
pub async fn relay(handler: &Handler, r: Relayed) -> Result<Option<String>, RelayError> {
    let domain = &handler.registrar().settings().domain;
    if !r.host.eq_ignore_ascii_case(domain) {
        return Err(RelayError(format!(
            "host {:?} is not this registrar's domain",
            r.host
        )));
    }
    let jid = r
        .jid
        .as_deref()
        .map(Jid::new)
        .transpose()
        .map_err(|e| RelayError(format!("jid: {e}")))?;
    // A logged-in session always has the key it logged in with: without it, the checks that
    // the key is still the account's could not be made.
    if jid.is_some() && r.login_fingerprint.is_none() {
        return Err(RelayError(
            "a session's jid comes with its login_fingerprint".into(),
        ));
    }
    let iq = read_iq(&r.stanza)?;
    let to_address = |iq: &Iq| iq.to().cloned();
    let (answer, server) = match iq {
        Ok(iq) => {
            let server = to_address(&iq);
            let sender = Sender {
                jid: jid.clone(),
                ip: Some(r.client_ip),
                certificate: r.certificate.map(String::into_bytes),
                login_fingerprint: r.login_fingerprint,
            };
            (handler.answer(iq, &sender).await, server)
        }
        Err(refusal) => (Some(refusal), None),
    };
    let Some(mut answer) = answer else {
        return Ok(None);
    };
    // As the server would: from the address the client wrote (the domain), to the session.
    let (from, to) = match &mut answer {
        Iq::Get { from, to, .. }
        | Iq::Set { from, to, .. }
        | Iq::Result { from, to, .. }
        | Iq::Error { from, to, .. } => (from, to),
    };
    *from = server;
    *to = jid;
    let element = renamespace(Element::from(answer), ns::DEFAULT_NS, CLIENT_NS);
    Ok(Some(String::from(&element)))
}

/// Whether `answer` (a serialised iq) is an error with `condition`; for tests and logs.
pub fn is_error(answer: &str, condition: DefinedCondition) -> bool {
    let Ok(element) = answer.parse::<Element>() else {
        return false;
    };
    let element = renamespace(element, CLIENT_NS, ns::DEFAULT_NS);
    match Iq::try_from(element) {
        Ok(Iq::Error { error, .. }) => error.defined_condition == condition,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_stanzas_read_in_either_spelling() {
        for stanza in [
            // Prosody leaves out the stream's default namespace.
            "<iq type='get' id='a1' to='localhost'><query xmlns='jabber:iq:register'/></iq>",
            "<iq xmlns='jabber:client' type='get' id='a1' to='localhost'><query xmlns='jabber:iq:register'/></iq>",
        ] {
            let iq = read_iq(stanza).unwrap().unwrap();
            assert_eq!(iq.id(), "a1");
            assert!(matches!(iq, Iq::Get { .. }), "{iq:?}");
        }
    }

    #[test]
    fn malformed_iqs_get_bad_request_or_refuse_the_relay() {
        // A set with no payload asks for an answer: bad-request.
        let refused = read_iq("<iq type='set' id='b'/>").unwrap().unwrap_err();
        let xml = String::from(&renamespace(
            Element::from(refused),
            ns::DEFAULT_NS,
            CLIENT_NS,
        ));
        assert!(xml.starts_with("<iq xmlns='jabber:client'"), "{xml}");
        assert!(is_error(&xml, DefinedCondition::BadRequest), "{xml}");
        for bad in [
            "not xml",
            "<message type='chat' id='x'/>",
            "<iq type='result'/>",
            "<iq type='bogus' id='c'><query xmlns='jabber:iq:register'/></iq>",
        ] {
            assert!(read_iq(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_a_tree_is_built() {
        let nested = |depth: usize| {
            format!(
                "<iq type='set' id='d'><query xmlns='jabber:iq:register'>{}{}</query></iq>",
                "<a>".repeat(depth),
                "</a>".repeat(depth)
            )
        };
        assert!(read_iq(&nested(MAX_DEPTH - 2)).is_ok());
        let e = read_iq(&nested(MAX_DEPTH)).unwrap_err();
        assert!(e.0.contains("nested deeper"), "{e}");
        // Far deeper than any stack holds as a tree: refused just the same, quickly.
        let e = read_iq(&nested(100_000)).unwrap_err();
        assert!(e.0.contains("nested deeper"), "{e}");
        // Unclosed elements count too.
        assert!(read_iq(&"<a>".repeat(1000)).is_err());
    }

    #[test]
    fn debug_output_shows_no_stanza() {
        let r = Relayed {
            stanza: "<iq><query>+15555215554 123456</query></iq>".into(),
            host: "localhost".into(),
            client_ip: "192.0.2.1".parse().unwrap(),
            certificate: None,
            jid: None,
            login_fingerprint: None,
        };
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("5555") && !shown.contains("123456"),
            "{shown}"
        );
    }

    #[test]
    fn answers_are_written_in_the_client_namespace() {
        let e: Element = "<iq xmlns='jabber:component:accept' type='error' id='x'><error type='modify'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
            .parse()
            .unwrap();
        let xml = String::from(&renamespace(e, ns::DEFAULT_NS, CLIENT_NS));
        assert_eq!(
            xml,
            "<iq xmlns='jabber:client' id='x' type='error'><error type='modify'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
        );
    }
}
