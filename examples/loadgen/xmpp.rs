//! Registrations over XMPP, on a client stream as a phone opens it: TCP, STARTTLS when offered
//! (any server certificate accepted: these are test servers), the stream restarted over TLS, one
//! or two iqs, the stream closed. Two flows:
//!
//! - [`kontalk`]: Kontalk's, against Prosody with the modules in `prosody/` relaying to the
//!   service, one connection per step as Kontalk's Android client does it (and as
//!   `kontalk-registrar client register --xmpp` does, `src/client/xmpp.rs`, whose connection
//!   code this follows; it is private to the library): the registration form, the number, then
//!   the code on a connection that presents the bridge certificate of the key made beforehand
//!   (the key of step 2, as Kontalk sends it), and optionally a login with the certified key
//!   (SASL EXTERNAL and resource binding).
//! - [`prosody_ibr`]: Prosody's own XEP-0077 registration (`mod_register_ibr`) with a username
//!   and a password on one connection: the form, then the account.
//!
//! Every TLS handshake is a full one (no session resumption): each simulated client is another
//! phone.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use kontalk_registrar::login_cert::{self, BridgeCertificate, Style};
use kontalk_registrar::openpgp;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sequoia_openpgp::Cert;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::connect::AsyncReadAndWrite;
use tokio_xmpp::xmlstream::{self, ReadError, StreamHeader, Timeouts, XmlStream};
use xmpp_parsers::minidom::Element;
use xmpp_parsers::minidom::rxml::xml_ncname;

use crate::outbox::Codes;
use crate::report::{Recorder, WHOLE};

const CLIENT_NS: &str = "jabber:client";
const TLS_NS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const SASL_NS: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const BIND_NS: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const REGISTER_NS: &str = "jabber:iq:register";
const DATA_NS: &str = "jabber:x:data";
const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const CODE_FORM_TYPE: &str = "http://kontalk.org/protocol/register#code";

/// How long one answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The server's client port and its XMPP domain.
pub struct Target {
    pub address: String,
    pub domain: String,
    /// STARTTLS when the server offers it (when it does not, the stream stays plain).
    pub starttls: bool,
}

