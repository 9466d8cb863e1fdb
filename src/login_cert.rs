//! Bridge login certificates: a self-signed X.509 certificate that carries an OpenPGP key, as
//! Kontalk clients present on TLS login (Kontalk's `X509Bridge`).
//!
//! The format:
//! - a self-signed X.509 v3 certificate whose SubjectPublicKeyInfo is the OpenPGP primary key
//!   (RSA as `rsaEncryption`, Ed25519 as `id-Ed25519`), signed by that key;
//! - subject = issuer = `O=OpenPGP to X.509 Bridge` plus one `CN` per User ID of the key;
//! - a subjectAltName `otherName` xmppAddr (`1.3.6.1.5.5.7.8.5`) naming the account JID;
//! - the non-critical extension [`BRIDGE_EXTENSION_OID`] whose value is a DER BIT STRING holding
//!   the binary OpenPGP certificate (the transferable public key with its signatures, including
//!   our server's certification).
//!
//! [`build`] makes such a certificate from a secret OpenPGP key (what a client does) and hands
//! back the private key as PKCS#8 for the TLS stack. [`verify`] judges one presented at login:
//! the extension must hold exactly one OpenPGP certificate whose primary key is the X.509 key,
//! the X.509 self-signature must verify, the OpenPGP key must be valid now under sequoia's
//! standard policy (the X.509 validity dates are ignored: Kontalk writes notAfter = notBefore),
//! and a User ID `<account>@<domain>` must carry a valid certification (type 0x10) by one of the
//! trusted server keys. Whether the key is the account's current key is the caller's check (the
//! store knows).
//!
//! The extension's OID has a 126-bit arc that common X.509 crates cannot represent, so it is
//! written from its raw DER bytes and compared by bytes. RSA signing and verification are
//! variable-time in the pure-Rust backend; verification only uses public values.

use std::borrow::Cow;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use sequoia_openpgp as pgp;

use chrono::{DateTime, Datelike as _, Utc};
use pgp::cert::prelude::*;
use pgp::crypto::{KeyPair, Signer as _, mpi};
use pgp::packet::key::{PrimaryRole, SecretParts};
use pgp::packet::{Key, key};
use pgp::parse::Parse;
use pgp::policy::StandardPolicy;
use pgp::serialize::SerializeInto;
use pgp::types::{Curve, HashAlgorithm, PublicKeyAlgorithm, RevocationStatus, SignatureType};
use sha1::Sha1;
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use x509_parser::asn1_rs::{BitString, FromDer as _, Tag as Asn1Tag};
use x509_parser::certificate::X509CertificateParser;
use x509_parser::nom::Parser as _;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};
use yasna::{DERWriter, Tag};
use zeroize::Zeroizing;

use crate::openpgp::{CLOCK_SKEW, MAX_KEY_BYTES, MIN_RSA_BITS};

/// The bridge extension's OID in dotted form (from the UUID `24e844a0-6cbc-11e3-8997-0002a5d5c51b`).
pub const BRIDGE_EXTENSION_OID: &str = "2.25.49058212633447845622587297037800555803";

/// The organization every bridge certificate's subject names.
pub const BRIDGE_ORGANIZATION: &str = "OpenPGP to X.509 Bridge";

/// Largest certificate [`verify`] reads (PEM or DER), in bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 4 * MAX_KEY_BYTES;

/// Largest RSA modulus verified, in bits.
const MAX_RSA_BITS: usize = 8192;

/// Raw DER contents (no tag, no length) of the object identifiers used here. Each is checked
/// against its dotted form in the tests.
mod oid {
    /// `2.25.49058212633447845622587297037800555803`: the bridge extension.
    pub const BRIDGE: &[u8] = &[
        0x69, 0xc9, 0xe8, 0xa2, 0xa8, 0x8d, 0xcb, 0xe0, 0xc7, 0xc7, 0x89, 0xcb, 0xc0, 0x80, 0xaa,
        0xae, 0xd7, 0x8a, 0x1b,
    ];
    /// `1.2.840.113549.1.1.1`: rsaEncryption.
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    /// `1.2.840.113549.1.1.5`: sha1WithRSAEncryption.
    pub const SHA1_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
    /// `1.2.840.113549.1.1.11`: sha256WithRSAEncryption.
    pub const SHA256_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    /// `1.2.840.113549.1.1.12`: sha384WithRSAEncryption.
    pub const SHA384_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    /// `1.2.840.113549.1.1.13`: sha512WithRSAEncryption.
    pub const SHA512_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    /// `1.3.101.112`: id-Ed25519.
    pub const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    /// `2.5.4.10`: organizationName.
    pub const ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
    /// `2.5.4.3`: commonName.
    pub const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    /// `2.5.29.15`: keyUsage.
    pub const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
    /// `2.5.29.37`: extKeyUsage.
    pub const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
    /// `2.5.29.17`: subjectAltName.
    pub const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    /// `1.3.6.1.5.5.7.3.2`: id-kp-clientAuth.
    pub const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
    /// `1.3.6.1.5.5.7.8.5`: id-on-xmppAddr.
    pub const XMPP_ADDR: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x08, 0x05];
    /// `2.5.29.19`: basicConstraints.
    pub const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    /// `2.5.29.14`: subjectKeyIdentifier.
    pub const SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
    /// `2.5.29.35`: authorityKeyIdentifier.
    pub const AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
    /// `2.16.840.1.113730.1.1`: Netscape certificate type.
    pub const NETSCAPE_CERT_TYPE: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x86, 0xf8, 0x42, 0x01, 0x01];
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

/// Why a bridge certificate could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The certificate holds no usable secret primary key.
    #[error("the key has no unencrypted secret primary key")]
    NoSecretKey,
    /// The primary key is neither RSA (at least 2048 bits) nor Ed25519.
    #[error(
        "bridge certificates need an RSA (at least {MIN_RSA_BITS} bits) or Ed25519 primary key: {0}"
    )]
    UnsupportedAlgorithm(String),
    /// The secret key material does not fit the public key or cannot be exported.
    #[error("the secret key material is unusable: {0}")]
    BadSecretKey(String),
    /// Signing failed, or the signature made does not verify.
    #[error("signing the certificate failed: {0}")]
    Signing(String),
    /// A value cannot be encoded (a time out of range, the OpenPGP certificate).
    #[error("the certificate cannot be encoded: {0}")]
    Encoding(String),
}

/// Why a login certificate was refused: one variant per check, in the order [`verify`] makes
/// them. [`LoginCertError::code`] gives a stable short name for logs and protocol layers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginCertError {
    /// Larger than [`MAX_CERTIFICATE_BYTES`].
    #[error("the certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")]
    TooLarge,
    /// Not a PEM or DER X.509 certificate.
    #[error("not an X.509 certificate (PEM or DER): {0}")]
    Malformed(String),
    /// The bridge extension is absent: not a bridge certificate.
    #[error("the certificate has no OpenPGP bridge extension ({BRIDGE_EXTENSION_OID})")]
    ExtensionMissing,
    /// The bridge extension does not hold exactly one OpenPGP certificate.
    #[error("the OpenPGP bridge extension does not hold one OpenPGP public key: {0}")]
    ExtensionGarbage(String),
    /// The OpenPGP primary key or the signature algorithm is not supported.
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// The X.509 public key is not the OpenPGP primary key.
    #[error("the X.509 public key is not the OpenPGP primary key")]
    KeyMismatch,
    /// The X.509 self-signature does not verify.
    #[error("the certificate's self-signature does not verify")]
    BadSignature,
    /// The OpenPGP key is not valid under the standard policy (no valid self-signature, weak
    /// algorithms).
    #[error("the OpenPGP key is not valid under the standard policy: {0}")]
    KeyInvalid(String),
    /// The OpenPGP key was created in the future (beyond the tolerated clock skew).
    #[error("the OpenPGP key was created in the future")]
    KeyNotYetValid,
    /// The OpenPGP key has expired.
    #[error("the OpenPGP key has expired")]
    KeyExpired,
    /// The OpenPGP key is revoked.
    #[error("the OpenPGP key is revoked")]
    KeyRevoked,
    /// No valid User ID has an email on our domain.
    #[error("the OpenPGP key has no valid User ID <account>@{0}")]
    NoUserIdOnDomain(String),
    /// A User ID on our domain exists, but none carries a valid certification by a trusted
    /// server key.
    #[error("no User ID on {0} is certified by a trusted server key")]
    NotCertified(String),
}

impl LoginCertError {
    /// A stable short name for the failed check (`"extension-missing"`, ...), for logs and the
    /// protocol layers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge => "too-large",
            Self::Malformed(_) => "malformed",
            Self::ExtensionMissing => "extension-missing",
            Self::ExtensionGarbage(_) => "extension-garbage",
            Self::UnsupportedAlgorithm(_) => "unsupported-algorithm",
            Self::KeyMismatch => "key-mismatch",
            Self::BadSignature => "bad-signature",
            Self::KeyInvalid(_) => "key-invalid",
            Self::KeyNotYetValid => "key-not-yet-valid",
            Self::KeyExpired => "key-expired",
            Self::KeyRevoked => "key-revoked",
            Self::NoUserIdOnDomain(_) => "no-user-id-on-domain",
            Self::NotCertified(_) => "not-certified",
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Keys and algorithms
// ------------------------------------------------------------------------------------------------

/// A public key both sides can name: the OpenPGP primary key and the X.509 key are compared as
/// this.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    /// Modulus and public exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The 32-byte public key.
    Ed25519([u8; 32]),
}

