//! Accounts, their key changes and removals with the events that tell the XMPP server, key
//! transfers between devices, and nonces.

use async_trait::async_trait;

use super::{StoreError, Time};
use crate::phone::AccountId;

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Account id (hex SHA-1 of the number).
    pub id: AccountId,
    /// Fingerprint of the current key.
    pub fingerprint: String,
    /// The current key with our certification.
    pub public_key: Vec<u8>,
    /// First registration.
    pub created_at: Time,
    /// Last (forced) registration.
    pub updated_at: Time,
}

/// A private key waiting for a new device (Kontalk's key transfer).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyTransferRecord {
    /// Keyed hash of the token the new device presents.
    pub token_hash: String,
    /// Account id.
    pub account: AccountId,
    /// Fingerprint of the key uploaded (the account's key at the upload).
    pub fingerprint: String,
    /// The secret key as the client encrypted it (binary OpenPGP).
    pub private_key: Vec<u8>,
    /// Upload time.
    pub created_at: Time,
    /// When it is deleted unretrieved.
    pub expires_at: Time,
}

impl std::fmt::Debug for KeyTransferRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTransferRecord")
            .field("account", &self.account)
            .field("fingerprint", &self.fingerprint)
            .field("private_key_len", &self.private_key.len())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// An event to record with an account change, for each configured sink (none: no event). The
/// store fills in the fingerprints from the rows it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notice {
    /// Shared by the event's rows (one per sink).
    pub event_id: String,
    /// The sinks to deliver to (`webhook`, `xmpp`).
    pub sinks: Vec<String>,
}

/// What happened to an account, for the XMPP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A forced re-registration replaced the key.
    KeyReplaced,
    /// The owner replaced the key with one signed by the old key.
    KeyRolledOver,
    /// The account was removed.
    AccountRemoved,
    /// Somebody started a forced re-registration of the account's number (the key works on
    /// until a code is entered): its owner is told.
    ReregistrationStarted,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 4] = [
        Self::KeyReplaced,
        Self::KeyRolledOver,
        Self::AccountRemoved,
        Self::ReregistrationStarted,
    ];

    /// The stable name in events and rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyReplaced => "key-replaced",
            Self::KeyRolledOver => "key-rolled-over",
            Self::AccountRemoved => "account-removed",
            Self::ReregistrationStarted => "reregistration-started",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// An undelivered event, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Row id (per sink).
    pub id: i64,
    /// The event's id, the same for every sink.
    pub event_id: String,
    /// What happened.
    pub kind: EventKind,
    /// The account.
    pub account: AccountId,
    /// The key that stops working.
    pub old_fingerprint: Option<String>,
    /// The key that replaces it (none for a removal).
    pub new_fingerprint: Option<String>,
    /// When it happened.
    pub occurred_at: Time,
    /// Failed deliveries so far.
    pub attempts: u32,
}

/// A key rollover: the account's key `old` is replaced by `new`, if it still is `old`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// Fingerprint of the key being replaced.
    pub old_fingerprint: String,
    /// Fingerprint of the new key.
    pub new_fingerprint: String,
    /// The new key with our certification.
    pub public_key: Vec<u8>,
    /// Now.
    pub now: Time,
    /// The event to record.
    pub notice: Notice,
}

/// Accounts and what hangs off them.
#[async_trait]
pub trait Accounts: Send + Sync {
    /// The account `id`.
    async fn account(&self, id: &AccountId) -> Result<Option<AccountRecord>, StoreError>;

    /// Replaces the account's key if it still is `c.old_fingerprint`, recording the event in the
    /// same transaction; whether it did.
    async fn replace_key(&self, account: &AccountId, c: &KeyChange) -> Result<bool, StoreError>;

    /// Deletes the account if its key still is `fingerprint`, with its verification, key
    /// transfer and retired keys, recording the event in the same transaction; whether it did.
    async fn remove_account(
        &self,
        account: &AccountId,
        fingerprint: &str,
        now: Time,
        notice: &Notice,
    ) -> Result<bool, StoreError>;

    /// Whether `account` has retired the key `fingerprint` (replaced it by a forced
    /// re-registration or a rollover).
    async fn is_retired_key(
        &self,
        account: &AccountId,
        fingerprint: &str,
    ) -> Result<bool, StoreError>;

    /// Stores a key transfer, replacing any earlier one of the same account.
    async fn put_key_transfer(&self, t: &KeyTransferRecord) -> Result<(), StoreError>;

    /// Deletes and returns the key transfer of `token_hash` (at most once, whoever asks), if it
    /// has not expired at `now`.
    async fn take_key_transfer(
        &self,
        token_hash: &str,
        now: Time,
    ) -> Result<Option<KeyTransferRecord>, StoreError>;

    /// Records a nonce until `expires_at`; false when it was already recorded (a replay).
    async fn use_nonce(&self, key: &str, expires_at: Time) -> Result<bool, StoreError>;

    /// Claims up to `limit` undelivered events for `sink` that are due at `now`: each is held
    /// until `lease_until` (when it is tried again unless marked delivered), so that instances
    /// sharing the database do not deliver it at the same time.
    async fn claim_events(
        &self,
        sink: &str,
        now: Time,
        lease_until: Time,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Deletes a delivered event row.
    async fn event_delivered(&self, id: i64) -> Result<(), StoreError>;

    /// Counts a failed delivery and sets the next try.
    async fn event_failed(&self, id: i64, next_attempt_at: Time) -> Result<(), StoreError>;
}
