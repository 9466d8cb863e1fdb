//! kontalk-registrar turns a phone number into a verified messenger account: it checks the
//! number, has a provider deliver a code, and certifies the client's OpenPGP key with the server
//! key once the code comes back.
//!
//! Crate map:
//! - [`registrar`]: the domain core (start, resend, verify, status, cancel) and its one error enum;
//! - [`phone`]: E.164 numbers and Kontalk account ids;
//! - [`openpgp`]: the server key, the policy for users' keys, certification;
//! - [`login_cert`]: the bridge certificates clients log in with: build and verify;
//! - [`events`]: telling the XMPP server that a key was replaced or an account removed;
//! - [`store`]: persistence behind a trait (SQLite, PostgreSQL);
//! - [`http`]: the JSON API;
//! - [`xmpp`]: Kontalk's in-band registration as an XMPP external component, with key rollover,
//!   `<remove/>` from the account's own JID, and events sent as messages;
//! - [`config`]: TOML + environment configuration, validated once;
//! - [`client`]: the `client register` command, a real client of the HTTP API;
//! - [`clock`], [`secret`]: time as a parameter, and the server secret for keyed hashes.
//!
//! [`run`] takes a validated [`Config`], bound listeners and a shutdown future, so that tests bind
//! `127.0.0.1:0` and drive the real service (tokio-rs/mini-redis).
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod client;
pub mod clock;
pub mod config;
pub mod events;
mod fsutil;
pub mod http;
pub mod login_cert;
pub mod openpgp;
pub mod phone;
pub mod registrar;
pub mod secret;
pub mod store;
pub mod xmpp;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use registrar_providers::{DevelopmentProvider, Provider};
use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
pub use crate::config::Config;
use crate::config::{ProviderConfig, SecretSource};
use crate::openpgp::ServerKey;
use crate::registrar::Registrar;
use crate::secret::ServerSecret;
use crate::store::SqliteStore;

/// How often expired verifications are purged.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// The sockets the service answers on, bound by the caller.
pub struct Listeners {
    /// The JSON API.
    pub http: TcpListener,
}

/// Parts a caller (a test) supplies instead of the configured ones.
#[derive(Default)]
pub struct Services {
    /// The clock; the system clock when `None`.
    pub clock: Option<Arc<dyn Clock>>,
    /// The providers; the configured ones when `None`.
    pub providers: Option<Vec<Arc<dyn Provider>>>,
}

/// The service, assembled from its configuration.
pub struct App {
    /// The domain core.
    pub registrar: Arc<Registrar>,
    /// The clock everything uses.
    pub clock: Arc<dyn Clock>,
    config: Config,
}

/// Loads the server key from `config.key_file`, generating it first in development mode.
pub fn load_server_key(config: &Config) -> anyhow::Result<ServerKey> {
    let path = &config.key_file;
    let key = if path.exists() || !config.generate_key {
        ServerKey::load(path)?
    } else {
        let key = ServerKey::generate(&config.settings.domain)?;
        key.save(path)?;
        tracing::info!(
            path = %path.display(),
            fingerprint = %key.fingerprint(),
            "generated a development server key"
        );
        key
    };
    if key.is_rsa() && !config.allow_rsa_key {
        anyhow::bail!(
            "server key {}: RSA signing is not constant-time in the pure-Rust backend; use an \
             Ed25519 key (kontalk-registrar keygen) or set server.allow_rsa_key = true",
            path.display()
        );
    }
    Ok(key)
}

fn load_secret(config: &Config) -> anyhow::Result<ServerSecret> {
    Ok(match &config.secret {
        SecretSource::Inline(s) => s.clone(),
        SecretSource::File { path, generate } => {
            if path.exists() || !generate {
                ServerSecret::load(path)?
            } else {
                let s = ServerSecret::generate();
                s.save(path)?;
                tracing::info!(path = %path.display(), "generated a development server secret");
                s
            }
        }
    })
}

/// The configured providers, in order. Fails when one cannot be built (a credential's
/// environment variable is missing, a template does not parse), naming it.
pub fn build_providers(config: &Config) -> anyhow::Result<Vec<Arc<dyn Provider>>> {
    use registrar_providers::{checkmobi, emulator, generic, twilio, vonage};
    config
        .providers
        .iter()
        .enumerate()
        .map(|(i, p)| -> anyhow::Result<Arc<dyn Provider>> {
            let built: Result<Arc<dyn Provider>, String> = match p {
                ProviderConfig::Development(c) => Ok(Arc::new(DevelopmentProvider::new(
                    &c.name,
                    c.outbox
                        .clone()
                        .unwrap_or_else(|| config.data_dir.join("outbox.jsonl")),
                    &c.sender,
                    &c.caller_prefix,
                    c.challenges.clone(),
                ))),
                ProviderConfig::Twilio(c) => {
                    twilio::TwilioProvider::new(c.clone()).map(|p| Arc::new(p) as _)
                }
                ProviderConfig::Vonage(c) => {
                    vonage::VonageProvider::new(c.clone()).map(|p| Arc::new(p) as _)
                }
                ProviderConfig::CheckMobi(c) => {
                    checkmobi::CheckMobiProvider::new(c.clone()).map(|p| Arc::new(p) as _)
                }
                ProviderConfig::Generic(c) => {
                    generic::GenericProvider::new(c.clone()).map(|p| Arc::new(p) as _)
                }
                ProviderConfig::AndroidEmulator(c) => {
                    emulator::EmulatorProvider::new(c.clone()).map(|p| Arc::new(p) as _)
                }
            };
            built.map_err(|e| anyhow::anyhow!("providers[{i}] ({}): {e}", p.name()))
        })
        .collect()
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The directory holds the generated key and secret: keep it private.
        let mut perms = std::fs::metadata(dir)?.permissions();
        if perms.mode() & 0o077 != 0 {
            perms.set_mode(0o700);
            std::fs::set_permissions(dir, perms)?;
        }
    }
    Ok(())
}