fn strip_zeros(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

/// The OpenPGP primary key as a [`PublicKey`], or why it is not supported.
fn openpgp_public_key<P: key::KeyParts, R: key::KeyRole>(
    key: &Key<P, R>,
) -> Result<PublicKey, String> {
    #[allow(deprecated)]
    match (key.pk_algo(), key.mpis()) {
        (
            PublicKeyAlgorithm::RSAEncryptSign | PublicKeyAlgorithm::RSASign,
            mpi::PublicKey::RSA { e, n },
        ) => {
            if n.bits() < MIN_RSA_BITS {
                return Err(format!("an RSA key of {} bits", n.bits()));
            }
            Ok(PublicKey::Rsa {
                n: strip_zeros(n.value()),
                e: strip_zeros(e.value()),
            })
        }
        (PublicKeyAlgorithm::EdDSA, mpi::PublicKey::EdDSA { curve, q })
            if *curve == Curve::Ed25519 =>
        {
            let (point, _) = q
                .decode_point(&Curve::Ed25519)
                .map_err(|e| format!("a malformed Ed25519 key: {e}"))?;
            let point: [u8; 32] = point
                .try_into()
                .map_err(|_| "a malformed Ed25519 key".to_owned())?;
            Ok(PublicKey::Ed25519(point))
        }
        (PublicKeyAlgorithm::Ed25519, mpi::PublicKey::Ed25519 { a }) => Ok(PublicKey::Ed25519(*a)),
        (algo, _) => Err(format!("a {algo} key")),
    }
}

/// The X.509 SubjectPublicKeyInfo as a [`PublicKey`]; `None` for anything else.
fn spki_public_key(spki: &SubjectPublicKeyInfo<'_>) -> Option<PublicKey> {
    let algorithm = spki.algorithm.algorithm.as_bytes();
    if algorithm == oid::RSA_ENCRYPTION {
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Some(PublicKey::Rsa {
                n: strip_zeros(rsa.modulus),
                e: strip_zeros(rsa.exponent),
            }),
            _ => None,
        }
    } else if algorithm == oid::ED25519
        && spki.algorithm.parameters.is_none()
        && spki.subject_public_key.unused_bits == 0
    {
        let point: [u8; 32] = spki.subject_public_key.data.as_ref().try_into().ok()?;
        Some(PublicKey::Ed25519(point))
    } else {
        None
    }
}

/// The signature algorithms understood. Built certificates use [`SigAlg::RsaSha256`] or
/// [`SigAlg::Ed25519`]; Kontalk clients sign with [`SigAlg::RsaSha1`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigAlg {
    RsaSha1,
    RsaSha256,
    RsaSha384,
    RsaSha512,
    Ed25519,
}

impl SigAlg {
    fn oid(self) -> &'static [u8] {
        match self {
            Self::RsaSha1 => oid::SHA1_WITH_RSA,
            Self::RsaSha256 => oid::SHA256_WITH_RSA,
            Self::RsaSha384 => oid::SHA384_WITH_RSA,
            Self::RsaSha512 => oid::SHA512_WITH_RSA,
            Self::Ed25519 => oid::ED25519,
        }
    }

    fn is_rsa(self) -> bool {
        !matches!(self, Self::Ed25519)
    }

    /// Reads an AlgorithmIdentifier: RSA with NULL or absent parameters, Ed25519 with none
    /// (RFC 8410).
    fn from_identifier(id: &AlgorithmIdentifier<'_>) -> Result<Self, LoginCertError> {
        let bytes = id.algorithm.as_bytes();
        let alg = [
            Self::RsaSha1,
            Self::RsaSha256,
            Self::RsaSha384,
            Self::RsaSha512,
            Self::Ed25519,
        ]
        .into_iter()
        .find(|a| a.oid() == bytes)
        .ok_or_else(|| {
            LoginCertError::UnsupportedAlgorithm(format!(
                "the signature algorithm {}",
                id.algorithm
            ))
        })?;
        let parameters_ok = match &id.parameters {
            None => true,
            Some(p) => alg.is_rsa() && p.tag() == Asn1Tag::Null && p.data.is_empty(),
        };
        if !parameters_ok {
            return Err(LoginCertError::Malformed(
                "unexpected signature algorithm parameters".into(),
            ));
        }
        Ok(alg)
    }
}

/// Checks `signature` over `tbs` with `key`.
fn verify_signature(
    key: &PublicKey,
    alg: SigAlg,
    tbs: &[u8],
    signature: &[u8],
) -> Result<(), LoginCertError> {
    match key {
        PublicKey::Rsa { n, e } => {
            use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
            let key = RsaPublicKey::new_with_max_size(
                BigUint::from_bytes_be(n),
                BigUint::from_bytes_be(e),
                MAX_RSA_BITS,
            )
            .map_err(|e| LoginCertError::UnsupportedAlgorithm(format!("the RSA key: {e}")))?;
            let (scheme, digest) = match alg {
                SigAlg::RsaSha1 => (Pkcs1v15Sign::new::<Sha1>(), Sha1::digest(tbs).to_vec()),
                SigAlg::RsaSha256 => (Pkcs1v15Sign::new::<Sha256>(), Sha256::digest(tbs).to_vec()),
                SigAlg::RsaSha384 => (Pkcs1v15Sign::new::<Sha384>(), Sha384::digest(tbs).to_vec()),
                SigAlg::RsaSha512 => (Pkcs1v15Sign::new::<Sha512>(), Sha512::digest(tbs).to_vec()),
                SigAlg::Ed25519 => return Err(LoginCertError::BadSignature),
            };
            key.verify(scheme, &digest, signature)
                .map_err(|_| LoginCertError::BadSignature)
        }
        PublicKey::Ed25519(point) => {
            if alg != SigAlg::Ed25519 {
                return Err(LoginCertError::BadSignature);
            }
            // Not a curve point: nothing can verify against it.
            let key = ed25519_dalek::VerifyingKey::from_bytes(point)
                .map_err(|_| LoginCertError::BadSignature)?;
            let signature = ed25519_dalek::Signature::from_slice(signature)
                .map_err(|_| LoginCertError::BadSignature)?;
            key.verify_strict(tbs, &signature)
                .map_err(|_| LoginCertError::BadSignature)
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Building
// ------------------------------------------------------------------------------------------------

/// A bridge certificate made by [`build`], with the private key for the TLS stack.
#[derive(Clone)]
pub struct BridgeCertificate {
    der: Vec<u8>,
    private_key_pem: Zeroizing<String>,
    fingerprint: String,
}

impl fmt::Debug for BridgeCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeCertificate")
            .field("fingerprint", &self.fingerprint)
            .field("der_len", &self.der.len())
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

impl BridgeCertificate {
    /// The certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The certificate, DER, by value.
    pub fn into_der(self) -> Vec<u8> {
        self.der
    }

    /// The certificate as PEM (`-----BEGIN CERTIFICATE-----`, LF line endings).
    pub fn pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    /// The primary key's secret as unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    /// Handle with care: it is wiped from memory when `self` drops, copies are not.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    /// The OpenPGP key's fingerprint (hex, upper case).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Builds the bridge certificate of `secret_cert`'s primary key for the account `jid` (written
/// into the subjectAltName as given), as of `now`: notBefore is the key's creation time,
/// notAfter its expiry under the standard policy at `now`, or 9999-12-31 (RFC 5280's "no
/// expiry") when it does not expire. RSA keys sign with sha256WithRSAEncryption, Ed25519 keys
/// with Ed25519. The extension carries `secret_cert`'s public parts; include the server's
/// certification in `secret_cert` (merge the certified public key into it) for a certificate
/// that [`verify`] accepts.
pub fn build(
    secret_cert: &Cert,
    jid: &str,
    now: SystemTime,
) -> Result<BridgeCertificate, BuildError> {
    build_styled(secret_cert, jid, now, Style::Standard)
}

/// How a bridge certificate is laid out. Both carry the same key and extension and pass
/// [`verify`]; they differ in what other X.509 software makes of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    /// What [`build`] writes: RFC 5280-correct (the xmppAddr `otherName` value in its `[0]
    /// EXPLICIT` wrapper), a random serial, the key's lifetime as validity, keyUsage and
    /// extKeyUsage clientAuth, SHA-256 for RSA. OpenSSL loads it as a client certificate.
    #[default]
    Standard,
    /// Byte for byte the layout of Kontalk's `X509Bridge` (its Android and desktop clients):
    /// serial 1, notBefore = notAfter = the key's creation, basicConstraints CA (critical),
    /// keyUsage `digitalSignature nonRepudiation keyEncipherment keyAgreement keyCertSign`
    /// (critical), Netscape cert type `SSL client, S/MIME`, subject and authority key ids, the
    /// xmppAddr `otherName` value **without** its `[0] EXPLICIT` wrapper, SHA-1 for RSA.
    /// OpenSSL 3 refuses to load it with `SSL_CTX_use_certificate_chain_file` (its extension
    /// cache marks it invalid), as clients see when they test against an OpenSSL stack.
    Kontalk,
}

/// [`build`] in the given [`Style`].
pub fn build_styled(
    secret_cert: &Cert,
    jid: &str,
    now: SystemTime,
    style: Style,
) -> Result<BridgeCertificate, BuildError> {
    let (draft, private_key_pem) = Draft::new(secret_cert, jid, now, style)?;
    Ok(BridgeCertificate {
        der: draft.finish()?,
        private_key_pem,
        fingerprint: secret_cert.fingerprint().to_hex(),
    })
}

/// One X.509 extension to write.
struct Extension {
    oid: &'static [u8],
    critical: bool,
    value: Vec<u8>,
}

/// An X.509 time, already formatted.
enum X509Time {
    Utc(String),
    Generalized(String),
}

impl X509Time {
    fn new(t: SystemTime) -> Result<Self, BuildError> {
        let out_of_range = || BuildError::Encoding("a time out of range".into());
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| out_of_range())?
            .as_secs();
        let dt: DateTime<Utc> =
            DateTime::from_timestamp(i64::try_from(secs).map_err(|_| out_of_range())?, 0)
                .ok_or_else(out_of_range)?;
        // RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
        Ok(match dt.year() {
            1950..=2049 => Self::Utc(dt.format("%y%m%d%H%M%SZ").to_string()),
            0..=9999 => Self::Generalized(dt.format("%Y%m%d%H%M%SZ").to_string()),
            _ => return Err(out_of_range()),
        })
    }

    /// RFC 5280's "no well-defined expiration date".
    fn no_expiry() -> Self {
        Self::Generalized("99991231235959Z".into())
    }

    fn write(&self, w: DERWriter<'_>) {
        match self {
            Self::Utc(s) => {
                w.write_tagged_implicit(yasna::tags::TAG_UTCTIME, |w| w.write_bytes(s.as_bytes()))
            }
            Self::Generalized(s) => w
                .write_tagged_implicit(yasna::tags::TAG_GENERALIZEDTIME, |w| {
                    w.write_bytes(s.as_bytes())
                }),
        }
    }
}

fn write_oid(w: DERWriter<'_>, content: &[u8]) {
    w.write_tagged_implicit(yasna::tags::TAG_OID, |w| w.write_bytes(content));
}

fn write_algorithm(w: DERWriter<'_>, alg: SigAlg) {
    w.write_sequence(|w| {
        write_oid(w.next(), alg.oid());
        if alg.is_rsa() {
            w.next().write_null();
        }
    });
}

/// The subjectPublicKey bits: the DER RSAPublicKey, or the Ed25519 point.
fn spki_key_bits(key: &PublicKey) -> Vec<u8> {
    match key {
        PublicKey::Rsa { n, e } => yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_bigint_bytes(n, true);
                w.next().write_bigint_bytes(e, true);
            })
        }),
        PublicKey::Ed25519(point) => point.to_vec(),
    }
}

