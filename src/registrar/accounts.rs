//! Registered accounts after registration: the login check, key rollover, removal, and the
//! events that tell the XMPP server when a key stops working.
//!
//! A login certificate is judged by [`crate::login_cert::verify`] against the trusted server keys
//! and then against the store: the key must be the account's current key. A rollover is
//! authorised by the old key itself (a certification on the new key), a removal by the account's
//! JID (XMPP, where the server authenticated it) or by a detached signature of the account's key
//! over [`removal_message`] with a fresh timestamp and a nonce used once. Every change that ends a
//! key's life writes an event in the same transaction; transports claim and deliver them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::ports::{AccountRecord, EventKind, EventRecord, KeyChange, Notice};
use super::{AuthFailure, Error, LoginRefusal, Registered, Registrar, from_unix};
use crate::login_cert::{self, LoginIdentity, Trust};
use crate::openpgp::{self, UserKey};
use crate::phone::AccountId;

/// How long a claimed event is held before another delivery may try it.
const EVENT_LEASE: i64 = 60;

/// The longest wait between two tries of an event.
const EVENT_RETRY_MAX: i64 = 3600;

/// Events claimed at once.
const EVENT_BATCH: u32 = 50;

/// How a removal is authorised.
#[derive(Debug, Clone)]
pub enum RemovalProof {
    /// The request comes from this bare JID, as the XMPP server authenticated it.
    Jid(String),
    /// A detached OpenPGP signature by the account's current key over
    /// [`removal_message`]`(jid, timestamp, nonce)`.
    Signed {
        /// Unix seconds, within `signature_max_age` of now.
        timestamp: i64,
        /// Used once: 16 to 128 characters `A-Z a-z 0-9 - _`.
        nonce: String,
        /// The signature, ASCII-armored or binary.
        signature: Vec<u8>,
    },
}

/// The exact text a client signs to remove its account `jid` (`<account>@<domain>`): four lines,
/// each ending in a newline.
pub fn removal_message(jid: &str, timestamp: i64, nonce: &str) -> String {
    format!(
        "kontalk-registrar account removal\naccount: {jid}\ntimestamp: {timestamp}\nnonce: {nonce}\n"
    )
}

fn valid_nonce(nonce: &str) -> bool {
    (16..=128).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An event for the XMPP server: the key `old_fingerprint` of `jid` stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Row id of this delivery (not shown).
    #[serde(skip)]
    pub row: i64,
    /// The event's id: the same in every sink and every retry (drop duplicates by it).
    pub id: String,
    /// `key-replaced`, `key-rolled-over`, `account-removed` or `reregistration-started`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The account id.
    pub account: String,
    /// The account's bare JID.
    pub jid: String,
    /// The key whose sessions must end.
    pub old_fingerprint: Option<String>,
    /// The key that replaces it, if any.
    pub new_fingerprint: Option<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// For an event the account's owner is told of (`reregistration-started`): the message to
    /// send to the account's JID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Failed deliveries before this one (not shown).
    #[serde(skip)]
    pub attempts: u32,
}

impl Registrar {
    /// Adds previous server keys whose certifications still log in until their end date.
    pub fn with_previous_keys(
        mut self,
        keys: impl IntoIterator<Item = (sequoia_openpgp::Cert, SystemTime)>,
    ) -> Self {
        for (cert, until) in keys {
            self.trust = self.trust.with_key(cert, Some(until));
        }
        self
    }

    /// The server keys a login is judged against (current first).
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Woken when an event was recorded here (events from other instances are found by polling).
    pub fn events_waker(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.events_waker.clone()
    }

    pub(super) fn notice(&self) -> Notice {
        Notice {
            event_id: hex::encode(rand::random::<[u8; 16]>()),
            sinks: self.settings.event_sinks.clone(),
        }
    }

