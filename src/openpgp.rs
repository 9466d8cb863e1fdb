//! OpenPGP: the server key, the policy for users' keys, and certification.
//!
//! A user proves a phone number and hands in an OpenPGP certificate; we certify (signature type
//! 0x10, generic certification) the User ID whose email is `<account>@<domain>` with the server
//! key and return the certificate with that certification. The XMPP server later accepts a login
//! when the key carries it. Parsing and signing are CPU work: callers run them in
//! `spawn_blocking` when the key may be RSA.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sequoia_openpgp as pgp;

use pgp::cert::prelude::*;
use pgp::crypto::{KeyPair, mpi};
use pgp::packet::Signature;
use pgp::parse::Parse;
use pgp::policy::{Policy, StandardPolicy};
use pgp::serialize::SerializeInto;
use pgp::types::{Curve, PublicKeyAlgorithm, RevocationStatus, SignatureType};

/// Largest public key we parse, in bytes (binary). Kontalk keys are a few KiB; the HTTP body limit
/// is lower anyway, this keeps other transports honest.
pub const MAX_KEY_BYTES: usize = 48 * 1024;

/// Smallest RSA primary key accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// How far in the future a user's key may have been created: phones' clocks run fast.
pub const CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// Why a user's key was refused. Each text says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64 of a binary key nor ASCII armor.
    #[error("the public key is neither base64 of a binary OpenPGP key nor ASCII armor")]
    Encoding,
    /// Larger than [`MAX_KEY_BYTES`].
    #[error("the public key is larger than {MAX_KEY_BYTES} bytes")]
    TooLarge,
    /// Not OpenPGP, or broken.
    #[error("the public key does not parse as an OpenPGP certificate: {0}")]
    Parse(String),
    /// Zero or several certificates.
    #[error("expected exactly one OpenPGP certificate, found {0}")]
    Count(usize),
    /// Secret key material was sent: the client must never hand it out.
    #[error("the key contains secret key material; send the public key only")]
    SecretMaterial,
    /// Not valid under the standard policy (bad or missing self-signatures, weak algorithms).
    #[error("the key is not valid under the OpenPGP standard policy: {0}")]
    Policy(String),
    /// Expired or revoked.
    #[error("the key is expired or revoked")]
    NotAlive,
    /// Primary key algorithm or size not accepted.
    #[error("the primary key must be RSA of at least {MIN_RSA_BITS} bits or Ed25519")]
    Algorithm,
    /// No valid User ID names the account.
    #[error("the key has no valid User ID with the email {0}")]
    NoMatchingUserId(String),
    /// More User IDs, subkeys or signatures than any client's key has: each costs work.
    #[error("the key has {0}; at most {1} are accepted")]
    TooComplex(String, usize),
}

/// The most User IDs (and user attributes) a user's key may have.
pub const MAX_USER_IDS: usize = 16;
/// The most subkeys a user's key may have.
pub const MAX_SUBKEYS: usize = 16;
/// The most signatures (self-signatures, certifications, revocations, and ones that do not
/// verify) a user's key may carry.
pub const MAX_SIGNATURES: usize = 100;

/// Refuses a key with more parts than [`MAX_USER_IDS`], [`MAX_SUBKEYS`] or
/// [`MAX_SIGNATURES`]: every signature is verified somewhere.
pub fn check_complexity(cert: &Cert) -> Result<(), KeyError> {
    let user_ids = cert.userids().count() + cert.user_attributes().count();
    if user_ids > MAX_USER_IDS {
        return Err(KeyError::TooComplex(
            format!("{user_ids} User IDs"),
            MAX_USER_IDS,
        ));
    }
    let subkeys = cert.keys().subkeys().count();
    if subkeys > MAX_SUBKEYS {
        return Err(KeyError::TooComplex(
            format!("{subkeys} subkeys"),
            MAX_SUBKEYS,
        ));
    }
    let signatures = cert.primary_key().signatures().count()
        + cert
            .userids()
            .map(|u| u.signatures().count())
            .sum::<usize>()
        + cert
            .user_attributes()
            .map(|u| u.signatures().count())
            .sum::<usize>()
        + cert
            .keys()
            .subkeys()
            .map(|k| k.signatures().count())
            .sum::<usize>()
        + cert.bad_signatures().count();
    if signatures > MAX_SIGNATURES {
        return Err(KeyError::TooComplex(
            format!("{signatures} signatures"),
            MAX_SIGNATURES,
        ));
    }
    Ok(())
}

/// The server's signing key.
pub struct ServerKey {
    cert: Cert,
    keypair: KeyPair,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerKey({})", self.cert.fingerprint().to_hex())
    }
}

/// Why the server key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerKeyError {
    /// Reading or writing the file failed.
    #[error("server key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is no usable secret key.
    #[error("server key file {path}: {reason}")]
    Unusable {
        /// The file.
        path: String,
        /// What is wrong (never the key material).
        reason: String,
    },
}

impl ServerKey {
    /// Generates an Ed25519 certification key whose User ID names `domain`.
    pub fn generate(domain: &str) -> anyhow::Result<Self> {
        let (cert, _revocation) = CertBuilder::new()
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_primary_key_flags(pgp::types::KeyFlags::empty().set_certification())
            .set_validity_period(None)
            .add_userid(format!("kontalk-registrar <registrar@{domain}>"))
            .generate()?;
        Self::from_cert(cert).map_err(|reason| anyhow::anyhow!(reason))
    }

    fn from_cert(cert: Cert) -> Result<Self, String> {
        let key = cert.primary_key().key().clone();
        if !key.has_unencrypted_secret() {
            return Err("the primary key has no unencrypted secret part".into());
        }
        if !matches!(
            key_kind(key.pk_algo(), key.mpis()),
            KeyKind::Ed25519 | KeyKind::Rsa(_)
        ) {
            return Err("the server key must be Ed25519 (or RSA where allowed)".into());
        }
        let keypair = key
            .parts_into_secret()
            .and_then(|k| k.into_keypair())
            .map_err(|e| format!("cannot use the secret key: {e}"))?;
        Ok(Self { cert, keypair })
    }

