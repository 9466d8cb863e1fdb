//! The `xmpp` event sink: each event (a key replaced or rolled over, an account removed, a forced
//! re-registration started) becomes one message from the component to `events.xmpp_to`, so that a
//! module on the XMPP server can end the sessions of a key that no longer logs in. When a forced
//! re-registration starts, the component also sends the account a chat message saying so
//! ([`owner_message`]).
//!
//! ```xml
//! <message from='register.example.org' to='admin@example.org' id='event-<id>'>
//!   <body>key-replaced 4bdd…@example.org</body>
//!   <event xmlns='urn:kontalk-registrar:events' id='…' type='key-replaced' account='4bdd…'
//!          jid='4bdd…@example.org' old-fingerprint='…' new-fingerprint='…'
//!          at='2025-01-01T00:00:00Z'/>
//! </message>
//! ```
//! The message is of type normal, which on the wire is the absent `type` attribute (RFC 6121
//! 5.2.2): xmpp-parsers leaves out a default value, and the stream only takes typed stanzas.
//! Absent fingerprints are left out. The body is for a human reading the messages in a client;
//! programs read the `event` element. Delivery is at least once (a send that fails is tried again
//! later, and a send cannot be known to have reached the recipient), so receivers drop duplicates
//! by `id`. [`super::component`] delivers while it is connected; events wait in the store
//! otherwise.

use chrono::SecondsFormat;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::message::{Id, Lang, Message};
use xmpp_parsers::minidom::Element;
use xmpp_parsers::minidom::rxml::xml_ncname;

use crate::registrar::Event;

/// Namespace of the `event` element.
pub const EVENTS_NS: &str = "urn:kontalk-registrar:events";

