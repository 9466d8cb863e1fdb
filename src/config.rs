//! Configuration: one TOML file, overlaid by `REGISTRAR_*` environment variables (sections split
//! by `__`, so `REGISTRAR_HTTP__LISTEN` sets `http.listen`), overlaid by command-line flags.
//! Unknown keys and bad values are refused at start with a message naming the key. The result is
//! a validated [`Config`] with no loose options; every key is documented in
//! `registrar.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use ipnet::IpNet;

use crate::http::serve::Bounds;
use crate::phone::{NumberType, PhonePolicy};
use crate::registrar::abuse::{AbuseSettings, Caps, Cost, Limits, Lists, Pumping, Rate};
use crate::registrar::{CODE_LENGTHS, Challenge, DispatchSettings, Route, Settings, Templates};
use crate::secret::ServerSecret;

/// Environment variables with this prefix overlay the file.
pub const ENV_PREFIX: &str = "REGISTRAR_";

pub use registrar_providers::Secret;

/// Development (embedded defaults allowed) or production (everything explicit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Generated key and secret, development provider, fictional numbers.
    #[default]
    Development,
    /// Shared key and secret must be configured; no development provider.
    Production,
}

/// The configuration file as written (every section optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `development` or `production`.
    pub mode: Mode,
    /// Where the database, generated key and secret, and the development outbox live.
    pub data_dir: PathBuf,
    /// `[server]`.
    pub server: ServerSection,
    /// `[http]`.
    pub http: HttpSection,
    /// `[database]`.
    pub database: DatabaseSection,
    /// `[registration]`.
    pub registration: RegistrationSection,
    /// `[verification]`.
    pub verification: VerificationSection,
    /// `[phone]`.
    pub phone: PhoneSection,
    /// `[[providers]]`, tried in order.
    pub providers: Vec<ProviderConfig>,
    /// `[[routes]]`: which providers serve which numbers.
    pub routes: Vec<RouteConfig>,
    /// `[delivery]`: timeouts and circuit breakers of provider calls.
    pub delivery: DeliverySection,
    /// `[templates.<challenge>]`: message texts per language.
    pub templates:
        std::collections::BTreeMap<Challenge, std::collections::BTreeMap<String, String>>,
    /// `[xmpp]`.
    pub xmpp: XmppSection,
    /// `[abuse]`: rate limits, lists, pumping defence, caps, costs, test numbers.
    pub abuse: AbuseSection,
    /// `[login]`: who may ask the HTTP API to check login certificates.
    pub login: LoginSection,
    /// `[accounts]`: requests that registered accounts sign (key rollover, removal).
    pub accounts: AccountsSection,
    /// `[events]`: telling the XMPP server that a key was replaced or an account removed.
    pub events: EventsSection,
    /// `[log]`.
    pub log: LogSection,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Development,
            data_dir: PathBuf::from("./data"),
            server: ServerSection::default(),
            http: HttpSection::default(),
            database: DatabaseSection::default(),
            registration: RegistrationSection::default(),
            verification: VerificationSection::default(),
            phone: PhoneSection::default(),
            providers: Vec::new(),
            routes: Vec::new(),
            delivery: DeliverySection::default(),
            templates: Default::default(),
            xmpp: XmppSection::default(),
            abuse: AbuseSection::default(),
            login: LoginSection::default(),
            accounts: AccountsSection::default(),
            events: EventsSection::default(),
            log: LogSection::default(),
        }
    }
}

/// `[server]`: identity and secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// XMPP domain of the accounts.
    pub domain: String,
    /// Secret server key (OpenPGP, armored).
    pub key_file: Option<PathBuf>,
    /// File holding the server secret.
    pub secret_file: Option<PathBuf>,
    /// The server secret itself (prefer `REGISTRAR_SERVER__SECRET` to writing it in a file).
    pub secret: Option<Secret>,
    /// Allow an RSA server key in production.
    pub allow_rsa_key: bool,
    /// `[[server.previous_keys]]`: keys that were current before a rotation; their
    /// certifications still log in until `until`.
    pub previous_keys: Vec<PreviousKeyConfig>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            domain: "localhost".into(),
            key_file: None,
            secret_file: None,
            secret: None,
            allow_rsa_key: false,
            previous_keys: Vec::new(),
        }
    }
}

/// One `[[server.previous_keys]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousKeyConfig {
    /// The previous key (public or secret, armored or binary; only the public part is used).
    pub key_file: PathBuf,
    /// When its certifications stop counting (RFC 3339, e.g. `2027-03-01T00:00:00Z`).
    pub until: String,
}

/// `[login]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginSection {
    /// Client IPs or CIDRs that may call `POST /v1/login-certificates/verify`.
    pub allowed_ips: Vec<String>,
    /// Client IPs or CIDRs that may call `POST /v1/xmpp/relay` without the token (none by
    /// default: the relay acts for the accounts its caller names).
    pub relay_allowed_ips: Vec<String>,
    /// A bearer token that lets any client call both (prefer `REGISTRAR_LOGIN__BEARER_TOKEN`).
    pub bearer_token: Option<Secret>,
}

impl Default for LoginSection {
    fn default() -> Self {
        Self {
            allowed_ips: vec!["127.0.0.0/8".into(), "::1/128".into()],
            relay_allowed_ips: Vec::new(),
            bearer_token: None,
        }
    }
}

/// `[accounts]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsSection {
    /// How far a signed request's timestamp may be from now, in seconds.
    pub signature_max_age_seconds: u64,
    /// How long an uploaded private key waits for the new device, in seconds.
    pub key_transfer_seconds: u64,
    /// Private key retrievals per client address (`"COUNT/PERIOD"` or `"off"`).
    pub key_retrievals_per_ip: String,
    /// Private key retrievals in total.
    pub key_retrievals_global: String,
    /// Requests on registered accounts (rollover, removal, key upload) per client address (or
    /// JID).
    pub requests_per_client: String,
    /// Code submissions with a key per client address (or JID), before the key is parsed.
    pub key_checks_per_client: String,
}

impl Default for AccountsSection {
    fn default() -> Self {
        let s = Settings::default();
        let show = |r: Option<Rate>| r.map_or_else(|| "off".to_owned(), |r| r.to_string());
        Self {
            signature_max_age_seconds: s.signature_max_age.as_secs(),
            key_transfer_seconds: s.key_transfer_lifetime.as_secs(),
            key_retrievals_per_ip: show(s.key_retrievals_per_ip),
            key_retrievals_global: show(s.key_retrievals_global),
            requests_per_client: show(s.account_requests_per_client),
            key_checks_per_client: show(s.key_checks_per_client),
        }
    }
}

/// `[events]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    /// URL that receives each event as a JSON POST.
    pub webhook_url: Option<String>,
    /// Key of the `X-Registrar-Signature` HMAC-SHA256 header (prefer
    /// `REGISTRAR_EVENTS__WEBHOOK_SECRET`).
    pub webhook_secret: Option<Secret>,
    /// JID the component sends each event to as a message (needs `[xmpp.component]`; the format
    /// is in `xmpp::events`).
    pub xmpp_to: Option<String>,
}

/// Who may call the login check over HTTP.
#[derive(Debug, Clone, Default)]
pub struct LoginAccess {
    /// Client networks allowed to the login check without a token.
    pub allowed_ips: Vec<IpNet>,
    /// Client networks allowed to the XMPP relay without a token.
    pub relay_allowed_ips: Vec<IpNet>,
    /// The token that allows any client.
    pub bearer_token: Option<Secret>,
}

/// The validated `[events]`.
#[derive(Debug, Clone, Default)]
pub struct EventsConfig {
    /// Webhook URL and its signing key.
    pub webhook: Option<(String, Option<Secret>)>,
    /// JID the component messages.
    pub xmpp_to: Option<String>,
}

impl EventsConfig {
    /// The sinks an event is recorded for.
    pub fn sinks(&self) -> Vec<String> {
        let mut sinks = Vec::new();
        if self.webhook.is_some() {
            sinks.push(crate::events::WEBHOOK.to_owned());
        }
        if self.xmpp_to.is_some() {
            sinks.push(crate::events::XMPP.to_owned());
        }
        sinks
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// E.164 prefix: a country calling code or longer (`+39`, `+44 7`).
    pub prefix: String,
    /// Only for this challenge; every challenge when absent.
    #[serde(default)]
    pub challenge: Option<Challenge>,
    /// Provider names, tried in order.
    pub providers: Vec<String>,
}

/// `[delivery]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Longest wait for one provider call, in seconds.
    pub timeout_seconds: u64,
    /// Transient failures in a row that open a provider's circuit breaker.
    pub breaker_failures: u32,
    /// Seconds an open breaker skips its provider before one probe.
    pub breaker_open_seconds: u64,
}