/// The previous server keys (public parts) with the end of their trust.
fn load_previous_keys(config: &Config) -> anyhow::Result<Vec<(sequoia_openpgp::Cert, SystemTime)>> {
    config
        .previous_keys
        .iter()
        .map(|(path, until)| {
            let bytes = std::fs::read(path)
                .with_context(|| format!("server.previous_keys: cannot read {}", path.display()))?;
            let cert = openpgp::parse_cert(&bytes)
                .map_err(|e| anyhow::anyhow!("server.previous_keys: {}: {e}", path.display()))?
                .strip_secret_key_material();
            if until.timestamp() < 0 {
                anyhow::bail!(
                    "server.previous_keys: {}: until is before 1970",
                    path.display()
                );
            }
            Ok((cert, SystemTime::from(*until)))
        })
        .collect()
}

/// Opens the configured database (SQLite or PostgreSQL, by URL) and runs its migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn registrar::ports::Store>> {
    let url = config.database_url.expose();
    let shown = config.database_url.redacted();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = store::PgStore::open(
            url,
            config.database_max_connections,
            config.database_acquire_timeout,
        )
        .await
        .with_context(|| format!("database {shown}"))?;
        return Ok(Arc::new(store));
    }
    create_data_dir(&config.data_dir)?;
    let store = SqliteStore::open(url, config.database_max_connections)
        .await
        .with_context(|| format!("cannot open database {shown}"))?;
    Ok(Arc::new(store))
}