fn spki_der(key: &PublicKey) -> Vec<u8> {
    let bits = spki_key_bits(key);
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            match key {
                PublicKey::Rsa { .. } => w.next().write_sequence(|w| {
                    write_oid(w.next(), oid::RSA_ENCRYPTION);
                    w.next().write_null();
                }),
                PublicKey::Ed25519(_) => w
                    .next()
                    .write_sequence(|w| write_oid(w.next(), oid::ED25519)),
            }
            w.next().write_bitvec_bytes(&bits, bits.len() * 8);
        })
    })
}

/// `O=OpenPGP to X.509 Bridge` then one `CN` RDN per User ID, as Kontalk writes it.
fn name_der(common_names: &[String]) -> Vec<u8> {
    fn rdn(w: DERWriter<'_>, attribute: &[u8], value: &str) {
        w.write_set(|w| {
            w.next().write_sequence(|w| {
                write_oid(w.next(), attribute);
                w.next().write_utf8_string(value);
            })
        });
    }
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            rdn(w.next(), oid::ORGANIZATION, BRIDGE_ORGANIZATION);
            for cn in common_names {
                rdn(w.next(), oid::COMMON_NAME, cn);
            }
        })
    })
}

/// The bridge extension's value: a DER BIT STRING of the binary OpenPGP certificate.
fn bridge_extension(openpgp: &[u8]) -> Extension {
    Extension {
        oid: oid::BRIDGE,
        critical: false,
        value: yasna::construct_der(|w| w.write_bitvec_bytes(openpgp, openpgp.len() * 8)),
    }
}

/// subjectAltName with one otherName xmppAddr (RFC 6120 13.7.1.4): `[0] { OID, [0] UTF8String }`
/// in the standard style; Kontalk's `X509Bridge` leaves out the inner `[0]`.
fn subject_alt_name(jid: &str, style: Style) -> Extension {
    Extension {
        oid: oid::SUBJECT_ALT_NAME,
        critical: false,
        value: yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_tagged_implicit(Tag::context(0), |w| {
                    w.write_sequence(|w| {
                        write_oid(w.next(), oid::XMPP_ADDR);
                        match style {
                            Style::Standard => w
                                .next()
                                .write_tagged(Tag::context(0), |w| w.write_utf8_string(jid)),
                            Style::Kontalk => w.next().write_utf8_string(jid),
                        }
                    })
                })
            })
        }),
    }
}

/// The extensions of Kontalk's `X509Bridge`, in its order, before subjectAltName and the bridge
/// extension. The key ids are the SHA-1 of the subjectPublicKey bits (RFC 5280 4.2.1.2 (1)).
fn kontalk_extensions(key: &PublicKey) -> Vec<Extension> {
    let key_id = Sha1::digest(spki_key_bits(key)).to_vec();
    vec![
        Extension {
            oid: oid::BASIC_CONSTRAINTS,
            critical: true,
            value: yasna::construct_der(|w| w.write_sequence(|w| w.next().write_bool(true))),
        },
        Extension {
            oid: oid::KEY_USAGE,
            critical: true,
            // digitalSignature, nonRepudiation, keyEncipherment, keyAgreement, keyCertSign.
            value: yasna::construct_der(|w| w.write_bitvec_bytes(&[0b1110_1100], 6)),
        },
        Extension {
            oid: oid::NETSCAPE_CERT_TYPE,
            critical: false,
            // SSL client, S/MIME.
            value: yasna::construct_der(|w| w.write_bitvec_bytes(&[0b1010_0000], 3)),
        },
        Extension {
            oid: oid::SUBJECT_KEY_ID,
            critical: false,
            value: yasna::construct_der(|w| w.write_bytes(&key_id)),
        },
        Extension {
            oid: oid::AUTHORITY_KEY_ID,
            critical: false,
            value: yasna::construct_der(|w| {
                w.write_sequence(|w| {
                    w.next()
                        .write_tagged_implicit(Tag::context(0), |w| w.write_bytes(&key_id))
                })
            }),
        },
    ]
}

/// keyUsage (critical): digitalSignature, plus keyEncipherment for RSA (TLS with RSA key
/// exchange); extKeyUsage: clientAuth.
fn usage_extensions(key: &PublicKey) -> [Extension; 2] {
    let (bits, len) = match key {
        PublicKey::Rsa { .. } => (0b1010_0000u8, 3),
        PublicKey::Ed25519(_) => (0b1000_0000u8, 1),
    };
    [
        Extension {
            oid: oid::KEY_USAGE,
            critical: true,
            value: yasna::construct_der(|w| w.write_bitvec_bytes(&[bits], len)),
        },
        Extension {
            oid: oid::EXT_KEY_USAGE,
            critical: false,
            value: yasna::construct_der(|w| {
                w.write_sequence(|w| write_oid(w.next(), oid::CLIENT_AUTH))
            }),
        },
    ]
}

/// A certificate about to be signed; the tests change parts of it before [`Draft::finish`].
struct Draft {
    keypair: KeyPair,
    key: PublicKey,
    alg: SigAlg,
    serial: Vec<u8>,
    name: Vec<u8>,
    not_before: X509Time,
    not_after: X509Time,
    extensions: Vec<Extension>,
}

impl Draft {
    /// The certificate [`build`] makes, and the PKCS#8 PEM of the private key.
    fn new(
        secret_cert: &Cert,
        jid: &str,
        now: SystemTime,
        style: Style,
    ) -> Result<(Self, Zeroizing<String>), BuildError> {
        let primary = secret_cert.primary_key().key();
        let key = openpgp_public_key(primary).map_err(BuildError::UnsupportedAlgorithm)?;
        if !primary.has_unencrypted_secret() {
            return Err(BuildError::NoSecretKey);
        }
        let secret = primary
            .clone()
            .parts_into_secret()
            .map_err(|_| BuildError::NoSecretKey)?;
        let private_key_pem = pkcs8_pem(&secret, &key)?;
        let keypair = secret
            .into_keypair()
            .map_err(|e| BuildError::BadSecretKey(e.to_string()))?;
        let openpgp = secret_cert
            .to_vec()
            .map_err(|e| BuildError::Encoding(format!("the OpenPGP key: {e}")))?;
        let common_names: Vec<String> = secret_cert
            .userids()
            .map(|u| String::from_utf8_lossy(u.userid().value()).into_owned())
            .collect();
        let policy = StandardPolicy::new();
        let expiry = secret_cert
            .with_policy(&policy, now)
            .ok()
            .and_then(|valid| valid.primary_key().key_expiration_time());
        let created = primary.creation_time();
        let (serial, not_after, mut extensions, alg) = match style {
            Style::Standard => {
                // 126 random bits: positive, 16 bytes, unique enough for self-signed
                // certificates.
                let mut serial: [u8; 16] = rand::random();
                serial[0] = (serial[0] & 0x7f) | 0x40;
                let not_after = match expiry {
                    Some(t) => X509Time::new(t)?,
                    None => X509Time::no_expiry(),
                };
                let alg = match key {
                    PublicKey::Rsa { .. } => SigAlg::RsaSha256,
                    PublicKey::Ed25519(_) => SigAlg::Ed25519,
                };
                (
                    serial.to_vec(),
                    not_after,
                    usage_extensions(&key).into(),
                    alg,
                )
            }
            Style::Kontalk => {
                let alg = match key {
                    PublicKey::Rsa { .. } => SigAlg::RsaSha1,
                    PublicKey::Ed25519(_) => SigAlg::Ed25519,
                };
                (
                    vec![1],
                    X509Time::new(created)?,
                    kontalk_extensions(&key),
                    alg,
                )
            }
        };
        extensions.push(subject_alt_name(jid, style));
        extensions.push(bridge_extension(&openpgp));
        Ok((
            Self {
                keypair,
                alg,
                serial,
                name: name_der(&common_names),
                not_before: X509Time::new(created)?,
                not_after,
                extensions,
                key,
            },
            private_key_pem,
        ))
    }