impl Default for DeliverySection {
    fn default() -> Self {
        let d = DispatchSettings::default();
        Self {
            timeout_seconds: d.timeout.as_secs(),
            breaker_failures: d.breaker_failures,
            breaker_open_seconds: d.breaker_open.as_secs(),
        }
    }
}

/// `[xmpp]`: the XMPP transports.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmppSection {
    /// `[xmpp.component]`: serve in-band registration as an external component (XEP-0114).
    pub component: Option<ComponentSection>,
}

fn default_component_server() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5347))
}
fn default_ping_interval() -> u64 {
    60
}

/// `[xmpp.component]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSection {
    /// The XMPP server's component port (an IP address and port).
    #[serde(default = "default_component_server")]
    pub server: SocketAddr,
    /// The component's JID, as the server's `Component` entry names it.
    pub jid: String,
    /// The shared secret (prefer `REGISTRAR_XMPP__COMPONENT__SECRET`).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A file holding the shared secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Seconds of silence after which the component pings the server.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_seconds: u64,
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Address and port of the JSON API.
    pub listen: SocketAddr,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// The service's public base URL as providers call it (`https://reg.example.org`), for
    /// receipt signatures; default: the request's Host header over http.
    pub public_url: Option<String>,
    /// Reverse proxies (CIDRs) whose `proxy_header` names the client.
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies set: `x-forwarded-for` or RFC 7239 `forwarded`.
    pub proxy_header: ProxyHeader,
    /// Seconds a client has to send a request's head.
    pub header_timeout_seconds: u64,
    /// Seconds a request may take, from its head to the answer (its body read included).
    pub request_timeout_seconds: u64,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Which header trusted reverse proxies name the client in. Only that one is read: a client can
/// send the other through a proxy that leaves it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for=proxy1`.
    Forwarded,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 * 1024,
            public_url: None,
            trusted_proxies: Vec::new(),
            proxy_header: ProxyHeader::default(),
            header_timeout_seconds: Bounds::default().header_timeout.as_secs(),
            request_timeout_seconds: Bounds::default().request_timeout.as_secs(),
            max_connections: Bounds::default().max_connections,
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSection {
    /// `sqlite://PATH` (default `<data_dir>/registrar.db`) or `postgres://...`.
    pub url: Option<String>,
    /// Pool size.
    pub max_connections: u32,
    /// Seconds to wait for a pooled connection (and to connect at start).
    pub acquire_timeout_seconds: u64,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            acquire_timeout_seconds: 10,
        }
    }
}

/// `[registration]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationSection {
    /// Whether new verifications may start.
    pub open: bool,
    /// Terms of service the client must accept.
    pub terms_url: Option<String>,
    /// Name used in messages.
    pub service_name: String,
}

impl Default for RegistrationSection {
    fn default() -> Self {
        Self {
            open: true,
            terms_url: None,
            service_name: "Kontalk".into(),
        }
    }
}

/// `[verification]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationSection {
    /// Digits in a code (4 to 10).
    pub code_length: usize,
    /// Seconds a code stays valid.
    pub lifetime_seconds: u64,
    /// Seconds after the first message before another; the wait doubles with each message.
    pub resend_wait_seconds: u64,
    /// The longest wait between two messages.
    pub resend_wait_max_seconds: u64,
    /// Seconds after a text message before a voice call or missed call may replace it.
    pub call_wait_seconds: u64,
    /// Digits in the code of a forced re-registration (code_length to 10).
    pub long_code_length: usize,
    /// Verifications per number with a short code, as a rate (or "off": always short).
    pub short_codes_per_number: String,
    /// Code submissions of a verification's holder before it locks.
    pub max_attempts: u32,
    /// Code submissions of everyone else together.
    pub max_attempts_others: u32,
    /// The holder's code submissions of a forced re-registration, and each other requester's.
    pub replacement_attempts: u32,
    /// The others' code submissions of a forced re-registration, together.
    pub replacement_attempts_others: u32,
    /// Challenge when the client names none.
    pub default_challenge: Challenge,
}

impl Default for VerificationSection {
    fn default() -> Self {
        Self {
            code_length: 6,
            lifetime_seconds: 600,
            resend_wait_seconds: 60,
            resend_wait_max_seconds: 600,
            call_wait_seconds: 60,
            long_code_length: 10,
            short_codes_per_number: "2/1d".into(),
            max_attempts: 5,
            max_attempts_others: 10,
            replacement_attempts: 3,
            replacement_attempts_others: 6,
            default_challenge: Challenge::Pin,
        }
    }
}

/// `[phone]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneSection {
    /// Accept viable but invalid (fictional) numbers; default: on in development only.
    pub accept_fictional: Option<bool>,
    /// Number types accepted.
    pub allowed_types: Vec<NumberType>,
}

impl Default for PhoneSection {
    fn default() -> Self {
        Self {
            accept_fictional: None,
            allowed_types: PhonePolicy::default().allowed_types,
        }
    }
}

/// `[abuse.start]`, `[abuse.resend]`, `[abuse.check]`: a rate per scope, such as `"5/1h"`, or
/// `"off"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Per client IP (IPv6 per network).
    pub per_ip: String,
    /// Per phone number.
    pub per_number: String,
    /// Per number prefix (`abuse.prefix_digits`).
    pub per_prefix: String,
    /// Per calling code.
    pub per_country: String,
    /// For the whole service.
    pub global: String,
}

impl From<&Limits> for LimitsSection {
    fn from(l: &Limits) -> Self {
        let show = |r: Option<Rate>| r.map_or_else(|| "off".to_owned(), |r| r.to_string());
        Self {
            per_ip: show(l.ip),
            per_number: show(l.number),
            per_prefix: show(l.prefix),
            per_country: show(l.country),
            global: show(l.global),
        }
    }
}

/// `[abuse.pumping]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PumpingSection {
    /// Judge traffic and act on it.
    pub enabled: bool,
    /// Seconds of traffic judged.
    pub window_seconds: u64,
    /// Prefix lengths judged besides the calling code and `abuse.prefix_digits`.
    pub levels: Vec<usize>,
    /// Distinct numbers, and distinct sources, before a level is judged.
    #[serde(alias = "min_messages")]
    pub min_numbers: u32,
    /// Completions per number below which waits grow.
    pub slow_below: f64,
    /// How much longer the waits are then.
    pub slow_factor: u32,
    /// Completions per number below which missed calls replace texts (and a prefix is blocked).
    pub min_completion: f64,
    /// Seconds of missed calls before a prefix is blocked.
    pub block_after_seconds: u64,
    /// Seconds a block lasts.
    pub block_seconds: u64,
}

impl Default for PumpingSection {
    fn default() -> Self {
        let p = Pumping::default();
        Self {
            enabled: p.enabled,
            window_seconds: p.window.as_secs(),
            levels: p.levels,
            min_numbers: p.min_numbers,
            slow_below: p.slow_below,
            slow_factor: p.slow_factor,
            min_completion: p.min_completion,
            block_after_seconds: p.block_after.as_secs(),
            block_seconds: p.block_for.as_secs(),
        }
    }
}

/// `[abuse.caps]`: messages per UTC day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapsSection {
    /// All messages (0: no cap).
    pub daily_total: u32,
    /// Messages to any one country (0: no cap).
    pub daily_per_country: u32,
    /// Caps of particular countries, by calling code or ISO code (`"44"`, `"GB"`).
    pub countries: std::collections::BTreeMap<String, u32>,
}

impl Default for CapsSection {
    fn default() -> Self {
        let c = AbuseSettings::default().caps;
        Self {
            daily_total: c.total.unwrap_or(0),
            daily_per_country: c.per_country.unwrap_or(0),
            countries: Default::default(),
        }
    }
}

/// One `[[abuse.costs]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// Provider name.
    pub provider: String,
    /// Calling code or ISO code; absent: every other country.
    #[serde(default)]
    pub country: Option<String>,
    /// Price of one message or call.
    pub price: f64,
}

/// One `[[abuse.test_numbers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestNumberConfig {
    /// The number, in international format.
    pub phone: String,
    /// Its fixed code.
    pub code: String,
}

