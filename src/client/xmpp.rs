//! The registration as Kontalk's Android client does it (`RegistrationService`:
//! `onVerificationRequest`, `requestRegistration`, `onChallengeRequest`), against an XMPP server
//! set up as a Kontalk server (Prosody with the modules in `prosody/`), one connection per step:
//!
//! 1. STARTTLS, then before login an empty `iq get` on `jabber:iq:register` (the client gives up
//!    unless it is a result; it holds the terms to accept, if any);
//! 2. a new connection: `iq set` with the phone number (`force` = `true` to replace a key);
//! 3. a new connection presenting the bridge certificate of the still uncertified key as TLS
//!    client certificate, and an `iq set` with only the code; the answer's `publickey` is the
//!    key with the server's certification;
//! 4. a new connection with the certified key's bridge certificate: SASL EXTERNAL (initial
//!    response `=`, as Smack sends it) and resource binding, which proves the login works.
//!
//! The XML stream is tokio-xmpp's ([`tokio_xmpp::xmlstream`]) over rustls; the bridge
//! certificates are written exactly as Kontalk's `X509Bridge` writes them. rustls hands the
//! client certificate to the server as bytes, so the certificate's non-standard encoding is no
//! obstacle on this side (it is for OpenSSL-based clients).

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sequoia_openpgp::Cert;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::xmlstream::{self, ReadError, StreamHeader, Timeouts, XmlStream};
use xmpp_parsers::minidom::Element;

use super::{Outcome, RegisterOptions, accept_certified, e164, generate_key, read_code};
use crate::login_cert::{self, BridgeCertificate, Style};
use crate::phone::AccountId;

const CLIENT_NS: &str = "jabber:client";
const TLS_NS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const SASL_NS: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const BIND_NS: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const REGISTER_NS: &str = "jabber:iq:register";
const DATA_NS: &str = "jabber:x:data";
const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const CODE_FORM_TYPE: &str = "http://kontalk.org/protocol/register#code";

/// How long one answer may take (a start waits for the SMS provider).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the XMPP server is and how its certificate is checked.
#[derive(Debug, Clone)]
pub struct XmppOptions {
    /// `HOST:PORT` of the server's client port (STARTTLS).
    pub address: String,
    /// The XMPP domain of the accounts; the host of `address` when `None`.
    pub domain: Option<String>,
    /// PEM certificates trusted for the server's TLS certificate, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate (development servers with self-signed certificates).
    pub insecure: bool,
}

impl XmppOptions {
    fn domain(&self) -> String {
        self.domain.clone().unwrap_or_else(|| {
            self.address
                .rsplit_once(':')
                .map_or(self.address.as_str(), |(host, _)| host)
                .trim_matches(['[', ']'])
                .to_owned()
        })
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// One XML stream to the server, after STARTTLS.
struct Connection {
    stream: XmlStream<BufStream<Tls>, Element>,
    domain: String,
    next_id: u32,
}

/// A stanza error as the server sent it.
#[derive(Debug)]
struct StanzaError {
    type_: String,
    condition: String,
    text: String,
}

impl std::fmt::Display for StanzaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.condition, self.type_)?;
        if !self.text.is_empty() {
            write!(f, ": {}", self.text)?;
        }
        Ok(())
    }
}

fn stanza_error(iq: &Element) -> StanzaError {
    let error = iq.get_child("error", CLIENT_NS);
    let condition = error
        .and_then(|e| {
            e.children()
                .find(|c| c.ns() == STANZAS_NS && c.name() != "text")
        })
        .map_or_else(|| "undefined-condition".to_owned(), |c| c.name().to_owned());
    StanzaError {
        type_: error.and_then(|e| e.attr("type")).unwrap_or("").to_owned(),
        condition,
        text: error
            .and_then(|e| e.get_child("text", STANZAS_NS))
            .map(|t| t.text())
            .unwrap_or_default(),
    }
}

/// The first value of field `var` in the data form of `query`.
fn field(query: &Element, var: &str) -> Option<String> {
    query
        .get_child("x", DATA_NS)?
        .children()
        .find(|f| f.attr("var") == Some(var))?
        .get_child("value", DATA_NS)
        .map(|v| v.text())
}