    /// The registered account a logged-in XMPP session acts for: the account must exist, and when
    /// the transport knows the key the session logged in with (the Prosody link relays it), that
    /// key must still be the account's. A session of a replaced key is refused even before the
    /// XMPP server has closed it.
    pub async fn session_account(
        &self,
        account: &AccountId,
        login_fingerprint: Option<&str>,
    ) -> Result<AccountRecord, Error> {
        let record = self.store.account(account).await?.ok_or(Error::NoAccount)?;
        match login_fingerprint {
            Some(f) if !f.eq_ignore_ascii_case(&record.fingerprint) => {
                tracing::info!(account = %account, "request from a session of a replaced key");
                Err(Error::Forbidden(AuthFailure::LoginKeyReplaced))
            }
            _ => Ok(record),
        }
    }

    /// Parses a user's key as a transport received it (base64 of the binary key, or armor) on
    /// the cryptographic pool: parsing checks the key's self-signatures. Callers count the
    /// request against the client's limits first ([`Registrar::admit_key_check`],
    /// [`Registrar::throttle_account_request`]).
    pub async fn parse_key(&self, text: String) -> Result<UserKey, Error> {
        Ok(self.crypto.run(move || UserKey::parse(&text)).await??)
    }

    /// Takes one key check (a code submitted with a key or a certificate) from the client's
    /// budget, before the key is parsed.
    pub async fn admit_key_check(&self, origin: &super::Origin) -> Result<(), Error> {
        self.throttle_client("key", origin, self.settings.key_checks_per_client, None)
            .await
    }