/// `[abuse]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseSection {
    /// Serve without limits when the database cannot count (default: refuse).
    pub fail_open: bool,
    /// Digits of the E.164 number, calling code included, that make its prefix.
    pub prefix_digits: usize,
    /// IPv6 clients are counted per network of this length.
    pub ipv6_prefix: u8,
    /// A repeated start (same number, same client) within this many seconds returns the
    /// verification instead of sending again.
    pub repeat_window_seconds: u64,
    /// Countries served (calling codes or ISO codes); empty: all.
    pub allow_countries: Vec<String>,
    /// Countries refused.
    pub deny_countries: Vec<String>,
    /// E.164 prefixes served; empty: all.
    pub allow_prefixes: Vec<String>,
    /// E.164 prefixes refused.
    pub deny_prefixes: Vec<String>,
    /// Client networks refused (CIDRs).
    pub deny_ips: Vec<String>,
    /// Client networks that skip IP throttling (trusted backends).
    pub trusted_ips: Vec<String>,
    /// Currency of `costs`.
    pub currency: String,
    /// Starting verifications.
    pub start: LimitsSection,
    /// Resending.
    pub resend: LimitsSection,
    /// Checking codes.
    pub check: LimitsSection,
    /// SMS-pumping defence.
    pub pumping: PumpingSection,
    /// Daily caps.
    pub caps: CapsSection,
    /// Prices per provider and country.
    pub costs: Vec<CostConfig>,
    /// Numbers with fixed codes that never reach a provider.
    pub test_numbers: Vec<TestNumberConfig>,
}

impl Default for AbuseSection {
    fn default() -> Self {
        let a = AbuseSettings::default();
        Self {
            fail_open: a.fail_open,
            prefix_digits: a.prefix_digits,
            ipv6_prefix: a.ipv6_prefix,
            repeat_window_seconds: a.repeat_window.as_secs(),
            allow_countries: Vec::new(),
            deny_countries: Vec::new(),
            allow_prefixes: Vec::new(),
            deny_prefixes: Vec::new(),
            deny_ips: Vec::new(),
            trusted_ips: Vec::new(),
            currency: a.currency.clone(),
            start: (&a.start).into(),
            resend: (&a.resend).into(),
            check: (&a.check).into(),
            pumping: PumpingSection::default(),
            caps: CapsSection::default(),
            costs: Vec::new(),
            test_numbers: Vec::new(),
        }
    }
}

/// A calling code (`"44"`, `"+44"`) or an ISO region code naming one (`"GB"`), as digits.
fn calling_code(key: &str, value: &str) -> Result<String, ConfigError> {
    let v = value.trim();
    let digits = v.strip_prefix('+').unwrap_or(v);
    if !digits.is_empty() && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit()) {
        let code: u16 = digits.parse().map_err(|_| bad(key, "not a calling code"))?;
        if phonenumber::metadata::DATABASE.region(&code).is_some() {
            return Ok(code.to_string());
        }
        return Err(bad(key, format!("{value:?} is no country calling code")));
    }
    let region = v.to_ascii_uppercase();
    let Some(meta) = phonenumber::metadata::DATABASE.by_id(region.as_str()) else {
        return Err(bad(
            key,
            format!(
                "{value:?} is neither a calling code (\"+44\") nor an ISO country code (\"GB\")"
            ),
        ));
    };
    let code = meta.country_code();
    let shared = phonenumber::metadata::DATABASE
        .region(&code)
        .unwrap_or_default();
    if shared.len() > 1 {
        return Err(bad(
            key,
            format!(
                "{value:?} shares calling code +{code} with {}; write \"+{code}\" for all of \
                 them, or list prefixes in allow_prefixes/deny_prefixes",
                shared
                    .iter()
                    .filter(|r| !r.eq_ignore_ascii_case(&region))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(code.to_string())
}

/// An E.164 prefix (`"+4479"`, spaces and dashes allowed) as digits.
fn e164_prefix(key: &str, value: &str) -> Result<String, ConfigError> {
    let cleaned: String = value.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let digits = cleaned.strip_prefix('+').unwrap_or(&cleaned);
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            key,
            format!("{value:?} is not an E.164 prefix such as \"+39\""),
        ));
    }
    Ok(digits.to_owned())
}

fn rate(key: &str, value: &str) -> Result<Option<Rate>, ConfigError> {
    if value.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| bad(key, e))
}

fn limits(key: &str, l: &LimitsSection) -> Result<Limits, ConfigError> {
    Ok(Limits {
        ip: rate(&format!("{key}.per_ip"), &l.per_ip)?,
        number: rate(&format!("{key}.per_number"), &l.per_number)?,
        prefix: rate(&format!("{key}.per_prefix"), &l.per_prefix)?,
        country: rate(&format!("{key}.per_country"), &l.per_country)?,
        global: rate(&format!("{key}.global"), &l.global)?,
    })
}

fn cidrs(key: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|c| {
            let c = c.trim();
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| bad(key, format!("{c:?} is not an IP address or CIDR network")))
        })
        .collect()
}

impl AbuseSection {
    fn validate(
        &self,
        policy: &PhonePolicy,
        production: bool,
    ) -> Result<AbuseSettings, ConfigError> {
        if !(3..=15).contains(&self.prefix_digits) {
            return Err(bad("abuse.prefix_digits", "must be between 3 and 15"));
        }
        if !(16..=128).contains(&self.ipv6_prefix) {
            return Err(bad("abuse.ipv6_prefix", "must be between 16 and 128"));
        }
        if self.repeat_window_seconds > 3600 {
            return Err(bad("abuse.repeat_window_seconds", "must be at most 3600"));
        }
        let p = &self.pumping;
        if !(600..=7 * 86_400).contains(&p.window_seconds) {
            return Err(bad(
                "abuse.pumping.window_seconds",
                "must be between 600 and 604800",
            ));
        }
        if p.min_numbers == 0 {
            return Err(bad("abuse.pumping.min_numbers", "must be at least 1"));
        }
        if let Some(l) = p.levels.iter().find(|l| !(2..=14).contains(*l)) {
            return Err(bad(
                "abuse.pumping.levels",
                format!("{l}: prefix lengths must be between 2 and 14 digits"),
            ));
        }
        if !(0.0..=1.0).contains(&p.min_completion) {
            return Err(bad(
                "abuse.pumping.min_completion",
                "must be between 0 and 1",
            ));
        }
        if !(p.min_completion..=1.0).contains(&p.slow_below) {
            return Err(bad(
                "abuse.pumping.slow_below",
                "must be between min_completion and 1",
            ));
        }
        if !(1..=16).contains(&p.slow_factor) {
            return Err(bad("abuse.pumping.slow_factor", "must be between 1 and 16"));
        }
        if p.block_after_seconds > p.window_seconds {
            return Err(bad(
                "abuse.pumping.block_after_seconds",
                "must be at most window_seconds",
            ));
        }
        if !(60..=30 * 86_400).contains(&p.block_seconds) {
            return Err(bad(
                "abuse.pumping.block_seconds",
                "must be between 60 and 2592000",
            ));
        }
        let codes = |key: &str, list: &[String]| -> Result<Vec<String>, ConfigError> {
            list.iter().map(|c| calling_code(key, c)).collect()
        };
        let prefixes = |key: &str, list: &[String]| -> Result<Vec<String>, ConfigError> {
            list.iter().map(|c| e164_prefix(key, c)).collect()
        };
        let nonzero = |n: u32| (n > 0).then_some(n);
        let mut countries = std::collections::BTreeMap::new();
        for (c, cap) in &self.caps.countries {
            countries.insert(calling_code("abuse.caps.countries", c)?, *cap);
        }
        let mut costs = Vec::new();
        for (i, c) in self.costs.iter().enumerate() {
            if !(c.price.is_finite() && c.price >= 0.0) {
                return Err(bad(
                    &format!("abuse.costs[{i}].price"),
                    "must be a price of 0 or more",
                ));
            }
            costs.push(Cost {
                provider: c.provider.clone(),
                country: match &c.country {
                    Some(code) => calling_code(&format!("abuse.costs[{i}].country"), code)?,
                    None => String::new(),
                },
                price: c.price,
            });
        }
        let mut test_numbers = std::collections::BTreeMap::new();
        for (i, t) in self.test_numbers.iter().enumerate() {
            let key = format!("abuse.test_numbers[{i}]");
            // Listed numbers need only be viable: a fictional number (the usual choice for an
            // app-store review account) is accepted in production because it is listed.
            let lenient = PhonePolicy {
                accept_fictional: true,
                ..policy.clone()
            };
            let phone = lenient
                .parse(&t.phone)
                .map_err(|e| bad(&format!("{key}.phone"), e))?;
            let code: crate::registrar::Code =
                t.code.parse().map_err(|e| bad(&format!("{key}.code"), e))?;
            if !CODE_LENGTHS.contains(&code.as_str().len()) {
                return Err(bad(&format!("{key}.code"), "must have 4 to 10 digits"));
            }
            if production
                && code
                    .as_str()
                    .bytes()
                    .all(|b| b == code.as_str().as_bytes()[0])
            {
                return Err(bad(
                    &format!("{key}.code"),
                    "a code of one repeated digit is refused in production",
                ));
            }
            test_numbers.insert(phone.as_str().to_owned(), code.as_str().to_owned());
        }
        Ok(AbuseSettings {
            start: limits("abuse.start", &self.start)?,
            resend: limits("abuse.resend", &self.resend)?,
            check: limits("abuse.check", &self.check)?,
            prefix_digits: self.prefix_digits,
            ipv6_prefix: self.ipv6_prefix,
            fail_open: self.fail_open,
            repeat_window: Duration::from_secs(self.repeat_window_seconds),
            lists: Lists {
                allow_countries: codes("abuse.allow_countries", &self.allow_countries)?,
                deny_countries: codes("abuse.deny_countries", &self.deny_countries)?,
                allow_prefixes: prefixes("abuse.allow_prefixes", &self.allow_prefixes)?,
                deny_prefixes: prefixes("abuse.deny_prefixes", &self.deny_prefixes)?,
                deny_ips: cidrs("abuse.deny_ips", &self.deny_ips)?,
                trusted_ips: cidrs("abuse.trusted_ips", &self.trusted_ips)?,
            },
            pumping: Pumping {
                enabled: p.enabled,
                window: Duration::from_secs(p.window_seconds),
                levels: p.levels.clone(),
                min_numbers: p.min_numbers,
                slow_below: p.slow_below,
                slow_factor: p.slow_factor,
                min_completion: p.min_completion,
                block_after: Duration::from_secs(p.block_after_seconds),
                block_for: Duration::from_secs(p.block_seconds),
            },
            caps: Caps {
                total: nonzero(self.caps.daily_total),
                per_country: nonzero(self.caps.daily_per_country),
                countries,
            },
            costs,
            currency: self.currency.clone(),
            test_numbers,
        })
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// tracing filter (`RUST_LOG` wins when set).
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            filter: "info".into(),
        }
    }
}