/// A submitted `jabber:iq:register` query with a data form of `form_type` and `fields`.
fn submit(form_type: &str, fields: &[(&str, &str)]) -> Element {
    let field = |var: &str, value: &str| {
        Element::builder("field", DATA_NS)
            .attr(xmpp_parsers::minidom::rxml::xml_ncname!("var").into(), var)
            .append(Element::builder("value", DATA_NS).append(value).build())
            .build()
    };
    let mut x = Element::builder("x", DATA_NS)
        .attr(
            xmpp_parsers::minidom::rxml::xml_ncname!("type").into(),
            "submit",
        )
        .append(
            Element::builder("field", DATA_NS)
                .attr(
                    xmpp_parsers::minidom::rxml::xml_ncname!("var").into(),
                    "FORM_TYPE",
                )
                .attr(
                    xmpp_parsers::minidom::rxml::xml_ncname!("type").into(),
                    "hidden",
                )
                .append(Element::builder("value", DATA_NS).append(form_type).build())
                .build(),
        );
    for (var, value) in fields {
        x = x.append(field(var, value));
    }
    Element::builder("query", REGISTER_NS)
        .append(x.build())
        .build()
}

fn timeouts() -> Timeouts {
    Timeouts {
        read_timeout: ANSWER_TIMEOUT,
        response_timeout: Duration::from_secs(15),
    }
}

fn header(domain: &str) -> StreamHeader<'static> {
    StreamHeader {
        from: None,
        to: Some(Cow::Owned(domain.to_owned())),
        id: None,
    }
}

/// Accepts any server certificate; the handshake signatures are still checked.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(
    o: &XmppOptions,
    client: Option<&BridgeCertificate>,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if o.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &o.ca_file {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                {
                    roots.add(cert.with_context(|| format!("{}", path.display()))?)?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    Ok(match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder.with_client_auth_cert(
            vec![CertificateDer::from(c.der().to_vec())],
            PrivateKeyDer::from_pem_slice(c.private_key_pem().as_bytes())
                .context("the certificate's private key")?,
        )?,
    })
}