/// The message carrying `event` from the component `from` to `to`.
pub fn event_message(event: &Event, from: &Jid, to: &Jid) -> Message {
    let mut element = Element::builder("event", EVENTS_NS)
        .attr(xml_ncname!("id").into(), event.id.as_str())
        .attr(xml_ncname!("type").into(), event.kind)
        .attr(xml_ncname!("account").into(), event.account.as_str())
        .attr(xml_ncname!("jid").into(), event.jid.as_str());
    if let Some(old) = &event.old_fingerprint {
        element = element.attr(xml_ncname!("old-fingerprint").into(), old.as_str());
    }
    if let Some(new) = &event.new_fingerprint {
        element = element.attr(xml_ncname!("new-fingerprint").into(), new.as_str());
    }
    element = element.attr(
        xml_ncname!("at").into(),
        event.at.to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    let mut message = Message::normal(to.clone())
        .with_body(Lang::default(), format!("{} {}", event.kind, event.jid))
        .with_payloads(vec![element.build()]);
    message.from = Some(from.clone());
    message.id = Some(Id(format!("event-{}", event.id)));
    message
}

/// For an event the account's owner is told of (a forced re-registration started), the chat
/// message from the component `from` to the account.
pub fn owner_message(event: &Event, from: &Jid) -> Option<Message> {
    let text = event.text.as_deref()?;
    let to = Jid::new(&event.jid).ok()?;
    let mut message = Message::chat(to).with_body(Lang::default(), text.to_owned());
    message.from = Some(from.clone());
    message.id = Some(Id(format!("notice-{}", event.id)));
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn event(old: Option<&str>, new: Option<&str>) -> Event {
        Event {
            row: 7,
            id: "0123456789abcdef0123456789abcdef".into(),
            kind: "key-replaced",
            account: "4bdd4f929f3a1062253e4e496bafba0bdfb5db75".into(),
            jid: "4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost".into(),
            old_fingerprint: old.map(str::to_owned),
            new_fingerprint: new.map(str::to_owned),
            at: chrono::DateTime::parse_from_rfc3339("2025-03-04T05:06:07Z")
                .unwrap()
                .to_utc(),
            text: None,
            attempts: 0,
        }
    }

    fn jid(s: &str) -> Jid {
        Jid::new(s).unwrap()
    }

    /// Serialised and parsed back as a receiver would.
    fn round_trip(m: Message) -> (String, Element) {
        let xml = String::from(&Element::from(m));
        (xml.clone(), Element::from_str(&xml).unwrap())
    }

    #[test]
    fn the_message_carries_every_field() {
        let m = event_message(
            &event(Some("AAAA1111"), Some("BBBB2222")),
            &jid("register.localhost"),
            &jid("admin@localhost"),
        );
        let (xml, el) = round_trip(m);
        assert!(el.is("message", xmpp_parsers::ns::DEFAULT_NS), "{xml}");
        // Type normal is the absent attribute (RFC 6121 5.2.2).
        assert!(matches!(el.attr("type"), None | Some("normal")), "{xml}");
        assert_eq!(el.attr("from"), Some("register.localhost"));
        assert_eq!(el.attr("to"), Some("admin@localhost"));
        assert_eq!(
            el.attr("id"),
            Some("event-0123456789abcdef0123456789abcdef")
        );
        let body = el.get_child("body", xmpp_parsers::ns::DEFAULT_NS).unwrap();
        assert_eq!(
            body.text(),
            "key-replaced 4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost"
        );
        let e = el.get_child("event", EVENTS_NS).unwrap();
        assert_eq!(e.attr("id"), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(e.attr("type"), Some("key-replaced"));
        assert_eq!(
            e.attr("account"),
            Some("4bdd4f929f3a1062253e4e496bafba0bdfb5db75")
        );
        assert_eq!(
            e.attr("jid"),
            Some("4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost")
        );
        assert_eq!(e.attr("old-fingerprint"), Some("AAAA1111"));
        assert_eq!(e.attr("new-fingerprint"), Some("BBBB2222"));
        assert_eq!(e.attr("at"), Some("2025-03-04T05:06:07Z"));
        // And xmpp-parsers reads it as a message with the event as a payload.
        let parsed = Message::try_from(el).unwrap();
        assert_eq!(parsed.type_, xmpp_parsers::message::MessageType::Normal);
        assert_eq!(parsed.payloads.len(), 1);
    }

    #[test]
    fn only_events_with_a_text_are_told_to_the_account() {
        assert!(
            owner_message(&event(Some("AAAA1111"), None), &jid("register.localhost")).is_none()
        );
        let mut started = event(Some("AAAA1111"), None);
        started.kind = "reregistration-started";
        started.text = Some("Kontalk: someone asked".into());
        let (xml, el) = round_trip(owner_message(&started, &jid("register.localhost")).unwrap());
        assert_eq!(el.attr("type"), Some("chat"), "{xml}");
        assert_eq!(
            el.attr("to"),
            Some("4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost")
        );
        assert_eq!(el.attr("from"), Some("register.localhost"));
        let body = el.get_child("body", xmpp_parsers::ns::DEFAULT_NS).unwrap();
        assert_eq!(body.text(), "Kontalk: someone asked");
        // The event message itself still goes to the XMPP server's module.
        let (_, el) = round_trip(event_message(
            &started,
            &jid("register.localhost"),
            &jid("localhost"),
        ));
        let e = el.get_child("event", EVENTS_NS).unwrap();
        assert_eq!(e.attr("type"), Some("reregistration-started"));
    }

    #[test]
    fn absent_fingerprints_are_left_out() {
        let mut removed = event(Some("AAAA1111"), None);
        removed.kind = "account-removed";
        let (xml, el) = round_trip(event_message(
            &removed,
            &jid("register.localhost"),
            &jid("admin@localhost/r"),
        ));
        let e = el.get_child("event", EVENTS_NS).unwrap();
        assert_eq!(e.attr("type"), Some("account-removed"));
        assert_eq!(e.attr("old-fingerprint"), Some("AAAA1111"));
        assert!(!xml.contains("new-fingerprint"), "{xml}");
        let (xml, _) = round_trip(event_message(
            &event(None, None),
            &jid("register.localhost"),
            &jid("admin@localhost"),
        ));
        assert!(!xml.contains("fingerprint"), "{xml}");
    }
}
