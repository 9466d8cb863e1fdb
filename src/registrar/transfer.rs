//! Moving to a new device, Kontalk's way: the logged-in client uploads its private key, which it
//! has already encrypted with a passphrase, and gets a token; the new device presents the token
//! before logging in and receives the encrypted key with the account's certified public key,
//! decrypts it with the passphrase and logs in with it, without a new SMS.
//!
//! Unlike Kontalk's server, which handed out a 40-digit token and kept the key without expiry:
//! the token is 160 random bits and stored only as a keyed hash; it is used once (the row is
//! deleted by the retrieval that gets it); it expires (`accounts.key_transfer_seconds`, 15
//! minutes by default); retrievals are rate limited per client address and in total before any
//! lookup; only the account's own session uploads, and only a key whose secret parts are all
//! passphrase-protected and whose fingerprint is the account's current key; a newer upload
//! replaces the older one, and a key replaced since the upload is not handed out.

use super::ports::KeyTransferRecord;
use super::{Error, Registrar, after, whole_seconds};
use crate::openpgp;
use crate::phone::AccountId;

/// What the new device receives.
#[derive(Clone, PartialEq, Eq)]
pub struct TransferredKey {
    /// The secret key exactly as the old device uploaded it (passphrase-protected).
    pub private_key: Vec<u8>,
    /// The account's current public key with our certification.
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for TransferredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferredKey")
            .field("private_key_len", &self.private_key.len())
            .field("public_key_len", &self.public_key.len())
            .finish()
    }
}

/// The token a new device presents, and until when.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyToken {
    /// 40 hex digits (160 random bits).
    pub token: String,
    /// When the uploaded key is deleted unretrieved.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Debug for KeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The stored form of a token as a client typed it: hex digits, any case, spaces and dashes
/// ignored.
fn normalize(token: &str) -> Option<String> {
    let t: String = token
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    (t.len() == 40 && t.bytes().all(|b| b.is_ascii_hexdigit())).then_some(t)
}

impl Registrar {
    /// Stores `private_key` (binary or armored OpenPGP, every secret part passphrase-protected;
    /// kept as binary) of `account` for a new device, and hands out its token. The caller has authenticated the
    /// account's own session (see [`Registrar::session_account`]).
    pub async fn upload_private_key(
        &self,
        account: &AccountId,
        private_key: Vec<u8>,
    ) -> Result<KeyToken, Error> {
        let record = self.store.account(account).await?.ok_or(Error::NoAccount)?;
        let (fingerprint, private_key) = self
            .crypto
            .run(move || openpgp::check_encrypted_secret_key(&private_key))
            .await?
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        if !fingerprint.eq_ignore_ascii_case(&record.fingerprint) {
            return Err(Error::BadRequest(
                "the private key is not the account's current key".into(),
            ));
        }
        let token = hex::encode(rand::random::<[u8; 20]>());
        let now = whole_seconds(self.clock.now());
        let expires_at = after(now, self.settings.key_transfer_lifetime);
        self.store
            .put_key_transfer(&KeyTransferRecord {
                token_hash: self.secret.token_id("key-transfer", &token),
                account: account.clone(),
                fingerprint: record.fingerprint,
                private_key,
                created_at: now,
                expires_at,
            })
            .await?;
        tracing::info!(account = %account, expires_at = %expires_at.to_rfc3339(), "private key stored for a new device");
        Ok(KeyToken { token, expires_at })
    }

    /// Hands out, once, the private key stored under `token`, with the account's current public
    /// key. Rate limited per client address and in total before anything is looked up.
    pub async fn retrieve_private_key(
        &self,
        token: &str,
        origin: &super::Origin,
    ) -> Result<TransferredKey, Error> {
        self.throttle_retrievals(origin).await?;
        let Some(token) = normalize(token) else {
            return Err(Error::NoKeyTransfer);
        };
        let now = self.clock.now();
        let transfer = self
            .store
            .take_key_transfer(&self.secret.token_id("key-transfer", &token), now)
            .await?
            .ok_or(Error::NoKeyTransfer)?;
        let current = self.store.account(&transfer.account).await?;
        let Some(current) = current.filter(|a| a.fingerprint == transfer.fingerprint) else {
            tracing::info!(account = %transfer.account, "key transfer refused: the key was replaced since");
            return Err(Error::NoKeyTransfer);
        };
        tracing::info!(account = %transfer.account, "private key handed to a new device");
        Ok(TransferredKey {
            private_key: transfer.private_key,
            public_key: current.public_key,
        })
    }

    async fn throttle_retrievals(&self, origin: &super::Origin) -> Result<(), Error> {
        self.throttle_client(
            "key-retrieval",
            origin,
            self.settings.key_retrievals_per_ip,
            self.settings.key_retrievals_global,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_forty_hex_digits_typed_loosely() {
        let t = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(normalize(t).as_deref(), Some(t));
        assert_eq!(
            normalize(" 0123-4567-89AB-CDEF-0123 4567 89ab cdef 0123 4567 ").as_deref(),
            Some(t)
        );
        assert_eq!(normalize(&t[..39]), None);
        assert_eq!(normalize(&format!("{t}0")), None);
        assert_eq!(normalize("g123456789abcdef0123456789abcdef01234567"), None);
        assert_eq!(normalize(""), None);
    }

    #[test]
    fn debug_output_hides_tokens_and_keys() {
        let token = KeyToken {
            token: "0123456789abcdef0123456789abcdef01234567".into(),
            expires_at: chrono::Utc::now(),
        };
        assert!(!format!("{token:?}").contains("0123456789"));
        let key = TransferredKey {
            private_key: b"SECRET".to_vec(),
            public_key: b"PUBLIC".to_vec(),
        };
        assert!(!format!("{key:?}").contains("SECRET"));
    }
}
