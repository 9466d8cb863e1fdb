//! XMPP transport: Kontalk's in-band registration (XEP-0077 with Kontalk's data forms) served as
//! an external component (XEP-0114), and to Prosody's client port through the Prosody relay.
//!
//! - [`forms`] parses the submitted forms into requests and renders the answers (pure, no I/O);
//! - [`errors`] maps the core's errors to stanza errors, once, as DESIGN.md's table says;
//! - [`handler`] turns one iq into core calls and one answer, for both transports;
//! - [`relay`] reads the iqs that Prosody's `mod_kontalk_register` relays (client streams, before
//!   and after login) and writes the answers back in the client namespace;
//! - [`component`] keeps the connection to the XMPP server up (backoff, keepalive), hands iqs
//!   to the handler and, with `events.xmpp_to`, sends the `xmpp` event sink's events;
//! - [`events`] renders one event as a message (pure).
//!
//! Registration comes from anonymous JIDs (component) or unauthenticated client streams (relay);
//! key rollover (FORM_TYPE `http://kontalk.org/protocol/register#key`), the private key upload
//! (`#privatekey`) and XEP-0077 `<remove/>` come from the account's own logged-in JID, which the
//! XMPP server vouches for; a new device retrieves the uploaded key before login.
//!
//! With tokio-xmpp's `component` feature, xmpp-parsers' default namespace is
//! `jabber:component:accept` for the whole build: every stanza parsed or built here is in it.

pub mod component;
pub mod errors;
pub mod events;
pub mod forms;
pub mod handler;
pub mod relay;

pub use handler::{Handler, Sender};
pub use xmpp_parsers;