    fn tbs_der(&self) -> Vec<u8> {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_tagged(Tag::context(0), |w| w.write_u8(2));
                w.next().write_bigint_bytes(&self.serial, true);
                write_algorithm(w.next(), self.alg);
                w.next().write_der(&self.name);
                w.next().write_sequence(|w| {
                    self.not_before.write(w.next());
                    self.not_after.write(w.next());
                });
                w.next().write_der(&self.name);
                w.next().write_der(&spki_der(&self.key));
                if !self.extensions.is_empty() {
                    w.next().write_tagged(Tag::context(3), |w| {
                        w.write_sequence(|w| {
                            for ext in &self.extensions {
                                w.next().write_sequence(|w| {
                                    write_oid(w.next(), ext.oid);
                                    if ext.critical {
                                        w.next().write_bool(true);
                                    }
                                    w.next().write_bytes(&ext.value);
                                });
                            }
                        })
                    });
                }
            })
        })
    }

    /// Signs and encodes the certificate; checks the signature before handing it out.
    fn finish(mut self) -> Result<Vec<u8>, BuildError> {
        let tbs = self.tbs_der();
        let signature = self.sign(&tbs)?;
        verify_signature(&self.key, self.alg, &tbs, &signature)
            .map_err(|_| BuildError::Signing("the signature made does not verify".into()))?;
        Ok(yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_der(&tbs);
                write_algorithm(w.next(), self.alg);
                w.next().write_bitvec_bytes(&signature, signature.len() * 8);
            })
        }))
    }

    /// Signs with sequoia's key pair: for RSA, OpenPGP's PKCS#1 v1.5 with DigestInfo is exactly
    /// X.509's; for Ed25519, the "digest" sequoia signs is the message itself.
    fn sign(&mut self, tbs: &[u8]) -> Result<Vec<u8>, BuildError> {
        let signing = |e: anyhow::Error| BuildError::Signing(e.to_string());
        let sig = match self.alg {
            SigAlg::RsaSha1 => self.keypair.sign(HashAlgorithm::SHA1, &Sha1::digest(tbs)),
            SigAlg::RsaSha256 => self
                .keypair
                .sign(HashAlgorithm::SHA256, &Sha256::digest(tbs)),
            SigAlg::RsaSha384 => self
                .keypair
                .sign(HashAlgorithm::SHA384, &Sha384::digest(tbs)),
            SigAlg::RsaSha512 => self
                .keypair
                .sign(HashAlgorithm::SHA512, &Sha512::digest(tbs)),
            SigAlg::Ed25519 => self.keypair.sign(HashAlgorithm::SHA512, tbs),
        }
        .map_err(signing)?;
        match (&sig, &self.key) {
            // OpenPGP drops the leading zeros that X.509 keeps: the signature is as long as
            // the modulus (RFC 8017 8.2.1).
            (mpi::Signature::RSA { s }, PublicKey::Rsa { n, .. }) => {
                Ok(s.value_padded(n.len()).map_err(signing)?.into_owned())
            }
            (mpi::Signature::EdDSA { r, s }, PublicKey::Ed25519(_)) => {
                let mut out = r.value_padded(32).map_err(signing)?.into_owned();
                out.extend_from_slice(&s.value_padded(32).map_err(signing)?);
                Ok(out)
            }
            (mpi::Signature::Ed25519 { s }, PublicKey::Ed25519(_)) => Ok(s.to_vec()),
            _ => Err(BuildError::Signing(
                "the signature does not fit the key".into(),
            )),
        }
    }
}

/// The primary key's secret as PKCS#8 PEM; checks that it fits the public key.
fn pkcs8_pem(
    secret: &Key<SecretParts, PrimaryRole>,
    key: &PublicKey,
) -> Result<Zeroizing<String>, BuildError> {
    let bad = |e: &dyn fmt::Display| BuildError::BadSecretKey(e.to_string());
    let pgp::packet::key::SecretKeyMaterial::Unencrypted(secret) = secret.secret() else {
        return Err(BuildError::NoSecretKey);
    };
    secret.map(|material| match (material, key) {
        (mpi::SecretKeyMaterial::RSA { d, p, q, .. }, PublicKey::Rsa { n, e }) => {
            use rsa::BigUint;
            use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
            let private = rsa::RsaPrivateKey::from_components(
                BigUint::from_bytes_be(n),
                BigUint::from_bytes_be(e),
                BigUint::from_bytes_be(d.value()),
                vec![
                    BigUint::from_bytes_be(p.value()),
                    BigUint::from_bytes_be(q.value()),
                ],
            )
            .map_err(|e| bad(&e))?;
            private.validate().map_err(|e| bad(&e))?;
            private.to_pkcs8_pem(LineEnding::LF).map_err(|e| bad(&e))
        }
        (mpi::SecretKeyMaterial::EdDSA { scalar }, PublicKey::Ed25519(point)) => {
            ed25519_pkcs8(&scalar.value_padded(32), point)
        }
        (mpi::SecretKeyMaterial::Ed25519 { x }, PublicKey::Ed25519(point)) => {
            ed25519_pkcs8(x, point)
        }
        _ => Err(BuildError::BadSecretKey(
            "the secret key does not fit the public key".into(),
        )),
    })
}

fn ed25519_pkcs8(seed: &[u8], point: &[u8; 32]) -> Result<Zeroizing<String>, BuildError> {
    use ed25519_dalek::pkcs8::{EncodePrivateKey as _, spki::der::pem::LineEnding};
    let seed: Zeroizing<[u8; 32]> =
        Zeroizing::new(seed.try_into().map_err(|_| {
            BuildError::BadSecretKey("an Ed25519 secret of the wrong length".into())
        })?);
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    if signing.verifying_key().as_bytes() != point {
        return Err(BuildError::BadSecretKey(
            "the Ed25519 secret does not fit the public key".into(),
        ));
    }
    // PKCS#8 v1 without the public key, RFC 8410's form: OpenSSL 3.0 does not read the v2
    // (OneAsymmetricKey) that `SigningKey::to_pkcs8_pem` writes.
    let keypair = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: *seed,
        public_key: None,
    };
    keypair
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| BuildError::BadSecretKey(e.to_string()))
}

// ------------------------------------------------------------------------------------------------
// Verifying
// ------------------------------------------------------------------------------------------------

/// A server key whose certifications a login accepts.
#[derive(Clone)]
pub struct TrustedServerKey {
    /// The server's certificate (public parts).
    pub cert: Cert,
    /// When the key stops counting (a previous key during a rotation); `None` for the current
    /// key. The key counts while `now` is before this time.
    pub until: Option<SystemTime>,
}

impl TrustedServerKey {
    /// Whether certifications by this key count at `now`.
    pub fn trusted_at(&self, now: SystemTime) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

impl fmt::Debug for TrustedServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedServerKey")
            .field("fingerprint", &self.cert.fingerprint().to_hex())
            .field("until", &self.until)
            .finish()
    }
}

/// What a login certificate is judged against: our XMPP domain and the server keys whose
/// certifications count (the current key, and a previous one until its end date).
#[derive(Debug, Clone)]
pub struct Trust {
    domain: String,
    keys: Vec<TrustedServerKey>,
}

impl Trust {
    /// Trust for `domain`, with no server key yet (add them with [`Trust::with_key`]).
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            keys: Vec::new(),
        }
    }

    /// Adds a server key whose certifications count while `now` is before `until` (`None`:
    /// always). Secret key material, if any, is dropped.
    pub fn with_key(mut self, cert: Cert, until: Option<SystemTime>) -> Self {
        self.keys.push(TrustedServerKey {
            cert: cert.strip_secret_key_material(),
            until,
        });
        self
    }

    /// The XMPP domain whose User IDs count.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The server keys, in the order added.
    pub fn keys(&self) -> &[TrustedServerKey] {
        &self.keys
    }
}

/// Who a valid login certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginIdentity {
    /// The bare JID, `<account>@<domain>` (the domain as configured in [`Trust`]).
    pub jid: String,
    /// The account: the certified User ID's local part.
    pub account: String,
    /// The OpenPGP key's fingerprint (hex, upper case).
    pub fingerprint: String,
}

/// Judges a login certificate (`input`: PEM or DER) at `now` against `trust`; see the module
/// documentation for the checks. The caller still checks that the fingerprint is the account's
/// current key. CPU work (RSA, OpenPGP signatures): run it in `spawn_blocking` on async paths.
pub fn verify(
    input: &[u8],
    trust: &Trust,
    now: SystemTime,
) -> Result<LoginIdentity, LoginCertError> {
    let cert = presented_key(input)?;
    let policy = StandardPolicy::new();
    let (valid, t) = valid_at(&cert, &policy, now)?;
    identity(&valid, trust, now, t)
}

