//! Integration tests: one binary (link time), one module per area. Every test starts the real
//! service on `127.0.0.1:0` with its own data directory.

mod abuse;
mod cli;
mod database;
mod fuzz;
mod gpg;
mod guess_budget;
mod harness;
mod http_accounts;
mod http_api;
mod instances;
mod prosody_e2e;
mod providers;
mod pumping;
mod xmpp_e2e;
mod xmpp_handler;
mod xmpp_relay;