impl Target {
    /// Waits until the server accepts connections (it may still be starting).
    pub async fn wait_listening(&self) {
        for tries in 0.. {
            match TcpStream::connect(&self.address).await {
                Ok(_) => return,
                Err(e) if tries == 100 => {
                    panic!("{} does not accept connections: {e}", self.address)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
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
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration, presenting `client` when given; no session resumption.
pub fn tls(client: Option<&BridgeCertificate>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder.with_client_auth_cert(
            vec![CertificateDer::from(c.der().to_vec())],
            PrivateKeyDer::from_pem_slice(c.private_key_pem().as_bytes())?,
        )?,
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The bridge certificate of `key` for `jid`, as Kontalk's client writes it.
pub fn bridge(key: &Cert, jid: &str) -> anyhow::Result<BridgeCertificate> {
    Ok(login_cert::build_styled(
        key,
        jid,
        std::time::SystemTime::now(),
        Style::Kontalk,
    )?)
}

type Stream = XmlStream<Box<dyn AsyncReadAndWrite + Send>, Element>;

/// One client stream, after STARTTLS if the server offered it.
struct Connection {
    stream: Stream,
    domain: String,
    next_id: u32,
}

fn header(domain: &str) -> StreamHeader<'static> {
    StreamHeader {
        from: None,
        to: Some(Cow::Owned(domain.to_owned())),
        id: None,
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        read_timeout: ANSWER_TIMEOUT,
        response_timeout: Duration::from_secs(15),
    }
}

/// The next element of the stream, skipping soft timeouts until [`ANSWER_TIMEOUT`].
async fn next<Io: tokio::io::AsyncBufRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut XmlStream<Io, Element>,
) -> Result<Element, String> {
    let read = async {
        loop {
            match stream.next().await {
                Some(Ok(e)) => return Ok(e),
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Err(ReadError::ParseError(_))) => continue,
                Some(Err(e)) => return Err(format!("stream closed: {e}")),
                None => return Err("stream closed".to_owned()),
            }
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, read)
        .await
        .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))?
}

impl Connection {
    /// Connects, starts TLS with `tls` when offered (and [`Target::starttls`]), and opens the
    /// stream; `register`: the server must offer in-band registration.
    async fn open(
        t: &Target,
        tls: &Arc<rustls::ClientConfig>,
        register: bool,
    ) -> Result<Self, String> {
        let e = |e: std::io::Error| format!("connect: {e}");
        let tcp = TcpStream::connect(&t.address).await.map_err(e)?;
        let _ = tcp.set_nodelay(true);
        let pending = xmlstream::initiate_stream(
            BufStream::new(tcp),
            CLIENT_NS,
            header(&t.domain),
            timeouts(),
        )
        .await
        .map_err(e)?;
        let (features, mut stream) = pending
            .recv_features::<Element>()
            .await
            .map_err(|e| format!("stream features: {e}"))?;
        let (features, stream) = if t.starttls && features.starttls.is_some() {
            let starttls = Element::builder("starttls", TLS_NS).build();
            stream.send(&starttls).await.map_err(e)?;
            if !next(&mut stream).await?.is("proceed", TLS_NS) {
                return Err("STARTTLS refused".to_owned());
            }
            let tcp = stream.into_inner().into_inner();
            let name = ServerName::try_from(t.domain.clone())
                .map_err(|_| format!("{:?} is not a server name", t.domain))?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let io: Box<dyn AsyncReadAndWrite + Send> = Box::new(BufStream::new(tls));
            xmlstream::initiate_stream(io, CLIENT_NS, header(&t.domain), timeouts())
                .await
                .map_err(e)?
                .recv_features::<Element>()
                .await
                .map_err(|e| format!("stream features after TLS: {e}"))?
        } else {
            (features, stream.box_stream())
        };
        if register && !features.in_band_registration {
            return Err("no in-band registration offered".to_owned());
        }
        Ok(Self {
            stream,
            domain: t.domain.clone(),
            next_id: 0,
        })
    }

    /// Sends an iq of `type_` with `payload` to the server; its answer.
    async fn iq(&mut self, type_: &str, payload: Element) -> Result<Element, String> {
        self.next_id += 1;
        let id = format!("lg-{}", self.next_id);
        let iq = Element::builder("iq", CLIENT_NS)
            .attr(xml_ncname!("type").into(), type_)
            .attr(xml_ncname!("id").into(), id.as_str())
            .attr(xml_ncname!("to").into(), self.domain.as_str())
            .append(payload)
            .build();
        self.stream
            .send(&iq)
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            let e = next(&mut self.stream).await?;
            if e.is("iq", CLIENT_NS) && e.attr("id") == Some(id.as_str()) {
                return Ok(e);
            }
        }
    }

    /// `iq`, and the answer unless it is an error (then the error's condition, after `step`).
    async fn iq_ok(
        &mut self,
        step: &str,
        type_: &str,
        payload: Element,
    ) -> Result<Element, String> {
        let answer = self
            .iq(type_, payload)
            .await
            .map_err(|e| format!("{step}: {e}"))?;
        if answer.attr("type") == Some("result") {
            Ok(answer)
        } else {
            Err(format!("{step}: {}", condition(&answer)))
        }
    }

    /// SASL EXTERNAL with the certificate presented at TLS (initial response `=`, as Smack
    /// sends it), then resource binding.
    async fn login(mut self) -> Result<Self, String> {
        let auth = Element::builder("auth", SASL_NS)
            .attr(xml_ncname!("mechanism").into(), "EXTERNAL")
            .append("=")
            .build();
        let e = |e: std::io::Error| format!("login: {e}");
        self.stream.send(&auth).await.map_err(e)?;
        let answer = next(&mut self.stream).await?;
        if !answer.is("success", SASL_NS) {
            let reason = answer.children().next().map_or("no reason", |c| c.name());
            return Err(format!("login: {reason}"));
        }
        let (features, stream) = self
            .stream
            .initiate_reset()
            .send_header(header(&self.domain))
            .await
            .map_err(e)?
            .recv_features::<Element>()
            .await
            .map_err(|e| format!("login: {e}"))?;
        self.stream = stream;
        if features.bind.is_none() {
            return Err("login: no resource binding".to_owned());
        }
        let bind = Element::builder("bind", BIND_NS)
            .append(Element::builder("resource", BIND_NS).append("load").build())
            .build();
        self.iq_ok("bind", "set", bind).await?;
        Ok(self)
    }

    async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// The condition of an error iq (`conflict`, `not-allowed`, ...), with its type.
fn condition(iq: &Element) -> String {
    let error = iq.get_child("error", CLIENT_NS);
    let condition = error
        .and_then(|e| {
            e.children()
                .find(|c| c.ns() == STANZAS_NS && c.name() != "text")
        })
        .map_or("undefined-condition", |c| c.name());
    let type_ = error.and_then(|e| e.attr("type")).unwrap_or("?");
    format!("{condition} ({type_})")
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

/// A submitted `jabber:iq:register` query with a data form of `form_type` and `fields`, as
/// Kontalk's client writes it.
fn submit(form_type: &str, fields: &[(&str, &str)]) -> Element {
    let field = |var: &str, value: &str, hidden: bool| {
        let mut f = Element::builder("field", DATA_NS);
        if hidden {
            f = f.attr(xml_ncname!("type").into(), "hidden");
        }
        f.attr(xml_ncname!("var").into(), var)
            .append(Element::builder("value", DATA_NS).append(value).build())
            .build()
    };
    let mut x = Element::builder("x", DATA_NS)
        .attr(xml_ncname!("type").into(), "submit")
        .append(field("FORM_TYPE", form_type, true));
    for (var, value) in fields {
        x = x.append(field(var, value, false));
    }
    Element::builder("query", REGISTER_NS)
        .append(x.build())
        .build()
}

fn empty_query() -> Element {
    Element::builder("query", REGISTER_NS).build()
}

/// What one Kontalk registration needs, made before the run.
pub struct KontalkClient {
    pub phone: String,
    pub jid: String,
    /// The user's key with its secret part (for the login after the registration).
    pub key: Cert,
    /// TLS presenting the bridge certificate of the uncertified key.
    pub tls: Arc<rustls::ClientConfig>,
}

impl KontalkClient {
    /// A key for `jid` and the TLS configuration that presents its bridge certificate.
    pub fn new(phone: String, jid: String) -> anyhow::Result<Self> {
        let key = openpgp::generate_user_key("Load", &jid, false)?;
        let tls = tls(Some(&bridge(&key, &jid)?))?;
        Ok(Self {
            phone,
            jid,
            key,
            tls,
        })
    }
}

/// One Kontalk registration through Prosody; with `login`, also a login with the certified key.
pub async fn kontalk(
    t: &Target,
    plain: &Arc<rustls::ClientConfig>,
    codes: &Codes,
    client: &KontalkClient,
    login: bool,
    rec: Recorder<'_>,
) {
    if let Err(e) = kontalk_steps(t, plain, codes, client, login, &rec).await {
        rec.error(e);
    }
}

async fn kontalk_steps(
    t: &Target,
    plain: &Arc<rustls::ClientConfig>,
    codes: &Codes,
    client: &KontalkClient,
    login: bool,
    rec: &Recorder<'_>,
) -> Result<(), String> {
    let t0 = Instant::now();
    let open = |tls, register| async move {
        let at = Instant::now();
        let c = Connection::open(t, tls, register).await?;
        rec.step("connect", at.elapsed());
        Ok::<_, String>(c)
    };
    // 1. The registration form, before login (the client gives up unless it is a result).
    let mut c = open(plain, true).await?;
    let at = Instant::now();
    c.iq_ok("form", "get", empty_query()).await?;
    rec.step("form", at.elapsed());
    c.close().await;
    // 2. The number.
    let mut c = open(plain, true).await?;
    let at = Instant::now();
    let form = submit(REGISTER_NS, &[("phone", &client.phone)]);
    c.iq_ok("start", "set", form).await?;
    rec.step("start", at.elapsed());
    c.close().await;
    // 3. The code, on a connection presenting the uncertified key's bridge certificate.
    let code = codes.wait(&client.phone).await?;
    let mut c = open(&client.tls, false).await?;
    let at = Instant::now();
    let form = submit(CODE_FORM_TYPE, &[("code", &code)]);
    let answer = c.iq_ok("verify", "set", form).await?;
    rec.step("verify", at.elapsed());
    c.close().await;
    let certified = answer
        .get_child("query", REGISTER_NS)
        .and_then(|q| field(q, "publickey"))
        .and_then(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.trim())
                .ok()
        })
        .ok_or("verify: no publickey in the answer")?;
    if login {
        // 4. The login with the certified key, as the client does from now on.
        let certified = openpgp::parse_cert(&certified).map_err(|e| format!("the key: {e}"))?;
        let merged = client
            .key
            .clone()
            .merge_public(certified)
            .map_err(|e| format!("the key: {e}"))?;
        let tls = bridge(&merged, &client.jid)
            .and_then(|b| tls(Some(&b)))
            .map_err(|e| format!("the certificate: {e}"))?;
        let c = open(&tls, false).await?;
        let at = Instant::now();
        let c = c.login().await?;
        rec.step("login", at.elapsed());
        c.close().await;
    }
    rec.step(WHOLE, t0.elapsed());
    Ok(())
}

/// One registration with Prosody's own XEP-0077: the form, then `username` and `password`.
pub async fn prosody_ibr(
    t: &Target,
    plain: &Arc<rustls::ClientConfig>,
    username: &str,
    password: &str,
    rec: Recorder<'_>,
) {
    let steps = async {
        let t0 = Instant::now();
        let mut c = Connection::open(t, plain, true).await?;
        rec.step("connect", t0.elapsed());
        let at = Instant::now();
        c.iq_ok("form", "get", empty_query()).await?;
        rec.step("form", at.elapsed());
        let at = Instant::now();
        let account = Element::builder("query", REGISTER_NS)
            .append(
                Element::builder("username", REGISTER_NS)
                    .append(username)
                    .build(),
            )
            .append(
                Element::builder("password", REGISTER_NS)
                    .append(password)
                    .build(),
            )
            .build();
        c.iq_ok("register", "set", account).await?;
        rec.step("register", at.elapsed());
        c.close().await;
        rec.step(WHOLE, t0.elapsed());
        Ok::<_, String>(())
    };
    if let Err(e) = steps.await {
        rec.error(e);
    }
}