impl Connection {
    /// Connects, starts TLS (presenting `client` when given) and opens the stream.
    async fn open(o: &XmppOptions, client: Option<&BridgeCertificate>) -> anyhow::Result<Self> {
        let domain = o.domain();
        let tcp = tokio::time::timeout(Duration::from_secs(15), TcpStream::connect(&o.address))
            .await
            .map_err(|_| anyhow!("{}: no connection within 15 s", o.address))?
            .with_context(|| format!("cannot connect to {}", o.address))?;
        let pending =
            xmlstream::initiate_stream(BufStream::new(tcp), CLIENT_NS, header(&domain), timeouts())
                .await?;
        let (features, mut stream) = pending
            .recv_features::<Element>()
            .await
            .map_err(|e| anyhow!("{}: {e}", o.address))?;
        if features.starttls.is_none() {
            bail!("{} does not offer STARTTLS", o.address);
        }
        stream
            .send(&Element::builder("starttls", TLS_NS).build())
            .await?;
        let answer = next(&mut stream).await?;
        if !answer.is("proceed", TLS_NS) {
            bail!("the server refused STARTTLS");
        }
        let tcp = stream.into_inner().into_inner();
        let config = tls_config(o, client)?;
        let name = ServerName::try_from(domain.clone())
            .map_err(|_| anyhow!("{domain:?} is not a server name"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {} failed", o.address))?;
        let pending =
            xmlstream::initiate_stream(BufStream::new(tls), CLIENT_NS, header(&domain), timeouts())
                .await?;
        let (features, stream) = pending
            .recv_features::<Element>()
            .await
            .map_err(|e| anyhow!("{}: {e}", o.address))?;
        if client.is_none() && !features.in_band_registration {
            bail!(
                "{} does not offer in-band registration after TLS: is mod_kontalk_register loaded?",
                o.address
            );
        }
        Ok(Self {
            stream,
            domain,
            next_id: 0,
        })
    }

    /// Sends an iq of `type_` with `payload` to the server and waits for its answer.
    async fn iq(&mut self, type_: &str, payload: Element) -> anyhow::Result<Element> {
        use xmpp_parsers::minidom::rxml::xml_ncname;
        self.next_id += 1;
        let id = format!("kr-{}", self.next_id);
        let iq = Element::builder("iq", CLIENT_NS)
            .attr(xml_ncname!("type").into(), type_)
            .attr(xml_ncname!("id").into(), id.as_str())
            .attr(xml_ncname!("to").into(), self.domain.as_str())
            .append(payload)
            .build();
        self.stream.send(&iq).await?;
        loop {
            let e = next(&mut self.stream).await?;
            if e.is("iq", CLIENT_NS) && e.attr("id") == Some(id.as_str()) {
                return Ok(e);
            }
        }
    }

    /// SASL EXTERNAL with the certificate presented at TLS, then resource binding; the JID
    /// bound.
    async fn login(mut self) -> anyhow::Result<(Self, String)> {
        use xmpp_parsers::minidom::rxml::xml_ncname;
        let auth = Element::builder("auth", SASL_NS)
            .attr(xml_ncname!("mechanism").into(), "EXTERNAL")
            .append("=")
            .build();
        self.stream.send(&auth).await?;
        let answer = next(&mut self.stream).await?;
        if !answer.is("success", SASL_NS) {
            let reason = answer
                .children()
                .next()
                .map_or("no reason", |c| c.name())
                .to_owned();
            bail!("the server refused the login: {reason}");
        }
        let pending = self
            .stream
            .initiate_reset()
            .send_header(header(&self.domain))
            .await?;
        let (features, stream) = pending
            .recv_features::<Element>()
            .await
            .map_err(|e| anyhow!("after login: {e}"))?;
        if features.bind.is_none() {
            bail!("the server offers no resource binding after login");
        }
        self.stream = stream;
        let bind = Element::builder("bind", BIND_NS)
            .append(
                Element::builder("resource", BIND_NS)
                    .append("kontalk-registrar")
                    .build(),
            )
            .build();
        let answer = self.iq("set", bind).await?;
        if answer.attr("type") != Some("result") {
            bail!("resource binding failed: {}", stanza_error(&answer));
        }
        let jid = answer
            .get_child("bind", BIND_NS)
            .and_then(|b| b.get_child("jid", BIND_NS))
            .map(|j| j.text())
            .ok_or_else(|| anyhow!("the bind answer names no JID"))?;
        Ok((self, jid))
    }

    async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// The next element of the stream, skipping soft timeouts until [`ANSWER_TIMEOUT`].
async fn next<Io: tokio::io::AsyncBufRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut XmlStream<Io, Element>,
) -> anyhow::Result<Element> {
    let read = async {
        loop {
            match stream.next().await {
                Some(Ok(e)) => return Ok(e),
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Err(ReadError::ParseError(e))) => {
                    tracing::debug!(error = %e, "skipping an element that does not parse")
                }
                Some(Err(e)) => bail!("the server closed the stream: {e}"),
                None => bail!("the server closed the stream"),
            }
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, read)
        .await
        .map_err(|_| anyhow!("no answer within {ANSWER_TIMEOUT:?}"))?
}

/// The registration over XMPP; see the module documentation for the steps.
pub(super) async fn register(opts: &RegisterOptions, o: &XmppOptions) -> anyhow::Result<Outcome> {
    let phone = e164(&opts.phone)?;
    let domain = o.domain();
    let jid = AccountId::for_number(&phone).jid(&domain);

    // 1. The registration form, before login (Android's createInstructionsForm).
    let mut c = Connection::open(o, None).await?;
    let form = c
        .iq("get", Element::builder("query", REGISTER_NS).build())
        .await?;
    c.close().await;
    if form.attr("type") != Some("result") {
        bail!(
            "the server does not offer Kontalk registration: {}",
            stanza_error(&form)
        );
    }
    let query = form.get_child("query", REGISTER_NS);
    if let Some(terms) = query.and_then(|q| field(q, "terms"))
        && !opts.accept_terms
    {
        bail!(
            "the server asks to accept its terms of service ({terms}): run again with --accept-terms"
        );
    }

    // 2. The number (Android's createRegistrationForm).
    let mut fields = vec![("phone", phone.as_str())];
    if opts.force {
        fields.push(("force", "true"));
    }
    if opts.accept_terms {
        fields.push(("accept-terms", "true"));
    }
    if let Some(ch) = &opts.challenge {
        fields.push(("challenge", ch));
    }
    let mut c = Connection::open(o, None).await?;
    let started = c.iq("set", submit(REGISTER_NS, &fields)).await?;
    c.close().await;
    if started.attr("type") != Some("result") {
        let e = stanza_error(&started);
        if e.condition == "conflict" {
            bail!("this number already has an account; run again with --force to replace its key");
        }
        bail!("cannot start: {e}");
    }
    if let Some(q) = started.get_child("query", REGISTER_NS) {
        let instructions = q
            .get_child("instructions", REGISTER_NS)
            .map(|i| i.text())
            .unwrap_or_default();
        eprintln!(
            "{instructions} (sender: {})",
            field(q, "from").unwrap_or_default()
        );
    }

    // 3. The code, on a new connection with the bridge certificate of the uncertified key
    // (Android's onChallengeRequest).
    let key = generate_key(&opts.name, &jid, opts.rsa).await?;
    let uncertified = bridge(&key, &jid)?;
    let mut code = match &opts.code {
        Some(c) => c.clone(),
        None => read_code("Verification code: ")?,
    };
    let answer = loop {
        let mut c = Connection::open(o, Some(&uncertified)).await?;
        let answer = c
            .iq("set", submit(CODE_FORM_TYPE, &[("code", &code)]))
            .await?;
        c.close().await;
        if answer.attr("type") == Some("result") {
            break answer;
        }
        let e = stanza_error(&answer);
        if opts.code.is_none() && e.condition == "bad-request" && e.text.contains("wrong code") {
            code = read_code(&format!("{}. Verification code: ", e.text))?;
            continue;
        }
        bail!("verification failed: {e}");
    };
    let certified_b64 = answer
        .get_child("query", REGISTER_NS)
        .and_then(|q| field(q, "publickey"))
        .ok_or_else(|| anyhow!("the server answered without the signed public key"))?;
    let certified_bytes = base64::engine::general_purpose::STANDARD
        .decode(certified_b64.trim())
        .context("the server returned a key that is not base64")?;
    let server_key = match &opts.server {
        Some(base) => Some(super::http::server_key(&super::http::http_client()?, base).await?),
        None => None,
    };
    let (certified, with_secret) =
        accept_certified(&key, &certified_bytes, server_key.as_deref(), &jid)?;

    // 4. Log in with the certified key, as the client does from now on.
    let login = bridge(&with_secret, &jid)?;
    let c = Connection::open(o, Some(&login)).await?;
    let (c, bound) = c.login().await?;
    c.close().await;
    if bound.split('/').next() != Some(jid.as_str()) {
        bail!("the login was bound to {bound}, not to {jid}");
    }
    Ok(Outcome {
        jid,
        certified,
        with_secret,
        logged_in_as: Some(bound),
    })
}

fn bridge(key: &Cert, jid: &str) -> anyhow::Result<BridgeCertificate> {
    Ok(login_cert::build_styled(
        key,
        jid,
        std::time::SystemTime::now(),
        Style::Kontalk,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_defaults_to_the_host() {
        let o = |address: &str| XmppOptions {
            address: address.into(),
            domain: None,
            ca_file: None,
            insecure: false,
        };
        assert_eq!(o("localhost:5222").domain(), "localhost");
        assert_eq!(o("xmpp.example.org:5222").domain(), "xmpp.example.org");
        assert_eq!(o("[::1]:5222").domain(), "::1");
        let named = XmppOptions {
            domain: Some("example.org".into()),
            ..o("127.0.0.1:5222")
        };
        assert_eq!(named.domain(), "example.org");
    }

    #[test]
    fn forms_are_written_as_kontalk_clients_write_them() {
        let q = submit(REGISTER_NS, &[("phone", "+15555215554"), ("force", "true")]);
        assert_eq!(
            String::from(&q),
            "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field type='hidden' var='FORM_TYPE'><value>jabber:iq:register</value></field>\
             <field var='phone'><value>+15555215554</value></field>\
             <field var='force'><value>true</value></field></x></query>"
        );
        assert_eq!(field(&q, "force").as_deref(), Some("true"));
        assert_eq!(field(&q, "nothing"), None);
    }

    #[test]
    fn stanza_errors_read_condition_type_and_text() {
        let iq: Element = "<iq xmlns='jabber:client' type='error' id='1'><error type='modify'>\
             <conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>Another user is registered with the same id.</text>\
             </error></iq>"
            .parse()
            .unwrap();
        let e = stanza_error(&iq);
        assert_eq!(e.condition, "conflict");
        assert_eq!(e.type_, "modify");
        assert_eq!(
            e.to_string(),
            "conflict (modify): Another user is registered with the same id."
        );
    }
}