fn default_dev_name() -> String {
    "development".into()
}
fn default_dev_sender() -> String {
    "12345".into()
}
fn default_caller_prefix() -> String {
    "+1555000".into()
}
fn all_challenges() -> Vec<Challenge> {
    Challenge::ALL.to_vec()
}

/// One `[[providers]]` entry; `kind` selects the gateway. Credentials are given inline or as
/// `{ env = "VARIABLE" }`, and never printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderConfig {
    /// Twilio: Messages (SMS), Calls (voice PIN) or Verify v2.
    Twilio(registrar_providers::twilio::TwilioConfig),
    /// Vonage (Nexmo): SMS API or Verify.
    Vonage(registrar_providers::vonage::VonageConfig),
    /// CheckMobi: missed call (reverse CLI), SMS.
    #[serde(rename = "checkmobi")]
    CheckMobi(registrar_providers::checkmobi::CheckMobiConfig),
    /// Any HTTP SMS gateway, by template.
    Generic(registrar_providers::generic::GenericConfig),
    /// The Android emulator console.
    AndroidEmulator(registrar_providers::emulator::EmulatorConfig),
    /// Appends to `<data_dir>/outbox.jsonl` and prints; refused in production.
    Development(DevelopmentConfig),
}

/// `kind = "development"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevelopmentConfig {
    /// Name in logs and routing.
    #[serde(default = "default_dev_name")]
    pub name: String,
    /// SMS sender id shown to the client.
    #[serde(default = "default_dev_sender")]
    pub sender: String,
    /// Missed calls come from this prefix followed by the code.
    #[serde(default = "default_caller_prefix")]
    pub caller_prefix: String,
    /// Outbox file; default `<data_dir>/outbox.jsonl`.
    #[serde(default)]
    pub outbox: Option<PathBuf>,
    /// Challenges it delivers.
    #[serde(default = "all_challenges")]
    pub challenges: Vec<Challenge>,
}

impl Default for DevelopmentConfig {
    fn default() -> Self {
        Self {
            name: default_dev_name(),
            sender: default_dev_sender(),
            caller_prefix: default_caller_prefix(),
            outbox: None,
            challenges: all_challenges(),
        }
    }
}

impl ProviderConfig {
    /// The provider's configured name.
    pub fn name(&self) -> &str {
        match self {
            ProviderConfig::Development(c) => &c.name,
            ProviderConfig::Twilio(c) => &c.name,
            ProviderConfig::Vonage(c) => &c.name,
            ProviderConfig::CheckMobi(c) => &c.name,
            ProviderConfig::Generic(c) => &c.name,
            ProviderConfig::AndroidEmulator(c) => &c.name,
        }
    }
}

/// Where the server secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// Given in the configuration or environment.
    Inline(ServerSecret),
    /// Read from a file, generated there first if `generate` and missing.
    File {
        /// The file.
        path: PathBuf,
        /// Whether a missing file is generated (development only).
        generate: bool,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Development or production.
    pub mode: Mode,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Server key file.
    pub key_file: PathBuf,
    /// Whether a missing key file is generated (development only).
    pub generate_key: bool,
    /// Server secret.
    pub secret: SecretSource,
    /// Whether an RSA server key is accepted.
    pub allow_rsa_key: bool,
    /// HTTP listen address.
    pub http_listen: SocketAddr,
    /// HTTP body limit.
    pub max_body_bytes: usize,
    /// Public base URL for receipt signatures.
    pub public_url: Option<String>,
    /// Reverse proxies whose `proxy_header` names the client.
    pub trusted_proxies: Vec<IpNet>,
    /// The header they set.
    pub proxy_header: ProxyHeader,
    /// Timeouts and the connection limit of the HTTP listener.
    pub http_bounds: Bounds,
    /// Database URL.
    pub database_url: DatabaseUrl,
    /// Database pool size.
    pub database_max_connections: u32,
    /// Wait for a pooled connection.
    pub database_acquire_timeout: Duration,
    /// The core's rules.
    pub settings: Settings,
    /// Providers, in order.
    pub providers: Vec<ProviderConfig>,
    /// Routing rules.
    pub routes: Vec<Route>,
    /// Provider call timeouts and breakers.
    pub dispatch: DispatchSettings,
    /// The XMPP component, if configured.
    pub xmpp_component: Option<ComponentConfig>,
    /// Previous server keys (file, end of trust).
    pub previous_keys: Vec<(PathBuf, chrono::DateTime<chrono::Utc>)>,
    /// Who may call the login check over HTTP.
    pub login: LoginAccess,
    /// Where events go.
    pub events: EventsConfig,
    /// Log filter.
    pub log_filter: String,
}

/// A database URL, which may hold a password: `Debug` and `Display` show it without one.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL, password included, for the driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.clone();
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                let shown = if userinfo.contains(':') {
                    format!("{user}:***")
                } else {
                    user.to_owned()
                };
                // A password may also come as a query parameter.
                let path = match path.split_once('?') {
                    Some((p, q)) if q.contains("password=") => format!("{p}?***"),
                    _ => path.to_owned(),
                };
                format!("{scheme}://{shown}@{host}{path}")
            }
            None => match path.split_once('?') {
                Some((p, q)) if q.contains("password=") => format!("{scheme}://{authority}{p}?***"),
                _ => url.clone(),
            },
        }
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl std::ops::Deref for DatabaseUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The validated `[xmpp.component]`.
#[derive(Debug, Clone)]
pub struct ComponentConfig {
    /// Server address.
    pub server: SocketAddr,
    /// Component JID.
    pub jid: String,
    /// Shared secret.
    pub secret: Secret,
    /// Silence before a keepalive ping.
    pub ping_interval: Duration,
    /// JID the component sends events to (`events.xmpp_to`).
    pub events_to: Option<String>,
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// A configuration that cannot be used; the text names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {why}"))
}

/// Command-line flags that override the file and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--http`.
    pub http: Option<SocketAddr>,
    /// `--domain`.
    pub domain: Option<String>,
}

impl Config {
    /// The embedded defaults (no file, no environment), with `data_dir`.
    pub fn development(data_dir: &Path) -> Result<Self, ConfigError> {
        let file = FileConfig {
            data_dir: data_dir.to_path_buf(),
            ..FileConfig::default()
        };
        file.validate()
    }