    /// Parses a secret key (armored or binary).
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Self, ServerKeyError> {
        let unusable = |reason: String| ServerKeyError::Unusable {
            path: path.to_owned(),
            reason,
        };
        let cert = Cert::from_bytes(bytes).map_err(|e| unusable(format!("not a key: {e}")))?;
        Self::from_cert(cert).map_err(unusable)
    }

    /// Loads the key at `path`.
    pub fn load(path: &Path) -> Result<Self, ServerKeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ServerKeyError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::from_bytes(&bytes, &shown)
    }

    /// Writes the secret key, armored, to `path` with owner-only permissions (0600). Refuses to
    /// overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), ServerKeyError> {
        let io = |source| ServerKeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let armored = self
            .cert
            .as_tsk()
            .armored()
            .to_vec()
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        crate::fsutil::write_private(path, &armored).map_err(io)
    }

    /// The public certificate, ASCII-armored.
    pub fn public_armored(&self) -> String {
        self.cert
            .armored()
            .to_vec()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }

    /// The public certificate (binary).
    pub fn public_cert(&self) -> &Cert {
        &self.cert
    }

    /// The key's fingerprint (hex, upper case).
    pub fn fingerprint(&self) -> String {
        self.cert.fingerprint().to_hex()
    }

    /// Whether this is an RSA key (variable-time signing in the pure-Rust backend).
    pub fn is_rsa(&self) -> bool {
        matches!(
            key_kind(
                self.cert.primary_key().key().pk_algo(),
                self.cert.primary_key().key().mpis()
            ),
            KeyKind::Rsa(_)
        )
    }

    /// Certifies the User ID of `key` whose email is `email`, at `now`, and returns the
    /// certificate with the certification added.
    pub fn certify(
        &self,
        key: &UserKey,
        email: &str,
        now: SystemTime,
    ) -> anyhow::Result<CertifiedKey> {
        let cert = &key.0;
        let uid = cert
            .userids()
            .find(|u| email_matches(u.userid(), email))
            .ok_or_else(|| anyhow::anyhow!("no User ID with the email {email}"))?;
        // A certification older than the key or its self-signature is rejected by GnuPG
        // ("key is newer than the signature"): never date it earlier than either, nor earlier
        // than our own key.
        let mut when = now.max(cert.primary_key().key().creation_time());
        when = when.max(self.cert.primary_key().key().creation_time());
        for sig in uid.self_signatures() {
            if let Some(t) = sig.signature_creation_time() {
                when = when.max(t);
            }
        }
        let mut signer = self.keypair.clone();
        let sig: Signature = uid.userid().certify(
            &mut signer,
            cert,
            SignatureType::GenericCertification,
            None,
            when,
        )?;
        let (certified, _) = cert.clone().insert_packets(sig)?;
        Ok(CertifiedKey {
            fingerprint: certified.fingerprint().to_hex(),
            bytes: certified.to_vec()?,
        })
    }
}

/// A user's key that parsed and passed [`check_user_key`]'s structural checks.
#[derive(Clone)]
pub struct UserKey(Cert);

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserKey({})", self.fingerprint())
    }
}

impl UserKey {
    /// Parses a key sent as base64 of the binary key or as ASCII armor. Exactly one certificate,
    /// public parts only.
    pub fn parse(input: &str) -> Result<Self, KeyError> {
        let input = input.trim();
        let bytes = if input.starts_with("-----BEGIN PGP") {
            if input.len() > MAX_KEY_BYTES * 2 {
                return Err(KeyError::TooLarge);
            }
            input.as_bytes().to_vec()
        } else {
            if input.len() > MAX_KEY_BYTES * 4 / 3 + 4096 {
                return Err(KeyError::TooLarge);
            }
            let compact: String = input.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(|_| KeyError::Encoding)?
        };
        Self::from_bytes(&bytes)
    }

    /// Parses binary (or armored) bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.is_empty() {
            return Err(KeyError::Count(0));
        }
        if bytes.len() > MAX_KEY_BYTES * 2 {
            return Err(KeyError::TooLarge);
        }
        let mut certs = Vec::new();
        let parser = CertParser::from_bytes(bytes).map_err(|e| KeyError::Parse(e.to_string()))?;
        for cert in parser {
            certs.push(cert.map_err(|e| KeyError::Parse(e.to_string()))?);
            if certs.len() > 1 {
                break;
            }
        }
        if certs.len() != 1 {
            return Err(KeyError::Count(certs.len()));
        }
        let cert = certs.remove(0);
        if cert.is_tsk() {
            return Err(KeyError::SecretMaterial);
        }
        check_complexity(&cert)?;
        Ok(Self(cert))
    }

    /// The public key `cert` (refused when it holds secret key material).
    pub fn from_cert(cert: Cert) -> Result<Self, KeyError> {
        if cert.is_tsk() {
            return Err(KeyError::SecretMaterial);
        }
        check_complexity(&cert)?;
        Ok(Self(cert))
    }

    /// The fingerprint (hex, upper case).
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_hex()
    }

    /// The certificate.
    pub fn cert(&self) -> &Cert {
        &self.0
    }
}

/// Why an uploaded private key was refused (key transfer to a new device).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretKeyError {
    /// Larger than [`MAX_KEY_BYTES`].
    #[error("the private key is larger than {MAX_KEY_BYTES} bytes")]
    TooLarge,
    /// Not one OpenPGP key.
    #[error("the private key is not one OpenPGP key: {0}")]
    Parse(String),
    /// No secret key material at all.
    #[error("the private key holds no secret key material")]
    NoSecret,
    /// Some secret key material is not protected by a passphrase.
    #[error("the private key must be protected by a passphrase; refusing to store it in clear")]
    Unencrypted,
}

