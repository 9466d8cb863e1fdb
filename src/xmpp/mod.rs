//! XMPP transport: Kontalk's in-band registration (XEP-0077 with Kontalk's data forms) served as
//! an external component (XEP-0114).
//!
//! - [`forms`] parses the submitted forms into requests and renders the answers (pure, no I/O);
//! - [`errors`] maps the core's errors to stanza errors, once, as DESIGN.md's table says;
//! - [`handler`] turns one iq into core calls and one answer;
//! - [`component`] keeps the connection to the XMPP server up (backoff, keepalive), hands iqs
//!   to the handler and, with `events.xmpp_to`, sends the `xmpp` event sink's events;
//! - [`events`] renders one event as a message (pure).
//!
//! Registration comes from anonymous JIDs; key rollover (FORM_TYPE
//! `http://kontalk.org/protocol/register#key`) and XEP-0077 `<remove/>` come from the account's
//! own logged-in JID, which the XMPP server vouches for.
//!
//! With tokio-xmpp's `component` feature, xmpp-parsers' default namespace is
//! `jabber:component:accept` for the whole build: every stanza parsed or built here is in it.

pub mod component;
pub mod errors;
pub mod events;
pub mod forms;
pub mod handler;

pub use handler::Handler;
pub use xmpp_parsers;