    /// Loads `path` (if given), overlays the environment and `overrides`, and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(FileConfig::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__"));
        if let Some(d) = &overrides.data_dir {
            figment = figment.merge(Serialized::default("data_dir", d));
        }
        if let Some(h) = &overrides.http {
            figment = figment.merge(Serialized::default("http.listen", h.to_string()));
        }
        if let Some(d) = &overrides.domain {
            figment = figment.merge(Serialized::default("server.domain", d));
        }
        let file: FileConfig = figment.extract().map_err(|e| {
            // figment's errors name the key and where it came from; join all of them.
            ConfigError(
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        file.validate()
    }
}

impl FileConfig {
    /// Checks every value and builds the [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let production = self.mode == Mode::Production;
        let domain = self.server.domain.trim().to_ascii_lowercase();
        if !valid_domain(&domain) {
            return Err(bad(
                "server.domain",
                format!("{:?} is not a domain name", self.server.domain),
            ));
        }
        let v = &self.verification;
        if !CODE_LENGTHS.contains(&v.code_length) {
            return Err(bad(
                "verification.code_length",
                format!("must be between 4 and 10 (got {})", v.code_length),
            ));
        }
        if !(60..=86_400).contains(&v.lifetime_seconds) {
            return Err(bad(
                "verification.lifetime_seconds",
                "must be between 60 and 86400",
            ));
        }
        if v.resend_wait_seconds >= v.lifetime_seconds {
            return Err(bad(
                "verification.resend_wait_seconds",
                "must be shorter than verification.lifetime_seconds",
            ));
        }
        if v.resend_wait_max_seconds < v.resend_wait_seconds
            || v.resend_wait_max_seconds > v.lifetime_seconds
        {
            return Err(bad(
                "verification.resend_wait_max_seconds",
                "must be at least verification.resend_wait_seconds and at most \
                 verification.lifetime_seconds",
            ));
        }
        if v.call_wait_seconds >= v.lifetime_seconds {
            return Err(bad(
                "verification.call_wait_seconds",
                "must be shorter than verification.lifetime_seconds",
            ));
        }
        if !(1..=20).contains(&v.max_attempts) {
            return Err(bad("verification.max_attempts", "must be between 1 and 20"));
        }
        if !(0..=50).contains(&v.max_attempts_others) {
            return Err(bad(
                "verification.max_attempts_others",
                "must be between 0 and 50",
            ));
        }
        if v.replacement_attempts_others > v.max_attempts_others {
            return Err(bad(
                "verification.replacement_attempts_others",
                "must be at most verification.max_attempts_others",
            ));
        }
        if !(v.code_length..=10).contains(&v.long_code_length) {
            return Err(bad(
                "verification.long_code_length",
                "must be between verification.code_length and 10",
            ));
        }
        if !(1..=v.max_attempts).contains(&v.replacement_attempts) {
            return Err(bad(
                "verification.replacement_attempts",
                "must be between 1 and verification.max_attempts",
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.http.max_body_bytes) {
            return Err(bad(
                "http.max_body_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if let Some(u) = &self.http.public_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            return Err(bad("http.public_url", "must be an http(s) URL"));
        }
        if self.database.max_connections == 0 {
            return Err(bad("database.max_connections", "must be at least 1"));
        }
        if !(1..=300).contains(&self.database.acquire_timeout_seconds) {
            return Err(bad(
                "database.acquire_timeout_seconds",
                "must be between 1 and 300",
            ));
        }
        if self.phone.allowed_types.is_empty() {
            return Err(bad("phone.allowed_types", "must name at least one type"));
        }
        if let Some(url) = &self.registration.terms_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(bad("registration.terms_url", "must be an http(s) URL"));
        }

        let key_file = match (&self.server.key_file, production) {
            (Some(p), _) => p.clone(),
            (None, true) => {
                return Err(bad(
                    "server.key_file",
                    "production mode needs an explicit server key shared by every instance \
                     (create one with `kontalk-registrar keygen`)",
                ));
            }
            (None, false) => self.data_dir.join("server-key.asc"),
        };
        let secret = match (&self.server.secret, &self.server.secret_file, production) {
            (Some(_), Some(_), _) => {
                return Err(bad(
                    "server.secret",
                    "set either server.secret or server.secret_file, not both",
                ));
            }
            (Some(text), None, _) => SecretSource::Inline(
                ServerSecret::from_text(text.expose()).map_err(|e| bad("server.secret", e))?,
            ),
            (None, Some(p), _) => SecretSource::File {
                path: p.clone(),
                generate: !production,
            },
            (None, None, true) => {
                return Err(bad(
                    "server.secret",
                    "production mode needs a server secret shared by every instance \
                     (server.secret_file, or REGISTRAR_SERVER__SECRET)",
                ));
            }
            (None, None, false) => SecretSource::File {
                path: self.data_dir.join("server-secret"),
                generate: true,
            },
        };

        let mut providers = self.providers.clone();
        if providers.is_empty() {
            if production {
                return Err(bad(
                    "providers",
                    "production mode needs at least one provider",
                ));
            }
            providers.push(ProviderConfig::Development(DevelopmentConfig::default()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in providers.iter().enumerate() {
            let name = p.name();
            if name.is_empty() || !names.insert(name.to_owned()) {
                return Err(bad(
                    &format!("providers[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if production && matches!(p, ProviderConfig::AndroidEmulator(_)) {
                return Err(bad(
                    &format!("providers[{i}].kind"),
                    "the Android emulator provider is for development; refused in production mode",
                ));
            }
            let ProviderConfig::Development(DevelopmentConfig {
                sender, challenges, ..
            }) = p
            else {
                continue;
            };
            if production {
                return Err(bad(
                    &format!("providers[{i}].kind"),
                    "the development provider is refused in production mode",
                ));
            }
            if sender.is_empty() {
                return Err(bad(&format!("providers[{i}].sender"), "must not be empty"));
            }
            if challenges.is_empty() {
                return Err(bad(
                    &format!("providers[{i}].challenges"),
                    "must name at least one challenge",
                ));
            }
        }

        let database_url = match &self.database.url {
            Some(u)
                if u.starts_with("sqlite:")
                    || u.starts_with("postgres://")
                    || u.starts_with("postgresql://") =>
            {
                u.clone()
            }
            Some(u) => {
                return Err(bad(
                    "database.url",
                    format!(
                        "unsupported database {:?} (use sqlite://PATH or postgres://...)",
                        u.split(':').next().unwrap_or_default()
                    ),
                ));
            }
            None => format!("sqlite://{}", self.data_dir.join("registrar.db").display()),
        };

        let provider_names: Vec<&str> = providers.iter().map(ProviderConfig::name).collect();
        let mut routes = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            let prefix: String = r
                .prefix
                .chars()
                .filter(|c| !matches!(c, ' ' | '-'))
                .collect();
            let digits = prefix.strip_prefix('+').unwrap_or(&prefix);
            if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(bad(
                    &format!("routes[{i}].prefix"),
                    format!("{:?} is not an E.164 prefix such as \"+39\"", r.prefix),
                ));
            }
            if r.providers.is_empty() {
                return Err(bad(
                    &format!("routes[{i}].providers"),
                    "must name at least one provider",
                ));
            }
            for name in &r.providers {
                if !provider_names.contains(&name.as_str()) {
                    return Err(bad(
                        &format!("routes[{i}].providers"),
                        format!("no provider is named {name:?}"),
                    ));
                }
            }
            routes.push(Route {
                prefix: digits.to_owned(),
                challenge: r.challenge,
                providers: r.providers.clone(),
            });
        }
        let d = &self.delivery;
        if !(1..=120).contains(&d.timeout_seconds) {
            return Err(bad("delivery.timeout_seconds", "must be between 1 and 120"));
        }
        if d.breaker_failures == 0 {
            return Err(bad("delivery.breaker_failures", "must be at least 1"));
        }
        if !(1..=3600).contains(&d.breaker_open_seconds) {
            return Err(bad(
                "delivery.breaker_open_seconds",
                "must be between 1 and 3600",
            ));
        }
        let dispatch = DispatchSettings {
            timeout: Duration::from_secs(d.timeout_seconds),
            breaker_failures: d.breaker_failures,
            breaker_open: Duration::from_secs(d.breaker_open_seconds),
        };
        let templates = Templates::new(&self.templates).map_err(ConfigError)?;

        let xmpp_component = match &self.xmpp.component {
            None => None,
            Some(c) => {
                let jid = c.jid.trim().to_ascii_lowercase();
                if !valid_domain(&jid) {
                    return Err(bad(
                        "xmpp.component.jid",
                        format!("{:?} is not a component JID (a domain name)", c.jid),
                    ));
                }
                let secret = match (&c.secret, &c.secret_file) {
                    (Some(s), None) => s.clone(),
                    (None, Some(path)) => Secret::new(
                        std::fs::read_to_string(path)
                            .map_err(|e| {
                                bad(
                                    "xmpp.component.secret_file",
                                    format!("{}: {e}", path.display()),
                                )
                            })?
                            .trim()
                            .to_owned(),
                    ),
                    _ => {
                        return Err(bad(
                            "xmpp.component.secret",
                            "set exactly one of xmpp.component.secret (or \
                             REGISTRAR_XMPP__COMPONENT__SECRET) and xmpp.component.secret_file",
                        ));
                    }
                };
                if secret.expose().is_empty() {
                    return Err(bad("xmpp.component.secret", "must not be empty"));
                }
                if !(5..=3600).contains(&c.ping_interval_seconds) {
                    return Err(bad(
                        "xmpp.component.ping_interval_seconds",
                        "must be between 5 and 3600",
                    ));
                }
                Some(ComponentConfig {
                    server: c.server,
                    jid,
                    secret,
                    ping_interval: Duration::from_secs(c.ping_interval_seconds),
                    events_to: self.events.xmpp_to.clone(),
                })
            }
        };

        let phone_policy = PhonePolicy {
            accept_fictional: self.phone.accept_fictional.unwrap_or(!production),
            allowed_types: self.phone.allowed_types.clone(),
        };
        let abuse = self.abuse.validate(&phone_policy, production)?;
        let trusted_proxies = cidrs("http.trusted_proxies", &self.http.trusted_proxies)?;
        let h = &self.http;
        if !(1..=300).contains(&h.header_timeout_seconds) {
            return Err(bad(
                "http.header_timeout_seconds",
                "must be between 1 and 300",
            ));
        }
        if !(1..=3600).contains(&h.request_timeout_seconds) {
            return Err(bad(
                "http.request_timeout_seconds",
                "must be between 1 and 3600",
            ));
        }
        if !(1..=1_000_000).contains(&h.max_connections) {
            return Err(bad("http.max_connections", "must be between 1 and 1000000"));
        }
        let http_bounds = Bounds {
            header_timeout: Duration::from_secs(h.header_timeout_seconds),
            request_timeout: Duration::from_secs(h.request_timeout_seconds),
            max_connections: h.max_connections,
        };
        let previous_keys = self
            .server
            .previous_keys
            .iter()
            .map(|k| {
                let until = chrono::DateTime::parse_from_rfc3339(k.until.trim())
                    .map_err(|e| {
                        bad(
                            "server.previous_keys.until",
                            format!("{:?} is not an RFC 3339 time: {e}", k.until),
                        )
                    })?
                    .with_timezone(&chrono::Utc);
                Ok((k.key_file.clone(), until))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let login = LoginAccess {
            allowed_ips: cidrs("login.allowed_ips", &self.login.allowed_ips)?,
            relay_allowed_ips: cidrs("login.relay_allowed_ips", &self.login.relay_allowed_ips)?,
            bearer_token: match &self.login.bearer_token {
                Some(t) if t.expose().len() < 16 => {
                    return Err(bad("login.bearer_token", "must be at least 16 characters"));
                }
                t => t.clone(),
            },
        };
        if !(30..=86_400).contains(&self.accounts.signature_max_age_seconds) {
            return Err(bad(
                "accounts.signature_max_age_seconds",
                "must be between 30 and 86400",
            ));
        }
        if !(60..=7 * 86_400).contains(&self.accounts.key_transfer_seconds) {
            return Err(bad(
                "accounts.key_transfer_seconds",
                "must be between 60 and 604800",
            ));
        }
        let key_retrievals_per_ip = rate(
            "accounts.key_retrievals_per_ip",
            &self.accounts.key_retrievals_per_ip,
        )?;
        let key_retrievals_global = rate(
            "accounts.key_retrievals_global",
            &self.accounts.key_retrievals_global,
        )?;
        let account_requests_per_client = rate(
            "accounts.requests_per_client",
            &self.accounts.requests_per_client,
        )?;
        let key_checks_per_client = rate(
            "accounts.key_checks_per_client",
            &self.accounts.key_checks_per_client,
        )?;
        let e = &self.events;
        if let Some(u) = &e.webhook_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            return Err(bad("events.webhook_url", "must be an http(s) URL"));
        }
        if e.webhook_secret.is_some() && e.webhook_url.is_none() {
            return Err(bad("events.webhook_secret", "needs events.webhook_url"));
        }
        if let Some(to) = &e.xmpp_to {
            if xmpp_component.is_none() {
                return Err(bad("events.xmpp_to", "needs [xmpp.component]"));
            }
            if to.parse::<xmpp_parsers::jid::Jid>().is_err() {
                return Err(bad("events.xmpp_to", format!("{to:?} is not a JID")));
            }
        }
        let events = EventsConfig {
            webhook: e.webhook_url.clone().map(|u| (u, e.webhook_secret.clone())),
            xmpp_to: e.xmpp_to.clone(),
        };
        let settings = Settings {
            domain,
            phone_policy,
            code_length: v.code_length,
            lifetime: Duration::from_secs(v.lifetime_seconds),
            resend_wait: Duration::from_secs(v.resend_wait_seconds),
            resend_wait_max: Duration::from_secs(v.resend_wait_max_seconds),
            call_wait: Duration::from_secs(v.call_wait_seconds),
            long_code_length: v.long_code_length,
            short_codes_per_number: rate(
                "verification.short_codes_per_number",
                &v.short_codes_per_number,
            )?,
            max_attempts: v.max_attempts,
            max_attempts_others: v.max_attempts_others,
            replacement_attempts: v.replacement_attempts,
            replacement_attempts_others: v.replacement_attempts_others,
            open: self.registration.open,
            terms_url: self.registration.terms_url.clone(),
            service_name: self.registration.service_name.clone(),
            default_challenge: v.default_challenge,
            templates,
            abuse,
            signature_max_age: Duration::from_secs(self.accounts.signature_max_age_seconds),
            event_sinks: events.sinks(),
            key_transfer_lifetime: Duration::from_secs(self.accounts.key_transfer_seconds),
            key_retrievals_per_ip,
            key_retrievals_global,
            account_requests_per_client,
            key_checks_per_client,
        };
        Ok(Config {
            mode: self.mode,
            data_dir: self.data_dir,
            key_file,
            generate_key: !production,
            secret,
            allow_rsa_key: self.server.allow_rsa_key || !production,
            http_listen: self.http.listen,
            max_body_bytes: self.http.max_body_bytes,
            public_url: self.http.public_url.clone(),
            trusted_proxies,
            proxy_header: self.http.proxy_header,
            http_bounds,
            database_url: database_url.into(),
            database_max_connections: self.database.max_connections,
            database_acquire_timeout: Duration::from_secs(self.database.acquire_timeout_seconds),
            settings,
            providers,
            routes,
            dispatch,
            xmpp_component,
            previous_keys,
            login,
            events,
            log_filter: self.log.filter,
        })
    }
}

#[cfg(test)]
// figment's Jail returns its own large error type from test closures.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn the_database_password_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::development(dir.path()).unwrap();
        for (url, shown) in [
            (
                "postgres://registrar:s3cret@db.example.org:5432/registrar?sslmode=require",
                "postgres://registrar:***@db.example.org:5432/registrar?sslmode=require",
            ),
            (
                "postgres://db.example.org/registrar?user=r&password=s3cret",
                "postgres://db.example.org/registrar?***",
            ),
            ("postgres://registrar@db/r", "postgres://registrar@db/r"),
            (
                "sqlite:///var/lib/registrar.db",
                "sqlite:///var/lib/registrar.db",
            ),
        ] {
            c.database_url = url.to_owned().into();
            let debug = format!("{c:?}");
            assert!(!debug.contains("s3cret"), "{debug}");
            assert!(debug.contains(shown), "{shown} in {debug}");
            assert_eq!(c.database_url.to_string(), shown);
            assert_eq!(c.database_url.expose(), url);
        }
    }
    use figment::Jail;

    fn load_in(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("registrar.toml", toml).unwrap();
        Config::load(Some(Path::new("registrar.toml")), &Overrides::default())
    }

    #[test]
    fn embedded_defaults() {
        Jail::expect_with(|_| {
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.mode, Mode::Development);
            assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
            assert_eq!(c.settings.domain, "localhost");
            assert_eq!(c.data_dir, PathBuf::from("./data"));
            assert_eq!(c.key_file, PathBuf::from("./data/server-key.asc"));
            assert!(c.database_url.ends_with("data/registrar.db"));
            assert!(c.settings.phone_policy.accept_fictional);
            assert_eq!(c.settings.code_length, 6);
            assert_eq!(c.settings.lifetime, Duration::from_secs(600));
            assert_eq!(c.settings.max_attempts, 5);
            assert!(matches!(
                c.providers.as_slice(),
                [ProviderConfig::Development(_)]
            ));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        Jail::expect_with(|jail| {
            let e = load_in(jail, "[http]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n").unwrap_err();
            assert!(e.0.contains("listne"), "{e}");
            let e = load_in(jail, "colour = \"red\"\n").unwrap_err();
            assert!(e.0.contains("colour"), "{e}");
            let e = load_in(
                jail,
                "[[providers]]\nkind = \"development\"\nsendr = \"1\"\n",
            )
            .unwrap_err();
            assert!(e.0.contains("sendr"), "{e}");
            let e = load_in(jail, "[[providers]]\nkind = \"carrier-pigeon\"\n").unwrap_err();
            assert!(e.0.contains("carrier-pigeon"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        Jail::expect_with(|jail| {
            let e = load_in(jail, "[verification]\ncode_length = 3\n").unwrap_err();
            assert!(e.0.contains("verification.code_length"), "{e}");
            let e = load_in(jail, "[http]\nlisten = \"not an address\"\n").unwrap_err();
            assert!(e.0.contains("listen"), "{e}");
            let e = load_in(jail, "[server]\ndomain = \"a b\"\n").unwrap_err();
            assert!(e.0.contains("server.domain"), "{e}");
            let e = load_in(jail, "mode = \"staging\"\n").unwrap_err();
            assert!(e.0.contains("mode"), "{e}");
            let e = load_in(jail, "[phone]\nallowed_types = [\"mobile\", \"fax\"]\n").unwrap_err();
            assert!(e.0.contains("allowed_types"), "{e}");
            let e = load_in(jail, "[database]\nurl = \"mysql://x\"\n").unwrap_err();
            assert!(e.0.contains("database.url"), "{e}");
            let e =
                Config::load(Some(Path::new("missing.toml")), &Overrides::default()).unwrap_err();
            assert!(e.0.contains("missing.toml"), "{e}");
            for (toml, key) in [
                ("[abuse.pumping]\nlevels = [5, 1]\n", "abuse.pumping.levels"),
                (
                    "[abuse.pumping]\nslow_below = 0.1\n",
                    "abuse.pumping.slow_below",
                ),
                (
                    "[abuse.pumping]\nslow_factor = 0\n",
                    "abuse.pumping.slow_factor",
                ),
                (
                    "[abuse.pumping]\nblock_after_seconds = 99999\n",
                    "abuse.pumping.block_after_seconds",
                ),
                ("[login]\nbearer_token = \"short\"\n", "login.bearer_token"),
                (
                    "[login]\nallowed_ips = [\"somewhere\"]\n",
                    "login.allowed_ips",
                ),
                (
                    "[accounts]\nsignature_max_age_seconds = 5\n",
                    "accounts.signature_max_age_seconds",
                ),
                (
                    "[events]\nwebhook_url = \"ftp://x\"\n",
                    "events.webhook_url",
                ),
                (
                    "[events]\nwebhook_secret = \"s\"\n",
                    "events.webhook_secret",
                ),
                (
                    "[events]\nxmpp_to = \"admin@localhost\"\n",
                    "events.xmpp_to",
                ),
                (
                    "[[server.previous_keys]]\nkey_file = \"old.asc\"\nuntil = \"next year\"\n",
                    "server.previous_keys.until",
                ),
            ] {
                let e = load_in(jail, toml).unwrap_err();
                assert!(e.0.contains(key), "{toml}: {e}");
            }
            let c = load_in(
                jail,
                "[events]\nwebhook_url = \"http://127.0.0.1:9/e\"\n\
                 [[server.previous_keys]]\nkey_file = \"old.asc\"\nuntil = \"2027-03-01T00:00:00Z\"\n",
            )
            .unwrap();
            assert_eq!(c.settings.event_sinks, vec!["webhook".to_owned()]);
            assert_eq!(
                c.previous_keys[0].1.to_rfc3339(),
                "2027-03-01T00:00:00+00:00"
            );
            Ok(())
        });
    }

    #[test]
    fn environment_overlays_file_and_flags_overlay_both() {
        Jail::expect_with(|jail| {
            jail.set_env("REGISTRAR_HTTP__LISTEN", "127.0.0.1:9001");
            jail.set_env("REGISTRAR_VERIFICATION__CODE_LENGTH", "8");
            jail.set_env("REGISTRAR_CONFIG", "ignored.toml");
            let c = load_in(
                jail,
                "[verification]\ncode_length = 4\n[server]\ndomain = \"a.org\"\n",
            )
            .unwrap();
            assert_eq!(c.http_listen.to_string(), "127.0.0.1:9001");
            assert_eq!(c.settings.code_length, 8);
            assert_eq!(c.settings.domain, "a.org");
            let c = Config::load(
                Some(Path::new("registrar.toml")),
                &Overrides {
                    data_dir: Some("/tmp/x".into()),
                    http: Some("127.0.0.1:9002".parse().unwrap()),
                    domain: Some("B.org".into()),
                },
            )
            .unwrap();
            assert_eq!(c.http_listen.to_string(), "127.0.0.1:9002");
            assert_eq!(c.settings.domain, "b.org");
            assert_eq!(c.key_file, PathBuf::from("/tmp/x/server-key.asc"));
            jail.set_env("REGISTRAR_NO_SUCH_KEY", "1");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.0.contains("no_such_key"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn production_needs_explicit_key_secret_and_real_providers() {
        Jail::expect_with(|jail| {
            let e = load_in(jail, "mode = \"production\"\n").unwrap_err();
            assert!(e.0.contains("server.key_file"), "{e}");
            let e = load_in(
                jail,
                "mode = \"production\"\n[server]\nkey_file = \"k.asc\"\n",
            )
            .unwrap_err();
            assert!(e.0.contains("server.secret"), "{e}");
            let secret = "ab".repeat(32);
            jail.set_env("REGISTRAR_SERVER__SECRET", &secret);
            let e = load_in(
                jail,
                "mode = \"production\"\n[server]\nkey_file = \"k.asc\"\n",
            )
            .unwrap_err();
            assert!(e.0.contains("providers"), "{e}");
            let e = load_in(
                jail,
                "mode = \"production\"\n[server]\nkey_file = \"k.asc\"\n[[providers]]\nkind = \"development\"\n",
            )
            .unwrap_err();
            assert!(e.0.contains("providers[0].kind"), "{e}");
            jail.set_env("REGISTRAR_SERVER__SECRET", "short");
            let e = load_in(jail, "").unwrap_err();
            assert!(e.0.contains("server.secret"), "{e}");
            assert!(!e.0.contains("short"), "the secret must not be echoed: {e}");
            Ok(())
        });
    }

    #[test]
    fn the_example_file_parses_states_the_defaults_and_documents_every_key() {
        let example = include_str!("../registrar.example.toml");
        Jail::expect_with(|jail| {
            jail.create_file("example.toml", example)?;
            let parsed: FileConfig = Figment::new()
                .merge(Toml::file_exact("example.toml"))
                .extract()?;
            let mut expected = FileConfig::default();
            let dev = FileConfig::default().validate().unwrap().providers;
            expected.providers = dev.clone();
            assert_eq!(parsed, expected, "the example must state the defaults");
            Config::load(Some(Path::new("example.toml")), &Overrides::default()).unwrap();

            let mut keys = Vec::new();
            fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
                if let serde_json::Value::Object(map) = v {
                    for (k, v) in map {
                        match v {
                            serde_json::Value::Object(_) => walk(k, v, out),
                            _ => out.push(format!("{prefix}.{k}")),
                        }
                    }
                }
            }
            let mut sample = FileConfig::default();
            sample.xmpp.component = Some(ComponentSection {
                server: default_component_server(),
                jid: "register.localhost".into(),
                secret: Some("s".into()),
                secret_file: Some("f".into()),
                ping_interval_seconds: 60,
            });
            sample.routes.push(RouteConfig {
                prefix: "+39".into(),
                challenge: Some(Challenge::Pin),
                providers: vec!["development".into()],
            });
            walk("", &serde_json::to_value(&sample).unwrap(), &mut keys);
            if let serde_json::Value::Object(route) =
                serde_json::to_value(&sample.routes[0]).unwrap()
            {
                keys.extend(route.keys().map(|k| format!("routes.{k}")));
            }
            walk(
                "providers",
                &serde_json::to_value(&dev[0]).unwrap(),
                &mut keys,
            );
            walk(
                "abuse.costs",
                &serde_json::to_value(CostConfig {
                    provider: "p".into(),
                    country: Some("44".into()),
                    price: 0.1,
                })
                .unwrap(),
                &mut keys,
            );
            walk(
                "abuse.test_numbers",
                &serde_json::to_value(TestNumberConfig {
                    phone: "+15555550100".into(),
                    code: "246810".into(),
                })
                .unwrap(),
                &mut keys,
            );
            keys.push("abuse.caps.countries".into());
            for key in keys {
                let name = key.rsplit('.').next().unwrap();
                let documented = example.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{name} =")) || l.starts_with(&format!("{name}:"))
                });
                assert!(
                    documented || ["providers", "routes", "costs", "test_numbers"].contains(&name),
                    "{key} is not in the example"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn abuse_settings_are_parsed_and_checked_by_key() {
        Jail::expect_with(|jail| {
            let c = load_in(
                jail,
                "[abuse]\nallow_countries = [\"+39\", \"DE\"]\ndeny_prefixes = [\"+882 16\"]\n\
                 trusted_ips = [\"10.0.0.0/8\", \"2001:db8::1\"]\n\
                 [abuse.start]\nper_ip = \"3/10m\"\nper_number = \"off\"\nper_prefix = \"1/1d\"\n\
                 per_country = \"5/1h\"\nglobal = \"9/1s\"\n\
                 [abuse.caps]\ncountries = { \"DE\" = 7 }\n\
                 [[abuse.costs]]\nprovider = \"development\"\ncountry = \"+39\"\nprice = 0.05\n\
                 [[abuse.test_numbers]]\nphone = \"+1 555 555 0100\"\ncode = \"2468\"\n",
            )
            .unwrap();
            let a = &c.settings.abuse;
            assert_eq!(a.lists.allow_countries, ["39", "49"]);
            assert_eq!(a.lists.deny_prefixes, ["88216"]);
            assert_eq!(a.lists.trusted_ips.len(), 2);
            assert_eq!(a.start.ip.unwrap().to_string(), "3/10m");
            assert_eq!(a.start.number, None);
            assert_eq!(a.caps.for_country("49"), Some(7));
            assert_eq!(a.costs[0].country, "39");
            assert_eq!(a.test_numbers["+15555550100"], "2468");
            for (toml, key) in [
                (
                    "[abuse]\ndeny_countries = [\"US\"]\n",
                    "abuse.deny_countries",
                ),
                (
                    "[abuse]\ndeny_countries = [\"IT\"]\n",
                    "shares calling code +39 with VA",
                ),
                (
                    "[abuse]\ndeny_countries = [\"+999\"]\n",
                    "abuse.deny_countries",
                ),
                ("[abuse]\ndeny_ips = [\"10.0.0.0/33\"]\n", "abuse.deny_ips"),
                (
                    "[abuse.check]\nper_ip = \"5 per hour\"\nper_number = \"off\"\nper_prefix = \"off\"\nper_country = \"off\"\nglobal = \"off\"\n",
                    "abuse.check.per_ip",
                ),
                (
                    "[abuse.pumping]\nmin_completion = 1.5\n",
                    "abuse.pumping.min_completion",
                ),
                (
                    "[[abuse.test_numbers]]\nphone = \"12\"\ncode = \"2468\"\n",
                    "abuse.test_numbers[0].phone",
                ),
                (
                    "[[abuse.test_numbers]]\nphone = \"+15555550100\"\ncode = \"12\"\n",
                    "abuse.test_numbers[0].code",
                ),
                (
                    "[http]\ntrusted_proxies = [\"proxy\"]\n",
                    "http.trusted_proxies",
                ),
            ] {
                let e = load_in(jail, toml).unwrap_err();
                assert!(e.0.contains(key), "{toml}: {e}");
            }
            // In production a test number's code must not be trivial.
            jail.set_env("REGISTRAR_SERVER__SECRET", "ab".repeat(32));
            let e = load_in(
                jail,
                "mode = \"production\"\n[server]\nkey_file = \"k.asc\"\n[[providers]]\n\
                 kind = \"generic\"\nname = \"g\"\nurl = \"https://sms.example/send\"\nsender = \"x\"\n\
                 [[abuse.test_numbers]]\nphone = \"+15555550100\"\ncode = \"0000\"\n",
            )
            .unwrap_err();
            assert!(e.0.contains("abuse.test_numbers[0].code"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn component_settings_are_checked_and_the_secret_is_redacted() {
        Jail::expect_with(|jail| {
            let c = load_in(
                jail,
                "[xmpp.component]\njid = \"Register.Localhost\"\nsecret = \"s3cret\"\n",
            )
            .unwrap();
            let comp = c.xmpp_component.clone().unwrap();
            assert_eq!(comp.jid, "register.localhost");
            assert_eq!(comp.server.to_string(), "127.0.0.1:5347");
            assert_eq!(comp.secret.expose(), "s3cret");
            assert!(
                !format!("{c:?}").contains("s3cret"),
                "Debug shows no secret"
            );
            let e = load_in(jail, "[xmpp.component]\njid = \"register.localhost\"\n").unwrap_err();
            assert!(e.0.contains("xmpp.component.secret"), "{e}");
            let e = load_in(jail, "[xmpp.component]\nsecret = \"x\"\n").unwrap_err();
            assert!(e.0.contains("jid"), "{e}");
            let e = load_in(jail, "[xmpp.component]\njid = \"a b\"\nsecret = \"x\"\n").unwrap_err();
            assert!(e.0.contains("xmpp.component.jid"), "{e}");
            let e = load_in(
                jail,
                "[xmpp.component]\njid = \"r.l\"\nsecret = \"x\"\nserver = \"localhost:5347\"\n",
            )
            .unwrap_err();
            assert!(e.0.contains("server"), "{e}");
            jail.set_env("REGISTRAR_XMPP__COMPONENT__SECRET", "from-env");
            let c = load_in(jail, "[xmpp.component]\njid = \"r.l\"\n").unwrap();
            assert_eq!(c.xmpp_component.unwrap().secret.expose(), "from-env");
            Ok(())
        });
    }

    #[test]
    fn real_providers_parse_route_and_build_in_production() {
        Jail::expect_with(|jail| {
            jail.set_env("REGISTRAR_SERVER__SECRET", "ab".repeat(32));
            jail.set_env("TEST_TWILIO_TOKEN", "tok-secret-value");
            let toml = r#"
mode = "production"
[server]
key_file = "k.asc"
[[providers]]
kind = "twilio"
name = "tw"
account_sid = "AC0123456789abcdef0123456789abcdef"
auth_token = { env = "TEST_TWILIO_TOKEN" }
mode = "messaging"
from = "+15005550006"
[[routes]]
prefix = "+39"
providers = ["tw"]
"#;
            let c = load_in(jail, toml).unwrap();
            assert!(matches!(
                c.providers.as_slice(),
                [ProviderConfig::Twilio(_)]
            ));
            assert_eq!(c.routes[0].prefix, "39");
            assert!(!format!("{c:?}").contains("tok-secret-value"));
            let built = crate::build_providers(&c).unwrap();
            assert_eq!(built[0].name(), "tw");

            let e = load_in(
                jail,
                &toml.replace(
                    "mode = \"messaging\"",
                    "mode = \"messaging\"\nfrom_number = \"1\"",
                ),
            )
            .unwrap_err();
            assert!(e.0.contains("from_number"), "{e}");
            let e = load_in(
                jail,
                &toml.replace("providers = [\"tw\"]", "providers = [\"nope\"]"),
            )
            .unwrap_err();
            assert!(
                e.0.contains("routes[0].providers") && e.0.contains("nope"),
                "{e}"
            );
            let e = load_in(
                jail,
                &toml.replace("prefix = \"+39\"", "prefix = \"italy\""),
            )
            .unwrap_err();
            assert!(e.0.contains("routes[0].prefix"), "{e}");
            let all_kinds = format!(
                "{toml}\n{}",
                r#"
[[providers]]
kind = "vonage"
name = "vg"
api_key = "abcd1234"
api_secret = "vonage-secret-value"
mode = "sms"
from = "Kontalk"
[[providers]]
kind = "checkmobi"
secret_key = "checkmobi-secret-value"
[[providers]]
kind = "generic"
name = "gw"
url = "https://sms.example.net/send?to={to}&text={text}"
method = "get"
sender = "12345"
"#
            );
            let c = load_in(jail, &all_kinds).unwrap();
            let names: Vec<_> = crate::build_providers(&c)
                .unwrap()
                .iter()
                .map(|p| p.name().to_owned())
                .collect();
            assert_eq!(names, ["tw", "vg", "checkmobi", "gw"]);
            let debug = format!("{c:?}");
            assert!(
                !debug.contains("vonage-secret-value") && !debug.contains("checkmobi-secret-value")
            );
            let e = load_in(
                jail,
                &format!("{toml}\n[[providers]]\nkind = \"android_emulator\"\n"),
            )
            .unwrap_err();
            assert!(e.0.contains("providers[1].kind"), "{e}");
            jail.set_env("TEST_TWILIO_TOKEN", "");
            let c = load_in(jail, toml).unwrap();
            let e = crate::build_providers(&c).err().unwrap().to_string();
            assert!(
                e.contains("providers[0] (tw)") && e.contains("TEST_TWILIO_TOKEN"),
                "{e}"
            );
            Ok(())
        });
    }
}