/// The OpenPGP key a bridge certificate (`input`: PEM or DER) carries, after the checks that
/// need no trust: it parses, the extension holds exactly one OpenPGP key, that key's primary key
/// is the certificate's public key, and the X.509 self-signature verifies. A TLS handshake with
/// the certificate then proves that the client holds the key, which is how Kontalk clients
/// present their still uncertified key in registration step 2. Whether the key is valid, and
/// whom it names, is for the caller (registration checks the User ID, [`verify`] the
/// certification). CPU work: run it in `spawn_blocking` on async paths.
pub fn presented_key(input: &[u8]) -> Result<Cert, LoginCertError> {
    if input.len() > MAX_CERTIFICATE_BYTES {
        return Err(LoginCertError::TooLarge);
    }
    let der = decode_input(input)?;
    let (rest, x509) = X509CertificateParser::new()
        .with_deep_parse_extensions(false)
        .parse(&der)
        .map_err(|e| LoginCertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(LoginCertError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }

    let mut bridge = x509
        .extensions()
        .iter()
        .filter(|ext| ext.oid.as_bytes() == oid::BRIDGE);
    let extension = bridge.next().ok_or(LoginCertError::ExtensionMissing)?;
    if bridge.next().is_some() {
        return Err(LoginCertError::ExtensionGarbage(
            "the extension appears more than once".into(),
        ));
    }
    let cert = parse_extension(extension.value)?;

    let key = openpgp_public_key(cert.primary_key().key())
        .map_err(|e| LoginCertError::UnsupportedAlgorithm(format!("the OpenPGP key is {e}")))?;
    if spki_public_key(x509.public_key()).as_ref() != Some(&key) {
        return Err(LoginCertError::KeyMismatch);
    }

    let alg = SigAlg::from_identifier(&x509.signature_algorithm)?;
    if x509.signature_algorithm != x509.tbs_certificate.signature {
        return Err(LoginCertError::Malformed(
            "the signature algorithm differs from the signed one".into(),
        ));
    }
    if x509.signature_value.unused_bits != 0 {
        return Err(LoginCertError::BadSignature);
    }
    verify_signature(
        &key,
        alg,
        x509.tbs_certificate.as_ref(),
        &x509.signature_value.data,
    )?;
    Ok(cert)
}

/// PEM (`CERTIFICATE`) or DER.
fn decode_input(input: &[u8]) -> Result<Cow<'_, [u8]>, LoginCertError> {
    let trimmed = input.trim_ascii_start();
    if !trimmed.starts_with(b"-----BEGIN") {
        return Ok(Cow::Borrowed(input));
    }
    let block = pem::parse(trimmed).map_err(|e| LoginCertError::Malformed(format!("PEM: {e}")))?;
    if block.tag() != "CERTIFICATE" {
        return Err(LoginCertError::Malformed(format!(
            "the PEM block is {}, not CERTIFICATE",
            block.tag()
        )));
    }
    Ok(Cow::Owned(block.into_contents()))
}

/// The extension's value: a BIT STRING holding exactly one OpenPGP certificate, public parts.
fn parse_extension(value: &[u8]) -> Result<Cert, LoginCertError> {
    let garbage = |reason: String| LoginCertError::ExtensionGarbage(reason);
    let (rest, bits) =
        BitString::from_der(value).map_err(|e| garbage(format!("not a BIT STRING: {e}")))?;
    if !rest.is_empty() || bits.unused_bits != 0 {
        return Err(garbage("not a whole BIT STRING".into()));
    }
    let bytes: &[u8] = &bits.data;
    if bytes.is_empty() {
        return Err(garbage("it is empty".into()));
    }
    if bytes.len() > MAX_KEY_BYTES {
        return Err(garbage(format!("larger than {MAX_KEY_BYTES} bytes")));
    }
    let parser = CertParser::from_bytes(bytes).map_err(|e| garbage(e.to_string()))?;
    let mut certs = Vec::new();
    for cert in parser {
        certs.push(cert.map_err(|e| garbage(e.to_string()))?);
        if certs.len() > 1 {
            return Err(garbage("more than one certificate".into()));
        }
    }
    let cert = certs
        .pop()
        .ok_or_else(|| garbage("no certificate".into()))?;
    if cert.is_tsk() {
        return Err(garbage("it contains secret key material".into()));
    }
    crate::openpgp::check_complexity(&cert).map_err(|e| garbage(e.to_string()))?;
    Ok(cert)
}

/// The key under the standard policy at `now`, alive and not revoked, and the reference time
/// used (a little later than `now` for a key made on a phone whose clock runs fast, as
/// [`crate::openpgp::check_user_key`] does).
fn valid_at<'a>(
    cert: &'a Cert,
    policy: &'a StandardPolicy<'a>,
    now: SystemTime,
) -> Result<(ValidCert<'a>, SystemTime), LoginCertError> {
    let creation = cert.primary_key().key().creation_time();
    if creation > now + CLOCK_SKEW {
        return Err(LoginCertError::KeyNotYetValid);
    }
    let t = if creation > now {
        now + CLOCK_SKEW
    } else {
        now
    };
    let valid = cert
        .with_policy(policy, t)
        .map_err(|e| LoginCertError::KeyInvalid(e.to_string()))?;
    if matches!(valid.revocation_status(), RevocationStatus::Revoked(_))
        || crate::openpgp::revoked_ahead(cert, policy, now).key
    {
        return Err(LoginCertError::KeyRevoked);
    }
    if valid.alive().is_err() {
        return Err(LoginCertError::KeyExpired);
    }
    Ok((valid, t))
}