/// Checks an uploaded secret key (binary or armored): exactly one OpenPGP key with secret key
/// material, every part of which is encrypted (the client protects it with a passphrase before
/// upload, and the server keeps nothing in clear). Returns its fingerprint and the key as binary
/// OpenPGP (armor removed, the packets as sent), which is what a new device is handed.
pub fn check_encrypted_secret_key(bytes: &[u8]) -> Result<(String, Vec<u8>), SecretKeyError> {
    if bytes.len() > MAX_KEY_BYTES * 2 {
        return Err(SecretKeyError::TooLarge);
    }
    let binary = if bytes.trim_ascii_start().starts_with(b"-----BEGIN PGP") {
        let mut reader = sequoia_openpgp::armor::Reader::from_bytes(
            bytes,
            sequoia_openpgp::armor::ReaderMode::Tolerant(None),
        );
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut out)
            .map_err(|e| SecretKeyError::Parse(format!("armor: {e}")))?;
        out
    } else {
        bytes.to_vec()
    };
    if binary.len() > MAX_KEY_BYTES {
        return Err(SecretKeyError::TooLarge);
    }
    let parse = |e: anyhow::Error| SecretKeyError::Parse(e.to_string());
    let mut certs = CertParser::from_bytes(&binary).map_err(parse)?;
    let cert = certs
        .next()
        .ok_or_else(|| SecretKeyError::Parse("no key".into()))?
        .map_err(parse)?;
    if certs.next().is_some() {
        return Err(SecretKeyError::Parse("more than one key".into()));
    }
    check_complexity(&cert).map_err(|e| SecretKeyError::Parse(e.to_string()))?;
    let mut secrets = 0;
    for key in cert.keys().secret() {
        secrets += 1;
        if key.key().has_unencrypted_secret() {
            return Err(SecretKeyError::Unencrypted);
        }
    }
    if secrets == 0 {
        return Err(SecretKeyError::NoSecret);
    }
    let fingerprint = cert.fingerprint().to_hex();
    drop(certs);
    Ok((fingerprint, binary))
}

/// Why a new key may not replace an account's key (key rollover).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloverError {
    /// The new key is the current key.
    #[error("the new key is the account's current key")]
    SameKey,
    /// The new key was not created after the current one.
    #[error("the new key must be newer than the account's current key")]
    NotNewer,
    /// No User ID of the new key naming the account carries a certification by the current key.
    #[error(
        "the new key's User ID {0} carries no valid certification by the account's current key"
    )]
    NotSignedByOldKey(String),
    /// `revoked` is not the account's current key.
    #[error("the revoked key is not the account's current key")]
    RevokedIsNotCurrent,
    /// `revoked` carries no valid revocation.
    #[error("the revoked key carries no valid revocation signature")]
    NotRevoked,
    /// The new key is one the account used before and retired.
    #[error("the new key is one this account retired; register it again instead")]
    RetiredKey,
}

/// Checks that `new` may replace `old` for `email`: another, newer key, and a proof that the
/// holder of the old key asks. The proof is a certification of one of `new`'s User IDs naming
/// `email` by `old`'s primary key, made since `old` became the account's key at
/// `current_since` (so that a proof of an earlier period is not replayed after the account
/// returned to `old`); or, when the request comes from a session that logged in with
/// `old` (`old_key_session`: TLS proved the key), `old` with a valid self-revocation in `revoked`,
/// which is what Kontalk's Android client sends (its new key carries no certification by the old
/// one). `revoked`, when sent, must be `old` validly revoked either way. The caller checks `new`
/// itself with [`check_user_key`] first.
pub fn check_rollover(
    new: &UserKey,
    old: &Cert,
    email: &str,
    revoked: Option<&UserKey>,
    old_key_session: bool,
    current_since: SystemTime,
    now: SystemTime,
) -> Result<(), RolloverError> {
    let policy = StandardPolicy::new();
    let new_cert = &new.0;
    if new_cert.fingerprint() == old.fingerprint() {
        return Err(RolloverError::SameKey);
    }
    let signer = old.primary_key().key();
    let certified = new_cert
        .userids()
        .filter(|u| email_matches(u.userid(), email))
        .any(|u| {
            u.certifications().any(|sig| {
                matches!(
                    sig.typ(),
                    SignatureType::GenericCertification
                        | SignatureType::PersonaCertification
                        | SignatureType::CasualCertification
                        | SignatureType::PositiveCertification
                ) && policy.signature(sig, Default::default()).is_ok()
                    && sig.signature_alive(now, CLOCK_SKEW).is_ok()
                    // Made while the old key is the account's (a phone's slow clock allowed
                    // for): a proof from an earlier period of that key is not replayed.
                    && sig
                        .signature_creation_time()
                        .is_some_and(|t| t + CLOCK_SKEW >= current_since)
                    && sig
                        .clone()
                        .verify_userid_binding(signer, new_cert.primary_key().key(), u.userid())
                        .is_ok()
            })
        });
    // Without the session's proof, the certification by the old key is checked first: a
    // requester without the old key learns nothing else (not whether the account exists, nor
    // its key's age).
    if !certified && !old_key_session {
        return Err(RolloverError::NotSignedByOldKey(email.to_owned()));
    }
    if new_cert.primary_key().key().creation_time() <= old.primary_key().key().creation_time() {
        return Err(RolloverError::NotNewer);
    }
    if let Some(revoked) = revoked {
        if revoked.0.fingerprint() != old.fingerprint() {
            return Err(RolloverError::RevokedIsNotCurrent);
        }
        // The revocation may be sent on its own with the public key; merge to judge it.
        let merged = old
            .clone()
            .merge_public(revoked.0.clone())
            .map_err(|_| RolloverError::RevokedIsNotCurrent)?;
        // Judged with the allowance for phone clocks that run fast, as key creation is: a
        // revocation made "in the future" by such a clock still revokes.
        if !matches!(
            merged.revocation_status(&policy, now + CLOCK_SKEW),
            RevocationStatus::Revoked(_)
        ) {
            return Err(RolloverError::NotRevoked);
        }
        if old_key_session {
            return Ok(());
        }
    }
    if !certified {
        return Err(RolloverError::NotSignedByOldKey(email.to_owned()));
    }
    Ok(())
}