impl App {
    /// Prepares the data directory, key, secret, database and providers.
    pub async fn build(config: Config, services: Services) -> anyhow::Result<Self> {
        create_data_dir(&config.data_dir)?;
        let server_key = Arc::new(load_server_key(&config)?);
        let secret = load_secret(&config)?;
        let store = open_store(&config).await?;
        let providers = match services.providers {
            Some(p) => p,
            None => build_providers(&config)?,
        };
        let clock = services.clock.unwrap_or_else(|| Arc::new(SystemClock));
        for (key, encoding) in config
            .settings
            .templates
            .oversized_sms(&config.settings.service_name, config.settings.code_length)
        {
            tracing::warn!(template = %key, ?encoding, "an SMS template does not fit one message");
        }
        let dispatcher = registrar::Dispatcher::new(
            providers,
            config.routes.clone(),
            config.dispatch,
            clock.clone(),
        );
        let previous = load_previous_keys(&config)?;
        let registrar = Arc::new(
            Registrar::new(
                config.settings.clone(),
                store,
                dispatcher,
                server_key,
                secret,
                clock.clone(),
            )
            .with_previous_keys(previous),
        );
        Ok(Self {
            registrar,
            clock,
            config,
        })
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let purger = {
            let registrar = self.registrar.clone();
            let stop = stopped(stop_rx.clone());
            tokio::spawn(async move {
                tokio::pin!(stop);
                let mut tick = tokio::time::interval(PURGE_INTERVAL);
                loop {
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tick.tick() => match registrar.purge_expired().await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(purged = n, "purged expired verifications"),
                            Err(e) => tracing::warn!(error = %e, "purge failed"),
                        },
                    }
                }
            })
        };

        let webhook = self.config.events.webhook.clone().map(|(url, secret)| {
            tokio::spawn(events::run_webhook(
                self.registrar.clone(),
                url,
                secret,
                stop_rx.clone(),
            ))
        });

        let component = self.config.xmpp_component.clone().map(|c| {
            let jid = xmpp_parsers::jid::Jid::new(&c.jid);
            let registrar = self.registrar.clone();
            let clock = self.clock.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                match jid {
                    Ok(jid) => {
                        let handler = Arc::new(xmpp::Handler::new(registrar, clock, jid));
                        xmpp::component::run(c, handler, stop).await;
                    }
                    Err(e) => tracing::error!(error = %e, "xmpp.component.jid is not a JID"),
                }
            })
        });

        let router = http::router(
            self.registrar.clone(),
            self.clock.clone(),
            http::HttpOptions {
                max_body_bytes: self.config.max_body_bytes,
                public_url: self.config.public_url.clone(),
                trusted_proxies: self.config.trusted_proxies.clone(),
                proxy_header: self.config.proxy_header,
                login: self.config.login.clone(),
            },
        );
        let addr = listeners.http.local_addr()?;
        tracing::info!(
            http = %addr,
            domain = %self.config.settings.domain,
            mode = ?self.config.mode,
            server_key = %self.registrar.server_key().fingerprint(),
            "kontalk-registrar is ready"
        );
        http::serve::serve(
            listeners.http,
            router,
            self.config.http_bounds,
            stopped(stop_rx),
            Duration::from_secs(30),
        )
        .await
        .context("HTTP server failed")?;
        purger.abort();
        if let Some(webhook) = webhook {
            let _ = tokio::time::timeout(Duration::from_secs(5), webhook).await;
        }
        if let Some(component) = component {
            // The component closes its stream when it sees the stop signal.
            let _ = tokio::time::timeout(Duration::from_secs(5), component).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The service on `config`'s data directory, key, secret and database, without providers (none
/// is built, so no credential is needed): for operator commands that read or change the abuse
/// counters offline, beside or instead of a running instance.
pub async fn offline_app(config: Config) -> anyhow::Result<App> {
    let services = Services {
        providers: Some(Vec::new()),
        ..Services::default()
    };
    App::build(config, services).await
}

/// Sends one real test message through the configured provider `name` to `phone` and describes
/// what the provider answered (`kontalk-registrar provider test`).
pub async fn provider_test(
    config: &Config,
    name: &str,
    phone: &str,
    challenge: registrar::Challenge,
) -> anyhow::Result<String> {
    create_data_dir(&config.data_dir)?;
    let providers = build_providers(config)?;
    let Some(provider) = providers.iter().find(|p| p.name() == name) else {
        let names: Vec<&str> = providers.iter().map(|p| p.name()).collect();
        anyhow::bail!(
            "no provider is named {name:?} (configured: {})",
            names.join(", ")
        );
    };
    let number = config.settings.phone_policy.parse(phone)?;
    let code = registrar::Code::generate(config.settings.code_length);
    let message = registrar_providers::Outgoing {
        to: number.as_str().to_owned(),
        challenge,
        code: code.as_str().to_owned(),
        text: config.settings.templates.render(
            challenge,
            None,
            code.as_str(),
            &config.settings.service_name,
        ),
        reference: format!("provider-test-{}", registrar::VerificationId::generate()),
        valid_for: config.settings.lifetime,
        locale: None,
    };
    match tokio::time::timeout(config.dispatch.timeout, provider.send(&message)).await {
        Err(_) => anyhow::bail!(
            "{name}: no answer within {:?} (delivery.timeout_seconds)",
            config.dispatch.timeout
        ),
        Ok(Err(e)) => anyhow::bail!("{name} refused the message ({:?}): {}", e.kind, e.message),
        Ok(Ok(d)) => {
            let code_note = match &d.code {
                registrar_providers::DeliveredCode::Ours => {
                    format!("the code sent is {}", code.as_str())
                }
                registrar_providers::DeliveredCode::Chosen(c) => {
                    format!("the provider chose the code {c}")
                }
                registrar_providers::DeliveredCode::ProviderChecks => {
                    "the provider generated the code and checks it".to_owned()
                }
            };
            Ok(format!(
                "{name} accepted the {challenge} for {}: sender {:?}, provider reference {}; {code_note}",
                number.as_str(),
                d.sender,
                d.provider_ref.as_deref().unwrap_or("(none)"),
            ))
        }
    }
}

/// Runs the service on `config` until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(config, listeners, shutdown, Services::default()).await
}

/// [`run`] with parts supplied by the caller.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    services: Services,
) -> anyhow::Result<()> {
    App::build(config, services)
        .await?
        .serve(listeners, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sequoia_openpgp::cert::prelude::*;
    use sequoia_openpgp::serialize::SerializeInto;

    #[test]
    fn an_rsa_server_key_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (rsa, _) = CertBuilder::new()
            .set_cipher_suite(CipherSuite::RSA2k)
            .set_primary_key_flags(sequoia_openpgp::types::KeyFlags::empty().set_certification())
            .add_userid("rsa <registrar@localhost>")
            .generate()
            .unwrap();
        let path = dir.path().join("rsa.asc");
        std::fs::write(&path, rsa.as_tsk().armored().to_vec().unwrap()).unwrap();
        let mut config = Config::development(dir.path()).unwrap();
        config.key_file = path;
        config.allow_rsa_key = false;
        let e = load_server_key(&config).unwrap_err().to_string();
        assert!(e.contains("RSA") && e.contains("allow_rsa_key"), "{e}");
        config.allow_rsa_key = true;
        assert!(load_server_key(&config).unwrap().is_rsa());
        // Production does not generate a missing key.
        config.key_file = dir.path().join("missing.asc");
        config.generate_key = false;
        assert!(load_server_key(&config).is_err());
        assert!(!config.key_file.exists());
    }
}