/// The first valid User ID `<account>@<domain>` (the primary User ID first) certified by a
/// server key trusted at `now`; certifications are judged at `t`.
fn identity(
    valid: &ValidCert<'_>,
    trust: &Trust,
    now: SystemTime,
    t: SystemTime,
) -> Result<LoginIdentity, LoginCertError> {
    let policy = valid.policy();
    let primary = valid.primary_userid().ok().map(|u| u.userid().clone());
    let revoked = crate::openpgp::revoked_ahead(valid.cert(), policy, now);
    let mut candidates: Vec<(ValidUserIDAmalgamation<'_>, String)> = valid
        .userids()
        .filter(|u| !matches!(u.revocation_status(), RevocationStatus::Revoked(_)))
        .filter(|u| !revoked.userids.contains(u.userid()))
        .filter_map(|u| {
            let email = u.userid().email().ok().flatten()?;
            let (local, host) = email.rsplit_once('@')?;
            (!local.is_empty() && host.eq_ignore_ascii_case(&trust.domain))
                .then(|| (u.clone(), local.to_owned()))
        })
        .collect();
    if candidates.is_empty() {
        return Err(LoginCertError::NoUserIdOnDomain(trust.domain.clone()));
    }
    candidates.sort_by_key(|(u, _)| Some(u.userid()) != primary.as_ref());
    let servers: Vec<&TrustedServerKey> = trust.keys.iter().filter(|k| k.trusted_at(now)).collect();
    for (uid, account) in candidates {
        // Verified, alive at `t`, under the policy; sequoia only considers certifications whose
        // issuer subpackets name the server key (ours and GnuPG's always do).
        let certified = servers.iter().any(|server| {
            uid.amalgamation()
                .valid_certifications_by_key(policy, t, server.cert.primary_key().key())
                .any(|sig| sig.typ() == SignatureType::GenericCertification)
        });
        if certified {
            return Ok(LoginIdentity {
                jid: format!("{account}@{}", trust.domain),
                account,
                fingerprint: valid.fingerprint().to_hex(),
            });
        }
    }
    Err(LoginCertError::NotCertified(trust.domain.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openpgp::{ServerKey, UserKey, generate_user_key, parse_cert};
    use pgp::Packet;
    use pgp::packet::UserID;
    use pgp::packet::signature::SignatureBuilder;
    use pgp::types::KeyFlags;
    use std::path::Path;
    use std::process::Command;
    use std::sync::OnceLock;
    use std::time::Duration;

    const DOMAIN: &str = "localhost";
    const ACCOUNT: &str = "4bdd4f929f3a1062253e4e496bafba0bdfb5db75";

    fn email() -> String {
        format!("{ACCOUNT}@{DOMAIN}")
    }

    /// Base-128 DER contents of a dotted OID, computed independently of the constants.
    fn encode_oid(dotted: &str) -> Vec<u8> {
        let arcs: Vec<u128> = dotted.split('.').map(|a| a.parse().unwrap()).collect();
        let mut out = Vec::new();
        let mut values = vec![arcs[0] * 40 + arcs[1]];
        values.extend_from_slice(&arcs[2..]);
        for mut v in values {
            let mut chunk = vec![(v & 0x7f) as u8];
            v >>= 7;
            while v > 0 {
                chunk.push(0x80 | (v & 0x7f) as u8);
                v >>= 7;
            }
            chunk.reverse();
            out.extend(chunk);
        }
        out
    }

    /// A user's secret key whose User ID `email` carries `server`'s certification.
    fn certify(server: &ServerKey, user: Cert, email: &str) -> Cert {
        let key = UserKey::from_bytes(&user.to_vec().unwrap()).unwrap();
        let certified = server.certify(&key, email, SystemTime::now()).unwrap();
        user.merge_public(parse_cert(&certified.bytes).unwrap())
            .unwrap()
    }

    /// One RSA-2048 user key for all tests (generation is slow).
    fn rsa_user() -> Cert {
        static KEY: OnceLock<Cert> = OnceLock::new();
        KEY.get_or_init(|| generate_user_key("Test", &email(), true).unwrap())
            .clone()
    }

    fn ed25519_user() -> Cert {
        generate_user_key("Test", &email(), false).unwrap()
    }

    fn trust(server: &ServerKey) -> Trust {
        Trust::new(DOMAIN).with_key(server.public_cert().clone(), None)
    }

    fn expected(user: &Cert) -> LoginIdentity {
        LoginIdentity {
            jid: email(),
            account: ACCOUNT.into(),
            fingerprint: user.fingerprint().to_hex(),
        }
    }

    fn draft(user: &Cert) -> Draft {
        Draft::new(user, &email(), SystemTime::now(), Style::Standard)
            .unwrap()
            .0
    }

    fn replace_bridge_extension(draft: &mut Draft, value: Vec<u8>) {
        let ext = draft
            .extensions
            .iter_mut()
            .find(|e| e.oid == oid::BRIDGE)
            .unwrap();
        ext.value = value;
    }

    fn bit_string(bytes: &[u8]) -> Vec<u8> {
        yasna::construct_der(|w| w.write_bitvec_bytes(bytes, bytes.len() * 8))
    }

    fn refused(der: &[u8], trust: &Trust) -> LoginCertError {
        verify(der, trust, SystemTime::now()).unwrap_err()
    }

    #[test]
    fn object_identifiers_are_their_dotted_forms() {
        let arc: u128 = BRIDGE_EXTENSION_OID
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(arc.ilog2() + 1, 126, "the last arc is 126 bits long");
        assert_eq!(oid::BRIDGE, encode_oid(BRIDGE_EXTENSION_OID).as_slice());
        for (bytes, dotted) in [
            (oid::RSA_ENCRYPTION, "1.2.840.113549.1.1.1"),
            (oid::SHA1_WITH_RSA, "1.2.840.113549.1.1.5"),
            (oid::SHA256_WITH_RSA, "1.2.840.113549.1.1.11"),
            (oid::SHA384_WITH_RSA, "1.2.840.113549.1.1.12"),
            (oid::SHA512_WITH_RSA, "1.2.840.113549.1.1.13"),
            (oid::ED25519, "1.3.101.112"),
            (oid::ORGANIZATION, "2.5.4.10"),
            (oid::COMMON_NAME, "2.5.4.3"),
            (oid::KEY_USAGE, "2.5.29.15"),
            (oid::EXT_KEY_USAGE, "2.5.29.37"),
            (oid::SUBJECT_ALT_NAME, "2.5.29.17"),
            (oid::CLIENT_AUTH, "1.3.6.1.5.5.7.3.2"),
            (oid::XMPP_ADDR, "1.3.6.1.5.5.7.8.5"),
            (oid::BASIC_CONSTRAINTS, "2.5.29.19"),
            (oid::SUBJECT_KEY_ID, "2.5.29.14"),
            (oid::AUTHORITY_KEY_ID, "2.5.29.35"),
            (oid::NETSCAPE_CERT_TYPE, "2.16.840.1.113730.1.1"),
        ] {
            assert_eq!(bytes, encode_oid(dotted).as_slice(), "{dotted}");
        }
    }

    /// Checks the structure of a built certificate with x509-parser's full parse.
    fn check_structure(der: &[u8], user: &Cert) {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        let (rest, x509) = X509CertificateParser::new().parse(der).unwrap();
        assert!(rest.is_empty());
        assert_eq!(x509.version(), x509_parser::x509::X509Version::V3);
        assert_eq!(x509.subject(), x509.issuer());
        let subject = x509.subject().to_string();
        assert!(
            subject.starts_with("O=OpenPGP to X.509 Bridge, CN="),
            "{subject}"
        );
        assert!(subject.contains(&email()), "{subject}");
        let created = user
            .primary_key()
            .key()
            .creation_time()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(x509.validity().not_before.timestamp(), created as i64);
        assert_eq!(x509.validity().not_after.to_datetime().year(), 9999);
        let mut xmpp_addrs = Vec::new();
        let mut bridge = 0;
        for ext in x509.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::OtherName(oid, value) = name {
                            assert_eq!(oid.as_bytes(), oid::XMPP_ADDR);
                            // [0] EXPLICIT UTF8String
                            let (_, any) = x509_parser::asn1_rs::Any::from_der(value).unwrap();
                            assert_eq!(any.tag(), Asn1Tag(0));
                            let (_, s) =
                                x509_parser::asn1_rs::Utf8String::from_der(any.data).unwrap();
                            xmpp_addrs.push(s.string());
                        }
                    }
                }
                ParsedExtension::ParseError { error } => panic!("{error:?}"),
                _ => {}
            }
            if ext.oid.as_bytes() == oid::BRIDGE {
                bridge += 1;
                assert!(!ext.critical);
                let cert = parse_extension(ext.value).unwrap();
                assert_eq!(cert, user.clone().strip_secret_key_material());
            }
        }
        assert_eq!(xmpp_addrs, [email()]);
        assert_eq!(bridge, 1);
    }

    #[test]
    fn round_trip_ed25519() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, ed25519_user(), &email());
        let built = build(&user, &email(), SystemTime::now()).unwrap();
        check_structure(built.der(), &user);
        let trust = trust(&server);
        assert_eq!(
            verify(built.der(), &trust, SystemTime::now()).unwrap(),
            expected(&user)
        );
        assert!(built.pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(
            verify(built.pem().as_bytes(), &trust, SystemTime::now()).unwrap(),
            expected(&user)
        );
        assert!(
            built
                .private_key_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----\n")
        );
        assert_eq!(built.fingerprint(), user.fingerprint().to_hex());
        assert!(!format!("{built:?}").contains("PRIVATE KEY-----"));
        // The domain is compared without regard to case; the JID names the configured one.
        let upper = Trust::new("LOCALHOST").with_key(server.public_cert().clone(), None);
        let id = verify(built.der(), &upper, SystemTime::now()).unwrap();
        assert_eq!(id.jid, format!("{ACCOUNT}@LOCALHOST"));
    }

    #[test]
    fn round_trip_rsa_with_sha256_and_sha1() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, rsa_user(), &email());
        let built = build(&user, &email(), SystemTime::now()).unwrap();
        check_structure(built.der(), &user);
        let (_, x509) = X509CertificateParser::new().parse(built.der()).unwrap();
        assert_eq!(
            x509.signature_algorithm.algorithm.as_bytes(),
            oid::SHA256_WITH_RSA
        );
        assert_eq!(x509.signature_value.data.len(), 256);
        let trust = trust(&server);
        assert_eq!(
            verify(built.der(), &trust, SystemTime::now()).unwrap(),
            expected(&user)
        );
        assert!(
            built
                .private_key_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----\n")
        );
        // What Kontalk clients send: sha1WithRSAEncryption. And SHA-512 for good measure.
        for alg in [SigAlg::RsaSha1, SigAlg::RsaSha512] {
            let mut d = draft(&user);
            d.alg = alg;
            let der = d.finish().unwrap();
            assert_eq!(
                verify(&der, &trust, SystemTime::now()).unwrap(),
                expected(&user)
            );
        }
    }

    /// The extensions of a certificate in order: OID, critical, value.
    fn extensions_of(der: &[u8]) -> Vec<(Vec<u8>, bool, Vec<u8>)> {
        let (_, x509) = X509CertificateParser::new()
            .with_deep_parse_extensions(false)
            .parse(der)
            .unwrap();
        x509.extensions()
            .iter()
            .map(|e| (e.oid.as_bytes().to_vec(), e.critical, e.value.to_vec()))
            .collect()
    }

    #[test]
    fn builds_certificates_exactly_as_kontalks_x509bridge() {
        // The layout of Kontalk's X509Bridge, as in the login certificate among the Android
        // client's test assets (app/src/androidTest/assets/keys/login.crt): serial 1, notBefore
        // = notAfter = the key's creation, sha1WithRSAEncryption, and these extensions in this
        // order, with the xmppAddr value lacking its [0] EXPLICIT wrapper.
        let server = ServerKey::generate(DOMAIN).unwrap();
        for (user, alg) in [
            (rsa_user(), oid::SHA1_WITH_RSA),
            (ed25519_user(), oid::ED25519),
        ] {
            let user = certify(&server, user, &email());
            let built = build_styled(&user, &email(), SystemTime::now(), Style::Kontalk).unwrap();
            let (_, x509) = X509CertificateParser::new()
                .with_deep_parse_extensions(false)
                .parse(built.der())
                .unwrap();
            assert_eq!(x509.raw_serial(), &[1]);
            assert_eq!(x509.validity().not_before, x509.validity().not_after);
            assert_eq!(
                x509.validity().not_before.timestamp(),
                user.primary_key()
                    .key()
                    .creation_time()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
            );
            assert_eq!(x509.signature_algorithm.algorithm.as_bytes(), alg);
            let key_id = Sha1::digest(&x509.public_key().subject_public_key.data).to_vec();
            let mut san = vec![0x30, 0x00, 0xa0, 0x00, 0x06, 0x08];
            san.extend_from_slice(oid::XMPP_ADDR);
            san.extend_from_slice(&[0x0c, email().len() as u8]);
            san.extend_from_slice(email().as_bytes());
            san[3] = (san.len() - 4) as u8;
            san[1] = (san.len() - 2) as u8;
            let mut aki = vec![0x30, 0x16, 0x80, 0x14];
            aki.extend_from_slice(&key_id);
            let mut ski = vec![0x04, 0x14];
            ski.extend_from_slice(&key_id);
            let found = extensions_of(built.der());
            let expected_head: Vec<(Vec<u8>, bool, Vec<u8>)> = vec![
                (
                    encode_oid("2.5.29.19"),
                    true,
                    vec![0x30, 0x03, 0x01, 0x01, 0xff],
                ),
                (encode_oid("2.5.29.15"), true, vec![0x03, 0x02, 0x02, 0xec]),
                (
                    encode_oid("2.16.840.1.113730.1.1"),
                    false,
                    vec![0x03, 0x02, 0x05, 0xa0],
                ),
                (encode_oid("2.5.29.14"), false, ski),
                (encode_oid("2.5.29.35"), false, aki),
                (encode_oid("2.5.29.17"), false, san),
            ];
            assert_eq!(found[..6], expected_head[..]);
            assert_eq!(found.len(), 7);
            assert_eq!(found[6].0, oid::BRIDGE);
            assert!(!found[6].1);
            assert_eq!(found[6].2, bit_string(&user.to_vec().unwrap()));
            // Accepted at login, and its key read back for registration.
            assert_eq!(
                verify(built.der(), &trust(&server), SystemTime::now()).unwrap(),
                expected(&user)
            );
            assert_eq!(
                presented_key(built.pem().as_bytes()).unwrap().fingerprint(),
                user.fingerprint()
            );
        }
    }

    #[test]
    fn the_presented_key_of_an_uncertified_certificate() {
        // Registration step 2: the client presents the bridge certificate of its key before
        // the server certified it. The key is read back; the login check still refuses it.
        let server = ServerKey::generate(DOMAIN).unwrap();
        for user in [rsa_user(), ed25519_user()] {
            for style in [Style::Standard, Style::Kontalk] {
                let built = build_styled(&user, &email(), SystemTime::now(), style).unwrap();
                let key = presented_key(built.der()).unwrap();
                assert_eq!(key, user.clone().strip_secret_key_material());
                assert_eq!(
                    refused(built.der(), &trust(&server)).code(),
                    "not-certified"
                );
            }
        }
        // The checks before trust still apply: another key in the extension, a broken
        // signature, garbage.
        let other = ed25519_user().strip_secret_key_material();
        let mut d = draft(&rsa_user());
        replace_bridge_extension(&mut d, bit_string(&other.to_vec().unwrap()));
        assert_eq!(
            presented_key(&d.finish().unwrap()).unwrap_err(),
            LoginCertError::KeyMismatch
        );
        let mut der = build(&rsa_user(), &email(), SystemTime::now())
            .unwrap()
            .into_der();
        let last = der.len() - 1;
        der[last] ^= 1;
        assert_eq!(
            presented_key(&der).unwrap_err(),
            LoginCertError::BadSignature
        );
        assert_eq!(presented_key(b"junk").unwrap_err().code(), "malformed");
    }

    #[test]
    fn refuses_input_that_is_no_certificate() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let trust = trust(&server);
        for input in [
            &b""[..],
            b"garbage",
            b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
            b"\x30\x03\x02\x01\x01",
        ] {
            let e = refused(input, &trust);
            assert_eq!(e.code(), "malformed", "{e}");
        }
        let key = pem_encode("PRIVATE KEY", b"\x30\x00");
        assert!(matches!(
            refused(key.as_bytes(), &trust),
            LoginCertError::Malformed(m) if m.contains("PRIVATE KEY")
        ));
        let user = certify(&server, ed25519_user(), &email());
        let mut der = build(&user, &email(), SystemTime::now())
            .unwrap()
            .into_der();
        der.push(0);
        assert_eq!(refused(&der, &trust).code(), "malformed");
        assert_eq!(
            refused(&vec![0x30; MAX_CERTIFICATE_BYTES + 1], &trust),
            LoginCertError::TooLarge
        );
    }

    #[test]
    fn refuses_a_missing_extension() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, ed25519_user(), &email());
        let mut d = draft(&user);
        d.extensions.retain(|e| e.oid != oid::BRIDGE);
        let der = d.finish().unwrap();
        assert_eq!(
            refused(&der, &trust(&server)),
            LoginCertError::ExtensionMissing
        );
    }

    #[test]
    fn refuses_garbage_in_the_extension() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, ed25519_user(), &email());
        let other = certify(&server, ed25519_user(), &email());
        let public = user.to_vec().unwrap();
        let mut two = public.clone();
        two.extend(other.to_vec().unwrap());
        let octet_string = yasna::construct_der(|w| w.write_bytes(&public));
        let mut trailing = bit_string(&public);
        trailing.push(0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("not a key", bit_string(b"not an OpenPGP key")),
            ("empty", bit_string(b"")),
            ("octet string", octet_string),
            ("trailing bytes", trailing),
            ("two keys", bit_string(&two)),
            ("secret key", bit_string(&user.as_tsk().to_vec().unwrap())),
            ("too large", bit_string(&vec![0x99; MAX_KEY_BYTES + 1])),
        ];
        for (what, value) in cases {
            let mut d = draft(&user);
            replace_bridge_extension(&mut d, value);
            let der = d.finish().unwrap();
            let e = refused(&der, &trust(&server));
            assert_eq!(e.code(), "extension-garbage", "{what}: {e}");
        }
        // Twice the extension.
        let mut d = draft(&user);
        d.extensions.push(bridge_extension(&public));
        let der = d.finish().unwrap();
        assert_eq!(refused(&der, &trust(&server)).code(), "extension-garbage");
    }

    #[test]
    fn refuses_an_extension_holding_another_key() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, ed25519_user(), &email());
        let other = certify(&server, ed25519_user(), &email());
        let trust = trust(&server);
        let mut d = draft(&user);
        replace_bridge_extension(&mut d, bit_string(&other.to_vec().unwrap()));
        assert_eq!(
            refused(&d.finish().unwrap(), &trust),
            LoginCertError::KeyMismatch
        );
        // Another algorithm altogether.
        let rsa = certify(&server, rsa_user(), &email());
        let mut d = draft(&user);
        replace_bridge_extension(&mut d, bit_string(&rsa.to_vec().unwrap()));
        assert_eq!(
            refused(&d.finish().unwrap(), &trust),
            LoginCertError::KeyMismatch
        );
    }

    #[test]
    fn refuses_unsupported_algorithms() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let (p256, _) = CertBuilder::general_purpose(Some(format!("T <{}>", email())))
            .set_cipher_suite(CipherSuite::P256)
            .generate()
            .unwrap();
        assert!(matches!(
            build(&p256, &email(), SystemTime::now()),
            Err(BuildError::UnsupportedAlgorithm(_))
        ));
        let user = certify(&server, ed25519_user(), &email());
        let mut d = draft(&user);
        replace_bridge_extension(&mut d, bit_string(&p256.to_vec().unwrap()));
        assert_eq!(
            refused(&d.finish().unwrap(), &trust(&server)).code(),
            "unsupported-algorithm"
        );
        // A key without its secret cannot build.
        assert_eq!(
            build(
                &user.clone().strip_secret_key_material(),
                &email(),
                SystemTime::now()
            )
            .unwrap_err(),
            BuildError::NoSecretKey
        );
    }

    #[test]
    fn refuses_a_bad_signature() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let trust = trust(&server);
        for user in [ed25519_user(), rsa_user()] {
            let user = certify(&server, user, &email());
            let der = build(&user, &email(), SystemTime::now())
                .unwrap()
                .into_der();
            // A flipped bit in the signature.
            let mut bad = der.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x01;
            assert_eq!(refused(&bad, &trust), LoginCertError::BadSignature);
            // A changed byte in the signed part (the organization's name).
            let mut bad = der.clone();
            let at = bad
                .windows(BRIDGE_ORGANIZATION.len())
                .position(|w| w == BRIDGE_ORGANIZATION.as_bytes())
                .unwrap();
            bad[at] = b'X';
            assert_eq!(refused(&bad, &trust), LoginCertError::BadSignature);
        }
    }

    #[test]
    fn refuses_an_expired_key() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(7200);
        let (user, _) = CertBuilder::general_purpose(Some(format!("T <{}>", email())))
            .set_cipher_suite(CipherSuite::Cv25519)
            .set_creation_time(t0)
            .set_validity_period(Duration::from_secs(3600))
            .generate()
            .unwrap();
        let user = certify(&server, user, &email());
        let der = build(&user, &email(), t0 + Duration::from_secs(60))
            .unwrap()
            .into_der();
        // notAfter is the key's expiry.
        let (_, x509) = X509CertificateParser::new().parse(&der).unwrap();
        let created = t0.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(x509.validity().not_after.timestamp(), created + 3600);
        assert_eq!(refused(&der, &trust(&server)), LoginCertError::KeyExpired);
    }

    #[test]
    fn refuses_a_revoked_key() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let (user, revocation) = CertBuilder::general_purpose(Some(format!("T <{}>", email())))
            .set_cipher_suite(CipherSuite::Cv25519)
            .generate()
            .unwrap();
        let user = certify(&server, user, &email());
        let (user, _) = user.insert_packets(revocation).unwrap();
        let der = build(&user, &email(), SystemTime::now())
            .unwrap()
            .into_der();
        assert_eq!(refused(&der, &trust(&server)), LoginCertError::KeyRevoked);
    }

    #[test]
    fn refuses_revocations_dated_a_little_ahead() {
        // A revocation made by a clock that runs fast (GnuPG dates a same-second one a second
        // ahead) revokes at once, for the key and for the certified User ID.
        use pgp::types::ReasonForRevocation;
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, ed25519_user(), &email());
        let mut signer = user
            .primary_key()
            .key()
            .clone()
            .parts_into_secret()
            .unwrap()
            .into_keypair()
            .unwrap();
        let ahead = SystemTime::now() + Duration::from_secs(2);
        let key_rev = CertRevocationBuilder::new()
            .set_reason_for_revocation(ReasonForRevocation::KeyCompromised, b"lost")
            .unwrap()
            .set_signature_creation_time(ahead)
            .unwrap()
            .build(&mut signer, &user, None)
            .unwrap();
        let revoked = user.clone().insert_packets(key_rev).unwrap().0;
        let revoked_der = Draft::new(&revoked, &email(), SystemTime::now(), Style::Standard)
            .unwrap()
            .0
            .finish()
            .unwrap();
        assert_eq!(
            refused(&revoked_der, &trust(&server)),
            LoginCertError::KeyRevoked
        );
        let uid = user.userids().next().unwrap().userid().clone();
        let uid_rev = UserIDRevocationBuilder::new()
            .set_reason_for_revocation(ReasonForRevocation::UIDRetired, b"gone")
            .unwrap()
            .set_signature_creation_time(ahead)
            .unwrap()
            .build(&mut signer, &user, &uid, None)
            .unwrap();
        let uid_revoked = user.clone().insert_packets(uid_rev).unwrap().0;
        let der = Draft::new(&uid_revoked, &email(), SystemTime::now(), Style::Standard)
            .unwrap()
            .0
            .finish()
            .unwrap();
        assert_eq!(
            refused(&der, &trust(&server)).code(),
            "no-user-id-on-domain"
        );
    }

    #[test]
    fn refuses_a_key_from_the_future_beyond_the_clock_skew() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        for (ahead, accepted) in [(120, true), (86400, false)] {
            let created = SystemTime::now() + Duration::from_secs(ahead);
            let (user, _) = CertBuilder::general_purpose(Some(format!("T <{}>", email())))
                .set_cipher_suite(CipherSuite::Cv25519)
                .set_creation_time(created)
                .generate()
                .unwrap();
            let user = certify(&server, user, &email());
            let der = build(&user, &email(), created).unwrap().into_der();
            let r = verify(&der, &trust(&server), SystemTime::now());
            if accepted {
                assert_eq!(r.unwrap(), expected(&user));
            } else {
                assert_eq!(r.unwrap_err(), LoginCertError::KeyNotYetValid);
            }
        }
    }

    #[test]
    fn refuses_a_key_without_a_user_id_on_our_domain() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let elsewhere = format!("{ACCOUNT}@example.org");
        let user = generate_user_key("Test", &elsewhere, false).unwrap();
        let user = certify(&server, user, &elsewhere);
        let der = build(&user, &elsewhere, SystemTime::now())
            .unwrap()
            .into_der();
        assert_eq!(
            refused(&der, &trust(&server)),
            LoginCertError::NoUserIdOnDomain(DOMAIN.into())
        );
        // The same key is fine for example.org's server.
        let id = verify(
            &der,
            &Trust::new("example.org").with_key(server.public_cert().clone(), None),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(id.jid, elsewhere);
    }

    #[test]
    fn refuses_a_key_the_server_did_not_certify() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = ed25519_user();
        let der = build(&user, &email(), SystemTime::now())
            .unwrap()
            .into_der();
        assert_eq!(
            refused(&der, &trust(&server)),
            LoginCertError::NotCertified(DOMAIN.into())
        );
        // No trusted key at all.
        let user = certify(&server, user, &email());
        let der = build(&user, &email(), SystemTime::now())
            .unwrap()
            .into_der();
        assert_eq!(refused(&der, &Trust::new(DOMAIN)).code(), "not-certified");
    }

    #[test]
    fn refuses_a_certification_by_another_server_key() {
        let server = ServerKey::generate(DOMAIN).unwrap();
        let stranger = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&stranger, ed25519_user(), &email());
        let der = build(&user, &email(), SystemTime::now())
            .unwrap()
            .into_der();
        assert_eq!(
            refused(&der, &trust(&server)),
            LoginCertError::NotCertified(DOMAIN.into())
        );
    }

    #[test]
    fn a_previous_server_key_counts_until_its_end_date() {
        let current = ServerKey::generate(DOMAIN).unwrap();
        let previous = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&previous, ed25519_user(), &email());
        let der = build(&user, &email(), SystemTime::now())
            .unwrap()
            .into_der();
        let now = SystemTime::now();
        let rotating = |until: SystemTime| {
            Trust::new(DOMAIN)
                .with_key(current.public_cert().clone(), None)
                .with_key(previous.public_cert().clone(), Some(until))
        };
        let day = Duration::from_secs(86400);
        assert_eq!(
            verify(&der, &rotating(now + day), now).unwrap(),
            expected(&user)
        );
        assert_eq!(
            verify(&der, &rotating(now - Duration::from_secs(1)), now).unwrap_err(),
            LoginCertError::NotCertified(DOMAIN.into())
        );
        assert!(!rotating(now).keys()[1].trusted_at(now));
        assert!(rotating(now).keys()[0].trusted_at(now + day * 365));
        // Trust keeps public parts only.
        assert!(!rotating(now).keys()[0].cert.is_tsk());
    }

    #[test]
    fn error_codes_are_distinct() {
        let all = [
            LoginCertError::TooLarge,
            LoginCertError::Malformed(String::new()),
            LoginCertError::ExtensionMissing,
            LoginCertError::ExtensionGarbage(String::new()),
            LoginCertError::UnsupportedAlgorithm(String::new()),
            LoginCertError::KeyMismatch,
            LoginCertError::BadSignature,
            LoginCertError::KeyInvalid(String::new()),
            LoginCertError::KeyNotYetValid,
            LoginCertError::KeyExpired,
            LoginCertError::KeyRevoked,
            LoginCertError::NoUserIdOnDomain(String::new()),
            LoginCertError::NotCertified(String::new()),
        ];
        let codes: std::collections::BTreeSet<&str> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), all.len());
        for e in &all {
            assert!(!e.to_string().is_empty());
            assert!(
                e.code()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-')
            );
        }
    }

    // --- OpenSSL, an independent implementation ---------------------------------------------

    /// The openssl binary, or `None` (skip) when it is missing outside CI.
    fn openssl() -> Option<&'static str> {
        let found = Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Some("openssl");
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is required in CI (apt-get install openssl)"
        );
        eprintln!("openssl not found: skipping");
        None
    }

    fn run(openssl: &str, dir: &Path, args: &[&str]) -> String {
        let out = Command::new(openssl)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn openssl_reads_what_we_build() {
        let Some(openssl) = openssl() else { return };
        let server = ServerKey::generate(DOMAIN).unwrap();
        for (user, key_line) in [
            (ed25519_user(), "Public Key Algorithm: ED25519"),
            (rsa_user(), "Public Key Algorithm: rsaEncryption"),
        ] {
            let user = certify(&server, user, &email());
            let built = build(&user, &email(), SystemTime::now()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("cert.der"), built.der()).unwrap();
            std::fs::write(dir.path().join("cert.pem"), built.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), built.private_key_pem()).unwrap();
            let text = run(
                openssl,
                dir.path(),
                &[
                    "x509", "-inform", "DER", "-in", "cert.der", "-noout", "-text",
                ],
            );
            for needle in [
                key_line,
                "O = OpenPGP to X.509 Bridge",
                BRIDGE_EXTENSION_OID,
                &format!("othername: XmppAddr::{}", email()),
                "TLS Web Client Authentication",
                "Not After : Dec 31 23:59:59 9999 GMT",
            ] {
                assert!(text.contains(needle), "{needle:?} not in\n{text}");
            }
            // The PKCS#8 key is the certificate's key.
            let from_cert = run(
                openssl,
                dir.path(),
                &["x509", "-in", "cert.pem", "-noout", "-pubkey"],
            );
            let from_key = run(openssl, dir.path(), &["pkey", "-in", "key.pem", "-pubout"]);
            assert_eq!(from_cert, from_key);
            // OpenSSL checks the self-signature.
            let verified = run(
                openssl,
                dir.path(),
                &[
                    "verify",
                    "-check_ss_sig",
                    "-partial_chain",
                    "-CAfile",
                    "cert.pem",
                    "cert.pem",
                ],
            );
            assert!(verified.contains("cert.pem: OK"), "{verified}");
            // ... and refuses a flipped bit in it.
            let mut bad = built.der().to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 0x01;
            std::fs::write(dir.path().join("bad.pem"), pem_encode("CERTIFICATE", &bad)).unwrap();
            let refused = Command::new(openssl)
                .args(["verify", "-check_ss_sig", "-partial_chain", "-CAfile"])
                .args(["bad.pem", "bad.pem"])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(!refused.status.success());
        }
    }

    /// Wraps an RSA key from a PKCS#8 PEM into an OpenPGP certificate with one self-signed
    /// User ID, created at `created`.
    fn openpgp_from_rsa_pem(pem: &str, uid: &str, created: SystemTime) -> Cert {
        use rsa::pkcs8::DecodePrivateKey as _;
        use rsa::traits::PrivateKeyParts as _;
        let rsa = rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
        let primes = rsa.primes();
        let key: Key<SecretParts, PrimaryRole> =
            pgp::packet::key::Key4::<SecretParts, PrimaryRole>::import_secret_rsa(
                &rsa.d().to_bytes_be(),
                &primes[0].to_bytes_be(),
                &primes[1].to_bytes_be(),
                created,
            )
            .unwrap()
            .into();
        let cert = Cert::try_from(vec![Packet::from(key.clone())]).unwrap();
        let mut signer = key.into_keypair().unwrap();
        let uid = UserID::from(uid);
        let binding = uid
            .bind(
                &mut signer,
                &cert,
                SignatureBuilder::new(SignatureType::PositiveCertification)
                    .set_key_flags(KeyFlags::empty().set_certification().set_signing())
                    .unwrap(),
            )
            .unwrap();
        cert.insert_packets(vec![Packet::from(uid), binding.into()])
            .unwrap()
            .0
    }

    #[test]
    fn accepts_a_certificate_openssl_made_with_sha1() {
        let Some(openssl) = openssl() else { return };
        let dir = tempfile::tempdir().unwrap();
        run(
            openssl,
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
        );
        let pem = std::fs::read_to_string(dir.path().join("key.pem")).unwrap();
        let uid = format!("<{}>", email());
        let user = openpgp_from_rsa_pem(&pem, &uid, SystemTime::now() - Duration::from_secs(3600));
        let server = ServerKey::generate(DOMAIN).unwrap();
        let user = certify(&server, user, &email());
        let public = user.to_vec().unwrap();
        let extension = format!(
            "{BRIDGE_EXTENSION_OID}=ASN1:FORMAT:HEX,BITSTRING:{}",
            hex::encode(&public)
        );
        let san = format!(
            "subjectAltName=otherName:1.3.6.1.5.5.7.8.5;UTF8:{}",
            email()
        );
        let subject = format!("/O={BRIDGE_ORGANIZATION}/CN={uid}");
        run(
            openssl,
            dir.path(),
            &[
                "req", "-x509", "-new", "-key", "key.pem", "-sha1", "-subj", &subject, "-addext",
                &extension, "-addext", &san, "-days", "1", "-out", "cert.pem",
            ],
        );
        let cert_pem = std::fs::read(dir.path().join("cert.pem")).unwrap();
        let cert_der = decode_input(&cert_pem).unwrap();
        let (_, x509) = X509CertificateParser::new().parse(&cert_der).unwrap();
        assert_eq!(
            x509.signature_algorithm.algorithm.as_bytes(),
            oid::SHA1_WITH_RSA
        );
        let trust = trust(&server);
        assert_eq!(
            verify(&cert_pem, &trust, SystemTime::now()).unwrap(),
            expected(&user)
        );
        run(
            openssl,
            dir.path(),
            &[
                "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
            ],
        );
        let der = std::fs::read(dir.path().join("cert.der")).unwrap();
        assert_eq!(
            verify(&der, &trust, SystemTime::now()).unwrap(),
            expected(&user)
        );
    }
}