/// Whether `signature` (a detached OpenPGP signature, armored or binary) is a valid signature
/// of `message` by a signing-capable key of `signer`, valid at `now`.
pub fn verify_detached(signer: &Cert, message: &[u8], signature: &[u8], now: SystemTime) -> bool {
    use pgp::parse::stream::{
        DetachedVerifierBuilder, MessageLayer, MessageStructure, VerificationHelper,
    };
    struct Helper<'a>(&'a Cert);
    impl VerificationHelper for Helper<'_> {
        fn get_certs(&mut self, _ids: &[pgp::KeyHandle]) -> pgp::Result<Vec<Cert>> {
            Ok(vec![self.0.clone()])
        }
        fn check(&mut self, structure: MessageStructure) -> pgp::Result<()> {
            for layer in structure {
                if let MessageLayer::SignatureGroup { results } = layer
                    && results.iter().any(|r| r.is_ok())
                {
                    return Ok(());
                }
            }
            Err(anyhow::anyhow!("no valid signature"))
        }
    }
    if signature.is_empty() || signature.len() > MAX_KEY_BYTES {
        return false;
    }
    // Exactly one signature packet: a removal is one signed statement, and every further
    // packet would cost another verification.
    match pgp::PacketPile::from_bytes(signature) {
        Ok(pile)
            if pile.children().count() == 1
                && pile
                    .children()
                    .all(|p| matches!(p, pgp::Packet::Signature(_))) => {}
        _ => return false,
    }
    let policy = StandardPolicy::new();
    let Ok(builder) = DetachedVerifierBuilder::from_bytes(signature) else {
        return false;
    };
    // Judged as of a little later: a phone whose clock runs fast signs "in the future". The
    // caller's own timestamp check keeps requests fresh.
    let Ok(mut verifier) = builder.with_policy(&policy, Some(now + CLOCK_SKEW), Helper(signer))
    else {
        return false;
    };
    verifier.verify_bytes(message).is_ok()
}

/// Signs `message` with `cert`'s signing key: a detached, armored signature (for clients and
/// tests; the service never signs for users).
pub fn sign_detached(cert: &Cert, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    use pgp::armor;
    use pgp::serialize::stream::{Armorer, Message, Signer};
    use std::io::Write as _;
    let policy = StandardPolicy::new();
    let key = cert
        .keys()
        .with_policy(&policy, None)
        .supported()
        .alive()
        .revoked(false)
        .for_signing()
        .secret()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the key has no usable secret signing key"))?;
    let keypair = key.key().clone().into_keypair()?;
    let mut out = Vec::new();
    {
        let message_w = Message::new(&mut out);
        let message_w = Armorer::new(message_w)
            .kind(armor::Kind::Signature)
            .build()?;
        let mut signer = Signer::new(message_w, keypair)?.detached().build()?;
        signer.write_all(message)?;
        signer.finalize()?;
    }
    Ok(out)
}

/// Certifies `new`'s User ID `email` with `old`'s primary key (which must hold its secret): how
/// a client proves that the holder of the old key hands over to the new one.
pub fn cross_certify(old: &Cert, new: &Cert, email: &str, now: SystemTime) -> anyhow::Result<Cert> {
    let mut signer = old
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()?
        .into_keypair()?;
    let uid = new
        .userids()
        .find(|u| email_matches(u.userid(), email))
        .ok_or_else(|| anyhow::anyhow!("no User ID with the email {email}"))?;
    let when = now.max(new.primary_key().key().creation_time());
    let sig = uid.userid().certify(
        &mut signer,
        new,
        SignatureType::GenericCertification,
        None,
        when,
    )?;
    Ok(new.clone().insert_packets(sig)?.0)
}

/// Revokes `cert` (which must hold its primary secret) as superseded: the `revoked` key a client
/// sends with a rollover.
pub fn revoke_superseded(cert: &Cert) -> anyhow::Result<Cert> {
    let mut signer = cert
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()?
        .into_keypair()?;
    let rev = cert.revoke(
        &mut signer,
        pgp::types::ReasonForRevocation::KeySuperseded,
        b"replaced by a new key",
    )?;
    Ok(cert.clone().insert_packets(rev)?.0)
}

/// A certificate with our certification, ready to hand back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    /// Fingerprint of the user's key (hex, upper case).
    pub fingerprint: String,
    /// The binary certificate, public parts, with the certification.
    pub bytes: Vec<u8>,
}

enum KeyKind {
    Rsa(usize),
    Ed25519,
    Other,
}

fn key_kind(algo: PublicKeyAlgorithm, mpis: &mpi::PublicKey) -> KeyKind {
    #[allow(deprecated)]
    match (algo, mpis) {
        (
            PublicKeyAlgorithm::RSAEncryptSign | PublicKeyAlgorithm::RSASign,
            mpi::PublicKey::RSA { n, .. },
        ) => KeyKind::Rsa(n.bits()),
        (PublicKeyAlgorithm::EdDSA, mpi::PublicKey::EdDSA { curve, .. })
            if *curve == Curve::Ed25519 =>
        {
            KeyKind::Ed25519
        }
        (PublicKeyAlgorithm::Ed25519, _) => KeyKind::Ed25519,
        _ => KeyKind::Other,
    }
}

fn email_matches(uid: &pgp::packet::UserID, email: &str) -> bool {
    matches!(uid.email(), Ok(Some(e)) if e.eq_ignore_ascii_case(email))
}

