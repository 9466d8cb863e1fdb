//! `kontalk-registrar client register`: the whole registration as a real client does it. It
//! generates a key whose User ID names the account, gets the code to the user, submits code and
//! key, checks the returned certification, and writes the certified key (binary and armored), the
//! secret key, the bridge certificate to log in with (and its private key), and on request a key
//! pack as Kontalk's Android client exports it.
//!
//! Two ways to the service:
//! - [`http`]: the JSON API (the default);
//! - [`xmpp`]: Kontalk's own flow against an XMPP server set up as a Kontalk server (Prosody with
//!   the modules in `prosody/`): STARTTLS, registration before login, step 2 on a new connection
//!   presenting the bridge certificate of the still uncertified key, then a login with SASL
//!   EXTERNAL and the certified key's certificate, as Kontalk's Android client does it.

mod http;
pub mod keypack;
pub mod xmpp;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::bail;
use sequoia_openpgp::Cert;
use zeroize::Zeroizing;

use crate::login_cert::{self, Style};
use crate::openpgp;
use crate::phone::{NumberType, PhoneNumber, PhonePolicy};

/// What to register and where.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// The phone number, as typed.
    pub phone: String,
    /// Base URL of the service's HTTP API (`http://127.0.0.1:8080`): the API itself, or over
    /// XMPP where the server key is fetched from, when given.
    pub server: Option<String>,
    /// Replace an existing account.
    pub force: bool,
    /// `pin`, `voice` or `missedcall`.
    pub challenge: Option<String>,
    /// The code, if known; otherwise it is read from the terminal.
    pub code: Option<String>,
    /// Directory for the key files.
    pub out_dir: PathBuf,
    /// Generate RSA-2048 (Kontalk's choice) instead of Ed25519.
    pub rsa: bool,
    /// Name part of the User ID.
    pub name: String,
    /// Accept the server's terms of service.
    pub accept_terms: bool,
    /// Register over XMPP instead of HTTP.
    pub xmpp: Option<xmpp::XmppOptions>,
    /// Also write a key pack.
    pub keypack: Option<KeypackOptions>,
}

/// Where to write a key pack, and the passphrase that protects its secret key and PKCS#12.
#[derive(Clone)]
pub struct KeypackOptions {
    /// The zip file to write.
    pub path: PathBuf,
    /// The export passphrase.
    pub passphrase: Zeroizing<String>,
}

impl std::fmt::Debug for KeypackOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeypackOptions")
            .field("path", &self.path)
            .field("passphrase", &"<redacted>")
            .finish()
    }
}

/// Files written by a successful registration.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The account JID.
    pub jid: String,
    /// Key fingerprint.
    pub fingerprint: String,
    /// Certified public key, binary.
    pub public_binary: PathBuf,
    /// Certified public key, armored.
    pub public_armored: PathBuf,
    /// Secret key with the certification, armored (0600).
    pub secret_armored: PathBuf,
    /// The bridge certificate to log in with (PEM).
    pub certificate: PathBuf,
    /// The certificate's private key, PKCS#8 PEM (0600).
    pub certificate_key: PathBuf,
    /// The key pack, when asked for.
    pub keypack: Option<PathBuf>,
    /// Over XMPP: the full JID the login with the new certificate was bound to.
    pub logged_in_as: Option<String>,
}

/// What a transport hands back: the account, the key with our certification merged in, and
/// (XMPP) the JID a test login was bound to.
struct Outcome {
    jid: String,
    certified: Cert,
    with_secret: Cert,
    logged_in_as: Option<String>,
}

/// The number as the client normalises it before it asks (E.164): every kind of number, since
/// the server decides which it serves.
fn e164(phone: &str) -> anyhow::Result<PhoneNumber> {
    let lenient = PhonePolicy {
        accept_fictional: true,
        allowed_types: vec![
            NumberType::FixedLine,
            NumberType::Mobile,
            NumberType::FixedLineOrMobile,
            NumberType::TollFree,
            NumberType::PremiumRate,
            NumberType::SharedCost,
            NumberType::PersonalNumber,
            NumberType::Voip,
            NumberType::Pager,
            NumberType::Uan,
            NumberType::Voicemail,
        ],
    };
    Ok(lenient.parse(phone)?)
}