    /// The key a client presents in its TLS certificate at registration step 2 (see
    /// [`login_cert::presented_key`]), as a user key; the failed check's code when refused.
    pub async fn key_from_certificate(
        &self,
        certificate: Vec<u8>,
    ) -> Result<Result<UserKey, &'static str>, Error> {
        self.crypto
            .run(move || {
                login_cert::presented_key(&certificate)
                    .map_err(|e| e.code())
                    .and_then(|cert| UserKey::from_cert(cert).map_err(|_| "secret-material"))
            })
            .await
    }

    /// Checks a login certificate (PEM or DER): the certificate's own checks (see
    /// [`login_cert::verify`]), then that its key is the account's current key.
    pub async fn check_login(&self, certificate: Vec<u8>) -> Result<LoginIdentity, Error> {
        let trust = self.trust.clone();
        let now = SystemTime::from(self.clock.now());
        let identity = self
            .crypto
            .run(move || login_cert::verify(&certificate, &trust, now))
            .await?
            .map_err(|e| Error::LoginRefused(LoginRefusal::Certificate(e)))?;
        let refused = |r: LoginRefusal| {
            tracing::info!(account = %identity.account, check = r.code(), "login refused");
            Err(Error::LoginRefused(r))
        };
        match self
            .store
            .account(&AccountId::for_stored(&identity.account))
            .await?
        {
            None => refused(LoginRefusal::UnknownAccount),
            Some(a) if !a.fingerprint.eq_ignore_ascii_case(&identity.fingerprint) => {
                refused(LoginRefusal::KeyReplaced)
            }
            Some(_) => Ok(identity),
        }
    }

    /// Replaces `account`'s key with `key`, certified by the current key (see
    /// [`openpgp::check_rollover`]); `revoked` is the old key with its revocation, when the client
    /// sends it. No message is sent: the old key is the proof. `login_fingerprint` is the key
    /// the requesting XMPP session logged in with, when the transport knows it: a session of the
    /// current key may prove the rollover with the current key's revocation alone, as Kontalk's
    /// Android client does.
    pub async fn roll_over(
        &self,
        account: &AccountId,
        key: UserKey,
        revoked: Option<UserKey>,
        login_fingerprint: Option<&str>,
    ) -> Result<Registered, Error> {
        let email = account.jid(&self.settings.domain);
        let now = self.clock.now();
        let when = SystemTime::from(now);
        // An account that does not exist is refused as a key its current key did not certify,
        // after the same work (checked against our own key, which certifies no rollover): the
        // answers must not tell registered numbers apart.
        let record = self.store.account(account).await?;
        let old = match &record {
            Some(r) => openpgp::parse_cert(&r.public_key).map_err(|e| {
                tracing::error!(account = %account, error = %e, "stored key does not parse");
                Error::Internal
            })?,
            None => self.server_key.public_cert().clone(),
        };
        let exists = record.is_some();
        let current_since = record.as_ref().map_or(UNIX_EPOCH, |r| {
            UNIX_EPOCH + Duration::from_secs(r.updated_at.timestamp().max(0).unsigned_abs())
        });
        let retired = match &record {
            Some(_) => {
                self.store
                    .is_retired_key(account, &key.fingerprint())
                    .await?
            }
            None => false,
        };
        let server = self.server_key.clone();
        let old_key_session = record.as_ref().is_some_and(|r| {
            login_fingerprint.is_some_and(|f| f.eq_ignore_ascii_case(&r.fingerprint))
        });
        let certified = {
            let email = email.clone();
            self.crypto
                .run(move || -> Result<_, Error> {
                    openpgp::check_user_key(&key, &email, when)?;
                    let proof = openpgp::check_rollover(
                        &key,
                        &old,
                        &email,
                        revoked.as_ref(),
                        old_key_session,
                        current_since,
                        when,
                    );
                    if !exists {
                        return Err(openpgp::RolloverError::NotSignedByOldKey(email).into());
                    }
                    proof?;
                    // Checked after the proof: only the holder of the current key learns it.
                    if retired {
                        return Err(openpgp::RolloverError::RetiredKey.into());
                    }
                    server.certify(&key, &email, when).map_err(|e| {
                        tracing::error!(error = %e, "certification failed");
                        Error::Internal
                    })
                })
                .await??
        };
        // Refused above when it did not exist.
        let Some(record) = record else {
            return Err(Error::Internal);
        };
        let change = KeyChange {
            old_fingerprint: record.fingerprint.clone(),
            new_fingerprint: certified.fingerprint.clone(),
            public_key: certified.bytes.clone(),
            now,
            notice: self.notice(),
        };
        if !self.store.replace_key(account, &change).await? {
            return Err(Error::KeyChanged);
        }
        self.events_waker.notify_waiters();
        tracing::info!(
            account = %account,
            old = %record.fingerprint,
            new = %certified.fingerprint,
            "key rolled over"
        );
        Ok(Registered {
            jid: email,
            account: account.clone(),
            fingerprint: certified.fingerprint,
            public_key: certified.bytes,
        })
    }

    /// Removes `account`, authorised by `proof`.
    pub async fn remove(&self, account: &AccountId, proof: RemovalProof) -> Result<(), Error> {
        let jid = account.jid(&self.settings.domain);
        let forbidden = |f: AuthFailure| {
            tracing::info!(account = %account, reason = f.code(), "removal refused");
            Error::Forbidden(f)
        };
        if let RemovalProof::Jid(from) = &proof
            && !from.eq_ignore_ascii_case(&jid)
        {
            return Err(forbidden(AuthFailure::NotAccountJid));
        }
        let now = self.clock.now();
        // A signed removal is judged before it is known whether the account exists, and a
        // missing account is refused exactly as a bad signature: the answers must not tell
        // registered numbers apart.
        let record = if let RemovalProof::Signed {
            timestamp,
            nonce,
            signature,
        } = proof
        {
            if !valid_nonce(&nonce) {
                return Err(Error::BadRequest(
                    "the nonce must be 16 to 128 characters of A-Z, a-z, 0-9, - and _".into(),
                ));
            }
            let max_age =
                i64::try_from(self.settings.signature_max_age.as_secs()).unwrap_or(i64::MAX);
            if timestamp.abs_diff(now.timestamp()) > max_age.unsigned_abs() {
                return Err(forbidden(AuthFailure::Stale));
            }
            let record = self.store.account(account).await?;
            // Without an account, the signature is still checked (against our own key, which
            // never signs removals), so that both refusals take the same work.
            let key = match &record {
                Some(r) => openpgp::parse_cert(&r.public_key).map_err(|e| {
                    tracing::error!(account = %account, error = %e, "stored key does not parse");
                    Error::Internal
                })?,
                None => self.server_key.public_cert().clone(),
            };
            let message = removal_message(&jid, timestamp, &nonce);
            let when = SystemTime::from(now);
            let good = self
                .crypto
                .run(move || openpgp::verify_detached(&key, message.as_bytes(), &signature, when))
                .await?;
            let Some(record) = record.filter(|_| good) else {
                return Err(forbidden(AuthFailure::BadSignature));
            };
            // Kept until the timestamp could no longer be accepted anyway.
            let key = format!("remove:{}:{nonce}", account.as_str());
            if !self
                .store
                .use_nonce(&key, from_unix(timestamp.saturating_add(max_age)))
                .await?
            {
                return Err(forbidden(AuthFailure::Replayed));
            }
            record
        } else {
            self.store.account(account).await?.ok_or(Error::NoAccount)?
        };
        if !self
            .store
            .remove_account(account, &record.fingerprint, now, &self.notice())
            .await?
        {
            return Err(Error::KeyChanged);
        }
        self.events_waker.notify_waiters();
        tracing::info!(account = %account, "account removed");
        Ok(())
    }

    /// Claims the due events for `sink`; deliver each, then report with
    /// [`Registrar::event_delivered`] or [`Registrar::event_failed`].
    pub async fn claim_events(&self, sink: &str) -> Result<Vec<Event>, Error> {
        let now = self.clock.now();
        let lease_until = now + chrono::Duration::seconds(EVENT_LEASE);
        let records = self
            .store
            .claim_events(sink, now, lease_until, EVENT_BATCH)
            .await?;
        Ok(records.into_iter().map(|r| self.event(r)).collect())
    }

    fn event(&self, r: EventRecord) -> Event {
        let account = r.account;
        let text = (r.kind == EventKind::ReregistrationStarted).then(|| {
            format!(
                "{}: someone asked at {} to register your number on another device. If it was \
                 you, enter there the code sent to your phone. If not, ignore the code and share \
                 it with nobody: without it your account stays yours, on this device.",
                self.settings.service_name,
                r.occurred_at.format("%Y-%m-%d %H:%M UTC"),
            )
        });
        Event {
            text,
            row: r.id,
            id: r.event_id,
            kind: r.kind.as_str(),
            jid: account.jid(&self.settings.domain),
            account: account.as_str().to_owned(),
            old_fingerprint: r.old_fingerprint,
            new_fingerprint: r.new_fingerprint,
            at: r.occurred_at,
            attempts: r.attempts,
        }
    }

    /// Marks an event delivered.
    pub async fn event_delivered(&self, event: &Event) -> Result<(), Error> {
        Ok(self.store.event_delivered(event.row).await?)
    }

    /// Schedules another try of an event, waiting longer after each failure (5 s doubling up to
    /// an hour).
    pub async fn event_failed(&self, event: &Event) -> Result<Duration, Error> {
        let wait = (5i64 << event.attempts.min(12)).min(EVENT_RETRY_MAX);
        self.store
            .event_failed(
                event.row,
                self.clock.now() + chrono::Duration::seconds(wait),
            )
            .await?;
        Ok(Duration::from_secs(wait.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_removal_message_is_four_lines() {
        assert_eq!(
            removal_message("abc@example.org", 1_700_000_000, "n0nce-n0nce-n0nce"),
            "kontalk-registrar account removal\naccount: abc@example.org\n\
             timestamp: 1700000000\nnonce: n0nce-n0nce-n0nce\n"
        );
    }

    #[test]
    fn nonces_are_long_and_plain() {
        assert!(valid_nonce("0123456789abcdef"));
        assert!(valid_nonce(&"a".repeat(128)));
        assert!(!valid_nonce("short"));
        assert!(!valid_nonce(&"a".repeat(129)));
        assert!(!valid_nonce("0123456789abcdef\n"));
        assert!(!valid_nonce("0123456789 abcdef"));
    }

    #[test]
    fn event_kinds_have_stable_names() {
        assert_eq!(EventKind::KeyReplaced.as_str(), "key-replaced");
        assert_eq!(EventKind::KeyRolledOver.as_str(), "key-rolled-over");
        assert_eq!(EventKind::AccountRemoved.as_str(), "account-removed");
        assert_eq!(
            EventKind::ReregistrationStarted.as_str(),
            "reregistration-started"
        );
    }
}