/// The accounts on `domain` that `key`'s User IDs name (emails `<account id>@<domain>`), in the
/// key's order. Nothing here is trusted yet: [`check_user_key`] judges the binding.
pub fn accounts_named(key: &UserKey, domain: &str) -> Vec<crate::phone::AccountId> {
    key.0
        .userids()
        .filter_map(|u| match u.userid().email() {
            Ok(Some(email)) => {
                let (local, host) = email.rsplit_once('@')?;
                if host.eq_ignore_ascii_case(domain) {
                    local.parse().ok()
                } else {
                    None
                }
            }
            _ => None,
        })
        .collect()
}

/// Checks a user's key against the policy at `now`: valid under sequoia's standard policy, alive
/// and not revoked, an RSA (at least 2048 bits) or Ed25519 primary key, and a validly bound User
/// ID whose email is `email`. Subkeys may be of any algorithm the standard policy accepts.
pub fn check_user_key(key: &UserKey, email: &str, now: SystemTime) -> Result<(), KeyError> {
    let policy = StandardPolicy::new();
    let primary = key.0.primary_key().key();
    // Judge a key made on a phone whose clock runs a little fast as if it were now.
    let creation = primary.creation_time();
    let t = if creation > now && creation <= now + CLOCK_SKEW {
        now + CLOCK_SKEW
    } else {
        now
    };
    match key_kind(primary.pk_algo(), primary.mpis()) {
        KeyKind::Rsa(bits) if bits >= MIN_RSA_BITS => {}
        KeyKind::Ed25519 => {}
        _ => return Err(KeyError::Algorithm),
    }
    let valid = key
        .0
        .with_policy(&policy, t)
        .map_err(|e| KeyError::Policy(e.to_string()))?;
    if valid.alive().is_err() {
        return Err(KeyError::NotAlive);
    }
    let revoked = revoked_ahead(&key.0, &policy, now);
    if revoked.key || matches!(valid.revocation_status(), RevocationStatus::Revoked(_)) {
        return Err(KeyError::NotAlive);
    }
    let bound = valid.userids().any(|u| {
        email_matches(u.userid(), email)
            && !matches!(u.revocation_status(), RevocationStatus::Revoked(_))
            && !revoked.userids.contains(u.userid())
    });
    if !bound {
        return Err(KeyError::NoMatchingUserId(email.to_owned()));
    }
    Ok(())
}

/// What `cert` has revoked as of a little after `now`: revocations dated ahead by a clock that
/// runs fast (a phone's, or GnuPG's, which dates a same-second revocation one second ahead)
/// count, with the allowance key creation gets ([`CLOCK_SKEW`]). A revocation only ever takes
/// something away, so judging it early is safe.
pub struct Revoked {
    /// The primary key is revoked.
    pub key: bool,
    /// These User IDs are revoked.
    pub userids: Vec<pgp::packet::UserID>,
}

/// See [`Revoked`].
pub fn revoked_ahead(cert: &Cert, policy: &dyn Policy, now: SystemTime) -> Revoked {
    let ahead = now + CLOCK_SKEW;
    let key = matches!(
        cert.revocation_status(policy, ahead),
        RevocationStatus::Revoked(_)
    );
    let userids = cert
        .userids()
        .filter(|u| {
            matches!(
                u.revocation_status(policy, ahead),
                RevocationStatus::Revoked(_)
            )
        })
        .map(|u| u.userid().clone())
        .collect();
    Revoked { key, userids }
}

/// Checks whether `cert` carries a valid certification by `server` on a User ID whose email is
/// `email`. Used by tests and, later, by the login check.
pub fn has_certification(cert: &Cert, server: &Cert, email: &str) -> bool {
    let policy = StandardPolicy::new();
    let signer = server.primary_key().key();
    cert.userids()
        .filter(|u| email_matches(u.userid(), email))
        .any(|u| {
            u.certifications().any(|sig| {
                sig.typ() == SignatureType::GenericCertification
                    && policy.signature(sig, Default::default()).is_ok()
                    && sig
                        .clone()
                        .verify_userid_binding(signer, cert.primary_key().key(), u.userid())
                        .is_ok()
            })
        })
}

/// Generates a user key as a Kontalk client would: one User ID `Name <email>`, a certification
/// primary key with signing and encryption subkeys. `rsa` selects RSA-2048 (Kontalk's choice)
/// instead of Ed25519/Cv25519.
pub fn generate_user_key(name: &str, email: &str, rsa: bool) -> anyhow::Result<Cert> {
    let suite = if rsa {
        CipherSuite::RSA2k
    } else {
        CipherSuite::Cv25519
    };
    let (cert, _) = CertBuilder::general_purpose(Some(format!("{name} <{email}>")))
        .set_cipher_suite(suite)
        .set_validity_period(None)
        .generate()?;
    Ok(cert)
}

/// Serialises a certificate's public parts, binary.
pub fn public_bytes(cert: &Cert) -> anyhow::Result<Vec<u8>> {
    cert.to_vec()
}

/// Serialises a certificate's public parts, ASCII-armored.
pub fn public_armored(cert: &Cert) -> anyhow::Result<Vec<u8>> {
    cert.armored().to_vec()
}

/// Serialises a certificate with its secret parts, ASCII-armored.
pub fn secret_armored(cert: &Cert) -> anyhow::Result<Vec<u8>> {
    cert.as_tsk().armored().to_vec()
}