fn read_code(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        bail!("no code given (standard input closed)");
    }
    Ok(line.trim().to_owned())
}

async fn generate_key(name: &str, jid: &str, rsa: bool) -> anyhow::Result<Cert> {
    let (name, email) = (name.to_owned(), jid.to_owned());
    tokio::task::spawn_blocking(move || openpgp::generate_user_key(&name, &email, rsa)).await?
}

/// Checks that `certified` is `key` with a valid certification of `jid` by `server_key`
/// (armored or binary), and merges it into the secret key.
fn accept_certified(
    key: &Cert,
    certified_bytes: &[u8],
    server_key: Option<&[u8]>,
    jid: &str,
) -> anyhow::Result<(Cert, Cert)> {
    let certified = openpgp::parse_cert(certified_bytes)
        .map_err(|e| anyhow::anyhow!("the returned key does not parse: {e}"))?;
    if certified.fingerprint() != key.fingerprint() {
        bail!("the server returned another key than ours");
    }
    if let Some(server_key) = server_key {
        let server_cert = openpgp::parse_cert(server_key)
            .map_err(|e| anyhow::anyhow!("the server key does not parse: {e}"))?;
        if !openpgp::has_certification(&certified, &server_cert, jid) {
            bail!("the returned key carries no valid certification by the server key");
        }
    }
    let with_secret = key.clone().merge_public(certified.clone())?;
    Ok((certified, with_secret))
}

/// Registers `opts.phone` over HTTP or, with `opts.xmpp`, over XMPP, and writes the files.
pub async fn register(opts: &RegisterOptions) -> anyhow::Result<Registration> {
    let outcome = match &opts.xmpp {
        None => http::register(opts).await?,
        Some(x) => xmpp::register(opts, x).await?,
    };
    let mut r = write_files(
        &opts.out_dir,
        &outcome.jid,
        &outcome.certified,
        &outcome.with_secret,
    )?;
    if let Some(pack) = &opts.keypack {
        let phone = e164(&opts.phone)?;
        keypack::write(
            &pack.path,
            &outcome.with_secret,
            &outcome.jid,
            phone.as_str(),
            &pack.passphrase,
        )?;
        r.keypack = Some(pack.path.clone());
    }
    r.logged_in_as = outcome.logged_in_as;
    Ok(r)
}

fn write_files(
    dir: &Path,
    jid: &str,
    certified: &Cert,
    with_secret: &Cert,
) -> anyhow::Result<Registration> {
    std::fs::create_dir_all(dir)?;
    let account = jid.split('@').next().unwrap_or(jid);
    let public_binary = dir.join(format!("{account}.pub.gpg"));
    let public_armored = dir.join(format!("{account}.pub.asc"));
    let secret_armored = dir.join(format!("{account}.key.asc"));
    std::fs::write(&public_binary, openpgp::public_bytes(certified)?)?;
    std::fs::write(&public_armored, openpgp::public_armored(certified)?)?;
    replace_private(&secret_armored, &openpgp::secret_armored(with_secret)?)?;
    // The X.509 certificate a Kontalk client logs in with, and its key, as TLS clients take them.
    let bridge = login_cert::build_styled(
        with_secret,
        jid,
        std::time::SystemTime::now(),
        Style::Standard,
    )?;
    let certificate = dir.join(format!("{account}.crt.pem"));
    let certificate_key = dir.join(format!("{account}.crt.key.pem"));
    std::fs::write(&certificate, bridge.pem())?;
    replace_private(&certificate_key, bridge.private_key_pem().as_bytes())?;
    Ok(Registration {
        jid: jid.to_owned(),
        fingerprint: certified.fingerprint().to_hex(),
        public_binary,
        public_armored,
        secret_armored,
        certificate,
        certificate_key,
        keypack: None,
        logged_in_as: None,
    })
}

/// Writes `bytes` to `path` readable by the owner only, replacing a file there.
fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    crate::fsutil::write_private(path, bytes)
}
