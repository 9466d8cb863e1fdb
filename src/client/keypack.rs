//! Key packs: `kontalk-keys.zip` as Kontalk's Android client exports it (`PersonalKeyExporter`)
//! and its Android and desktop clients import it (see
//! `../shared/reference/kontalk-account-management.md`):
//!
//! | entry | content |
//! |---|---|
//! | `kontalk-public.asc` | the certified public key, ASCII armor |
//! | `kontalk-private.asc` | the secret key, every part protected by the export passphrase, ASCII armor |
//! | `kontalk-login.crt` | the bridge certificate, PEM, laid out as Kontalk's `X509Bridge` writes it |
//! | `kontalk-login.key` | the certificate's private key, PEM PKCS#8 |
//! | `kontalk-login.p12` | certificate and key as PKCS#12 (PBES2 AES-256, HMAC-SHA256), protected by the passphrase |
//! | `account-info.properties` | `phoneNumber=<E.164>` |
//!
//! `kontalk-login.key` is the one secret in clear, as in Kontalk's packs (TLS stacks load it
//! as it is), so the zip is written readable by its owner only.

use std::io::Write as _;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context as _;
use sequoia_openpgp::Cert;
use sequoia_openpgp::Packet;
use sequoia_openpgp::cert::amalgamation::key::PrimaryKey as _;
use sequoia_openpgp::crypto::Password;
use sequoia_openpgp::serialize::SerializeInto;
use zeroize::Zeroizing;

use crate::login_cert::{self, Style};
use crate::openpgp;

/// The entries of a key pack, in the order they are written.
pub const ENTRIES: [&str; 6] = [
    "kontalk-public.asc",
    "kontalk-private.asc",
    "kontalk-login.crt",
    "kontalk-login.key",
    "kontalk-login.p12",
    "account-info.properties",
];

/// `cert` (with secret key material) with every secret part encrypted with `passphrase`.
pub fn protect(cert: &Cert, passphrase: &str) -> anyhow::Result<Cert> {
    let password = Password::from(passphrase);
    let mut packets: Vec<Packet> = Vec::new();
    for ka in cert.keys().secret() {
        let key = ka
            .key()
            .clone()
            .encrypt_secret(&password)
            .context("cannot encrypt the secret key")?;
        packets.push(if ka.primary() {
            key.role_into_primary().into()
        } else {
            key.role_into_subordinate().into()
        });
    }
    Ok(cert.clone().insert_packets(packets)?.0)
}

/// The PKCS#12 of the bridge certificate `cert_der` and its PKCS#8 key, under `passphrase`.
fn pkcs12(
    cert_der: &[u8],
    key_pem: &str,
    passphrase: &str,
    alias: &str,
) -> anyhow::Result<Vec<u8>> {
    let key = pem::parse(key_pem).context("the certificate key PEM")?;
    let certificate = p12_keystore::Certificate::from_der(cert_der)
        .map_err(|e| anyhow::anyhow!("the bridge certificate for PKCS#12: {e}"))?;
    let local_key_id = sha1_digest(cert_der);
    let chain = p12_keystore::PrivateKeyChain::new(key.contents(), local_key_id, [certificate]);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(alias, p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    store
        .writer(passphrase)
        .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha256)
        .write()
        .map_err(|e| anyhow::anyhow!("cannot write the PKCS#12: {e}"))
}

fn sha1_digest(bytes: &[u8]) -> Vec<u8> {
    use sha1::Digest as _;
    sha1::Sha1::digest(bytes).to_vec()
}

/// Writes the key pack of `with_secret` (the secret key with our certification merged in) for
/// the account `jid` of `phone` (E.164) to `path` (0600), protected by `passphrase`.
pub fn write(
    path: &Path,
    with_secret: &Cert,
    jid: &str,
    phone: &str,
    passphrase: &str,
) -> anyhow::Result<()> {
    if passphrase.is_empty() {
        anyhow::bail!("the key pack needs a passphrase");
    }
    let public = openpgp::public_armored(with_secret)?;
    let private = Zeroizing::new(
        protect(with_secret, passphrase)?
            .as_tsk()
            .armored()
            .to_vec()?,
    );
    let bridge = login_cert::build_styled(with_secret, jid, SystemTime::now(), Style::Kontalk)?;
    let p12 = pkcs12(
        bridge.der(),
        bridge.private_key_pem(),
        passphrase,
        "kontalk",
    )?;
    let properties = format!("phoneNumber={phone}\n");
    let certificate = bridge.pem();
    let contents: [(&str, &[u8]); 6] = [
        (ENTRIES[0], &public),
        (ENTRIES[1], &private),
        (ENTRIES[2], certificate.as_bytes()),
        (ENTRIES[3], bridge.private_key_pem().as_bytes()),
        (ENTRIES[4], &p12),
        (ENTRIES[5], properties.as_bytes()),
    ];
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o600);
    for (name, bytes) in contents {
        zip.start_file(name, options)?;
        zip.write_all(bytes)?;
    }
    let bytes = Zeroizing::new(zip.finish()?.into_inner());
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    crate::fsutil::write_private(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