/// Parses one certificate (any encoding sequoia reads); for tools and tests.
pub fn parse_cert(bytes: &[u8]) -> anyhow::Result<Cert> {
    Cert::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;

    const EMAIL: &str = "4bdd4f929f3a1062253e4e496bafba0bdfb5db75@localhost";

    fn b64(cert: &Cert) -> String {
        B64.encode(cert.to_vec().unwrap())
    }

    #[test]
    fn certifies_an_ed25519_key_and_the_certification_verifies() {
        let server = ServerKey::generate("localhost").unwrap();
        assert!(!server.is_rsa());
        let user = generate_user_key("Test", EMAIL, false).unwrap();
        let key = UserKey::parse(&b64(&user)).unwrap();
        check_user_key(&key, EMAIL, SystemTime::now()).unwrap();
        let certified = server.certify(&key, EMAIL, SystemTime::now()).unwrap();
        assert_eq!(certified.fingerprint, user.fingerprint().to_hex());
        let back = parse_cert(&certified.bytes).unwrap();
        assert!(!back.is_tsk());
        assert!(has_certification(&back, server.public_cert(), EMAIL));
        // Another server's key did not certify it.
        let other = ServerKey::generate("localhost").unwrap();
        assert!(!has_certification(&back, other.public_cert(), EMAIL));
        assert!(!has_certification(
            &user.strip_secret_key_material(),
            server.public_cert(),
            EMAIL
        ));
    }

    #[test]
    fn accepts_armor_and_case_insensitive_domain() {
        let user = generate_user_key("Test", EMAIL, false).unwrap();
        let armored = String::from_utf8(public_armored(&user).unwrap()).unwrap();
        let key = UserKey::parse(&armored).unwrap();
        check_user_key(
            &key,
            "4bdd4f929f3a1062253e4e496bafba0bdfb5db75@LOCALHOST",
            SystemTime::now(),
        )
        .unwrap();
    }

    #[test]
    fn finds_the_accounts_a_key_names_on_our_domain() {
        let (cert, _) = CertBuilder::general_purpose(Some(format!("A <{EMAIL}>")))
            .add_userid("B <0000000000000000000000000000000000000000@example.org>")
            .add_userid("C <not-an-account@localhost>")
            .add_userid("no email at all")
            .set_cipher_suite(CipherSuite::Cv25519)
            .generate()
            .unwrap();
        let key = UserKey::parse(&b64(&cert)).unwrap();
        let accounts = accounts_named(&key, "localhost");
        assert_eq!(accounts.len(), 1);
        assert_eq!(accounts[0].as_str(), &EMAIL[..40]);
        assert!(accounts_named(&key, "example.net").is_empty());
    }

    #[test]
    fn refuses_wrong_user_id() {
        let user = generate_user_key("Test", "someone@localhost", false).unwrap();
        let key = UserKey::parse(&b64(&user)).unwrap();
        assert_eq!(
            check_user_key(&key, EMAIL, SystemTime::now()),
            Err(KeyError::NoMatchingUserId(EMAIL.into()))
        );
    }

    #[test]
    fn refuses_garbage_secret_and_multiple_keys() {
        assert_eq!(UserKey::parse("!!!").unwrap_err(), KeyError::Encoding);
        assert_eq!(UserKey::parse("").unwrap_err(), KeyError::Count(0));
        assert!(matches!(
            UserKey::parse(&B64.encode(b"not a key at all")),
            Err(KeyError::Parse(_) | KeyError::Count(0))
        ));
        assert!(matches!(
            UserKey::parse(
                "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUBLIC KEY BLOCK-----"
            ),
            Err(KeyError::Parse(_) | KeyError::Count(0))
        ));
        let user = generate_user_key("Test", EMAIL, false).unwrap();
        let tsk = B64.encode(user.as_tsk().to_vec().unwrap());
        assert_eq!(UserKey::parse(&tsk).unwrap_err(), KeyError::SecretMaterial);
        let other = generate_user_key("Other", EMAIL, false).unwrap();
        let mut two = user.to_vec().unwrap();
        two.extend(other.to_vec().unwrap());
        assert_eq!(
            UserKey::parse(&B64.encode(two)).unwrap_err(),
            KeyError::Count(2)
        );
        assert_eq!(
            UserKey::parse(&"A".repeat(200_000)).unwrap_err(),
            KeyError::TooLarge
        );
    }

    #[test]
    fn refuses_expired_and_revoked_keys() {
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        let (cert, rev) = CertBuilder::general_purpose(Some(format!("T <{EMAIL}>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(t0)
            .set_validity_period(Duration::from_secs(60))
            .generate()
            .unwrap();
        let key = UserKey::parse(&b64(&cert)).unwrap();
        assert_eq!(
            check_user_key(&key, EMAIL, SystemTime::now()),
            Err(KeyError::NotAlive)
        );
        let (cert, rev2) = CertBuilder::general_purpose(Some(format!("T <{EMAIL}>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .generate()
            .unwrap();
        let _ = rev;
        let (revoked, _) = cert.insert_packets(rev2).unwrap();
        let key = UserKey::parse(&b64(&revoked)).unwrap();
        assert_eq!(
            check_user_key(&key, EMAIL, SystemTime::now()),
            Err(KeyError::NotAlive)
        );
    }

    #[test]
    fn refuses_small_rsa_and_non_ed25519_primaries() {
        for suite in [CipherSuite::P256, CipherSuite::RSA2k] {
            let (cert, _) = CertBuilder::general_purpose(Some(format!("T <{EMAIL}>")))
                .set_cipher_suite(suite)
                .generate()
                .unwrap();
            let key = UserKey::parse(&b64(&cert)).unwrap();
            let r = check_user_key(&key, EMAIL, SystemTime::now());
            match suite {
                CipherSuite::P256 => assert_eq!(r, Err(KeyError::Algorithm)),
                _ => assert_eq!(r, Ok(())),
            }
        }
    }

    #[test]
    fn tolerates_small_clock_skew_only() {
        let future = SystemTime::now() + Duration::from_secs(120);
        let (cert, _) = CertBuilder::general_purpose(Some(format!("T <{EMAIL}>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(future)
            .generate()
            .unwrap();
        let key = UserKey::parse(&b64(&cert)).unwrap();
        check_user_key(&key, EMAIL, SystemTime::now()).unwrap();
        let server = ServerKey::generate("localhost").unwrap();
        let certified = server.certify(&key, EMAIL, SystemTime::now()).unwrap();
        assert!(has_certification(
            &parse_cert(&certified.bytes).unwrap(),
            server.public_cert(),
            EMAIL
        ));
        let far = SystemTime::now() + Duration::from_secs(86400);
        let (cert, _) = CertBuilder::general_purpose(Some(format!("T <{EMAIL}>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(far)
            .generate()
            .unwrap();
        let key = UserKey::parse(&b64(&cert)).unwrap();
        assert!(matches!(
            check_user_key(&key, EMAIL, SystemTime::now()),
            Err(KeyError::Policy(_))
        ));
    }

    #[test]
    fn server_key_round_trips_through_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let key = ServerKey::generate("example.org").unwrap();
        key.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(key.save(&path).is_err(), "must not overwrite");
        let loaded = ServerKey::load(&path).unwrap();
        assert_eq!(loaded.fingerprint(), key.fingerprint());
        // A public key alone is no server key.
        let public = ServerKey::from_bytes(key.public_armored().as_bytes(), "x");
        assert!(matches!(public, Err(ServerKeyError::Unusable { .. })));
        let err = ServerKey::from_bytes(b"garbage", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a key"), "{err}");
    }

    fn key_at(email: &str, created: SystemTime) -> Cert {
        CertBuilder::general_purpose(Some(format!("User <{email}>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(created)
            .generate()
            .unwrap()
            .0
    }

    fn public(cert: &Cert) -> UserKey {
        UserKey::from_bytes(&cert.to_vec().unwrap()).unwrap()
    }

    #[test]
    fn a_rollover_needs_a_newer_key_certified_by_the_old_one() {
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        let now = SystemTime::now();
        let old = key_at(EMAIL, t0);
        let new = key_at(EMAIL, t0 + Duration::from_secs(60));
        let signed = cross_certify(&old, &new, EMAIL, now).unwrap();
        assert_eq!(
            check_rollover(&public(&signed), &old, EMAIL, None, false, t0, now),
            Ok(())
        );

        // With the old key's revocation; a revocation must be the old key's and be one.
        let revoked = revoke_superseded(&old).unwrap();
        assert_eq!(
            check_rollover(
                &public(&signed),
                &old,
                EMAIL,
                Some(&public(&revoked)),
                false,
                t0,
                now
            ),
            Ok(())
        );
        assert_eq!(
            check_rollover(
                &public(&signed),
                &old,
                EMAIL,
                Some(&public(&old)),
                false,
                t0,
                now
            ),
            Err(RolloverError::NotRevoked)
        );
        let stranger = key_at(EMAIL, t0);
        assert_eq!(
            check_rollover(
                &public(&signed),
                &old,
                EMAIL,
                Some(&public(&revoke_superseded(&stranger).unwrap())),
                false,
                t0,
                now
            ),
            Err(RolloverError::RevokedIsNotCurrent)
        );

        // Not certified, certified by another key, or on another User ID.
        let refused = Err(RolloverError::NotSignedByOldKey(EMAIL.into()));
        assert_eq!(
            check_rollover(&public(&new), &old, EMAIL, None, false, t0, now),
            refused
        );
        let by_stranger = cross_certify(&stranger, &new, EMAIL, now).unwrap();
        assert_eq!(
            check_rollover(&public(&by_stranger), &old, EMAIL, None, false, t0, now),
            refused
        );
        let other = "other@localhost";
        let two = CertBuilder::general_purpose(Some(format!("User <{EMAIL}>")))
            .add_userid(format!("Other <{other}>"))
            .set_creation_time(t0 + Duration::from_secs(60))
            .generate()
            .unwrap()
            .0;
        let wrong_uid = cross_certify(&old, &two, other, now).unwrap();
        assert_eq!(
            check_rollover(&public(&wrong_uid), &old, EMAIL, None, false, t0, now),
            refused
        );

        // The same key, or one not newer.
        let same = cross_certify(&old, &old, EMAIL, now).unwrap();
        assert_eq!(
            check_rollover(&public(&same), &old, EMAIL, None, false, t0, now),
            Err(RolloverError::SameKey)
        );
        let as_old = cross_certify(&old, &key_at(EMAIL, t0), EMAIL, now).unwrap();
        assert_eq!(
            check_rollover(&public(&as_old), &old, EMAIL, None, false, t0, now),
            Err(RolloverError::NotNewer)
        );
        // From a session that logged in with the old key, the old key's revocation is proof
        // enough, as Kontalk's Android client sends it (its new key carries no certification by
        // the old one); without the revocation it is not, nor from any other requester.
        assert_eq!(
            check_rollover(
                &public(&new),
                &old,
                EMAIL,
                Some(&public(&revoked)),
                true,
                t0,
                now
            ),
            Ok(())
        );
        assert_eq!(
            check_rollover(&public(&new), &old, EMAIL, None, true, t0, now),
            refused
        );
        assert_eq!(
            check_rollover(
                &public(&new),
                &old,
                EMAIL,
                Some(&public(&revoked)),
                false,
                t0,
                now
            ),
            refused
        );
        assert_eq!(
            check_rollover(
                &public(&new),
                &old,
                EMAIL,
                Some(&public(&old)),
                true,
                t0,
                now
            ),
            Err(RolloverError::NotRevoked)
        );
        // A proof from an earlier period of the old key is not replayed: the account went back
        // to `old` (at `now`) after `signed` was made by it an hour ago.
        let earlier = cross_certify(&old, &new, EMAIL, now - Duration::from_secs(3600)).unwrap();
        assert_eq!(
            check_rollover(&public(&earlier), &old, EMAIL, None, false, now, now),
            Err(RolloverError::NotSignedByOldKey(EMAIL.into()))
        );
        assert_eq!(
            check_rollover(&public(&earlier), &old, EMAIL, None, false, t0, now),
            Ok(())
        );
    }

    /// `cert` with its User ID `email` (or, with `None`, the key itself) revoked by a
    /// signature dated `at`.
    fn revoked_at(cert: &Cert, email: Option<&str>, at: SystemTime) -> Cert {
        use pgp::types::ReasonForRevocation;
        let mut signer = cert
            .primary_key()
            .key()
            .clone()
            .parts_into_secret()
            .unwrap()
            .into_keypair()
            .unwrap();
        let sig = match email {
            Some(email) => {
                let uid = cert
                    .userids()
                    .find(|u| email_matches(u.userid(), email))
                    .unwrap()
                    .userid()
                    .clone();
                UserIDRevocationBuilder::new()
                    .set_reason_for_revocation(ReasonForRevocation::UIDRetired, b"gone")
                    .unwrap()
                    .set_signature_creation_time(at)
                    .unwrap()
                    .build(&mut signer, cert, &uid, None)
                    .unwrap()
            }
            None => CertRevocationBuilder::new()
                .set_reason_for_revocation(ReasonForRevocation::KeyRetired, b"gone")
                .unwrap()
                .set_signature_creation_time(at)
                .unwrap()
                .build(&mut signer, cert, None)
                .unwrap(),
        };
        cert.clone().insert_packets(sig).unwrap().0
    }

    #[test]
    fn revocations_dated_a_little_ahead_still_revoke() {
        // GnuPG dates a same-second revocation one second ahead; phones' clocks run fast.
        let now = SystemTime::now();
        let key = key_at(EMAIL, now - Duration::from_secs(3600));
        assert_eq!(check_user_key(&public(&key), EMAIL, now), Ok(()));
        for ahead in [Duration::from_secs(1), Duration::from_secs(600)] {
            let uid_revoked = revoked_at(&key, Some(EMAIL), now + ahead);
            assert_eq!(
                check_user_key(&public(&uid_revoked), EMAIL, now),
                Err(KeyError::NoMatchingUserId(EMAIL.into())),
                "{ahead:?}"
            );
            let key_revoked = revoked_at(&key, None, now + ahead);
            assert_eq!(
                check_user_key(&public(&key_revoked), EMAIL, now),
                Err(KeyError::NotAlive),
                "{ahead:?}"
            );
        }
    }

    #[test]
    fn keys_with_too_many_parts_are_refused() {
        let now = SystemTime::now();
        let mut builder = CertBuilder::general_purpose(Some(format!("User <{EMAIL}>")))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(now - Duration::from_secs(60));
        for i in 0..MAX_USER_IDS {
            builder = builder.add_userid(format!("Alias {i} <{EMAIL}>"));
        }
        let (many_uids, _) = builder.generate().unwrap();
        assert!(matches!(
            UserKey::from_bytes(&many_uids.strip_secret_key_material().to_vec().unwrap()),
            Err(KeyError::TooComplex(_, MAX_USER_IDS))
        ));
        let mut builder = CertBuilder::general_purpose(Some(format!("User <{EMAIL}>")))
            .set_cipher_suite(CipherSuite::Cv25519);
        for _ in 0..MAX_SUBKEYS {
            builder = builder.add_signing_subkey();
        }
        let (many_subkeys, _) = builder.generate().unwrap();
        let e = UserKey::from_bytes(&many_subkeys.strip_secret_key_material().to_vec().unwrap())
            .unwrap_err();
        assert!(matches!(e, KeyError::TooComplex(_, MAX_SUBKEYS)), "{e}");
        assert!(e.to_string().contains("subkeys"), "{e}");
        // Many certifications (here: one key certifying the User ID over and over).
        let key = key_at(EMAIL, now - Duration::from_secs(60));
        let mut heavy = key.clone();
        for i in 0..MAX_SIGNATURES {
            heavy =
                cross_certify(&key, &heavy, EMAIL, now - Duration::from_secs(i as u64)).unwrap();
        }
        let e =
            UserKey::from_bytes(&heavy.strip_secret_key_material().to_vec().unwrap()).unwrap_err();
        assert!(matches!(e, KeyError::TooComplex(_, MAX_SIGNATURES)), "{e}");
        // An ordinary key passes.
        assert!(UserKey::from_bytes(&key.strip_secret_key_material().to_vec().unwrap()).is_ok());
    }

    #[test]
    fn a_detached_signature_is_one_signature() {
        let now = SystemTime::now();
        let key = key_at(EMAIL, now - Duration::from_secs(60));
        let public = key.clone().strip_secret_key_material();
        let one = sign_detached(&key, b"remove me").unwrap();
        assert!(verify_detached(&public, b"remove me", &one, now));
        // Two signatures, even both good, are refused.
        let mut two = pgp::armor::Reader::from_bytes(&one, pgp::armor::ReaderMode::Tolerant(None));
        let mut binary = Vec::new();
        std::io::Read::read_to_end(&mut two, &mut binary).unwrap();
        let doubled = [binary.clone(), binary].concat();
        assert!(!verify_detached(&public, b"remove me", &doubled, now));
    }

    #[test]
    fn detached_signatures_verify_only_for_the_signer_and_the_message() {
        let now = SystemTime::now();
        let key = key_at(EMAIL, now - Duration::from_secs(60));
        let sig = sign_detached(&key, b"remove me").unwrap();
        let public = key.clone().strip_secret_key_material();
        assert!(verify_detached(&public, b"remove me", &sig, now));
        // Made by a phone whose clock runs a minute fast.
        assert!(verify_detached(
            &public,
            b"remove me",
            &sig,
            now - Duration::from_secs(60)
        ));
        assert!(!verify_detached(&public, b"remove me!", &sig, now));
        let other = key_at(EMAIL, now - Duration::from_secs(60));
        assert!(!verify_detached(&other, b"remove me", &sig, now));
        assert!(!verify_detached(&public, b"remove me", b"garbage", now));
        assert!(!verify_detached(&public, b"remove me", b"", now));
        // Binary signatures too.
        let binary = pgp::armor::Reader::from_bytes(&sig, None);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut { binary }, &mut bytes).unwrap();
        assert!(verify_detached(&public, b"remove me", &bytes, now));
    }
}
