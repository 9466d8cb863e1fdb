//! The `kontalk-registrar` command: parses arguments, loads the configuration, and calls the
//! library. Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kontalk_registrar::config::{Config, Overrides};
use kontalk_registrar::{Listeners, client, load_server_key, openpgp};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "kontalk-registrar",
    version,
    about = "Phone-number verification and OpenPGP key certification for XMPP messengers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, env = "REGISTRAR_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, generated key and secret, development outbox).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// XMPP domain of the accounts.
    #[arg(long)]
    domain: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the service.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address and port of the HTTP API.
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<SocketAddr>,
    },
    /// Creates or upgrades the database schema, then exits.
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Generates an Ed25519 server key (secret, armored, mode 0600).
    Keygen {
        /// Where to write the key; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
        /// Domain named in the key's User ID.
        #[arg(long, default_value = "localhost")]
        domain: String,
    },
    /// Prints the configured server key's public part (ASCII armor).
    ExportServerKey {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// A client of the HTTP API.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Operator tools for providers.
    #[command(subcommand)]
    Provider(ProviderCommand),
}

#[derive(Subcommand)]
enum ProviderCommand {
    /// Sends a real test message through one configured provider and prints what it answered.
    Test {
        /// The provider's configured name.
        name: String,
        /// Destination number, international.
        phone: String,
        /// Challenge: pin, voice or missedcall.
        #[arg(long, default_value = "pin")]
        challenge: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Registers a phone number: verification, key generation, certification.
    Register {
        /// The phone number, international (`+15555215554`).
        phone: String,
        /// Base URL of the service.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        server: String,
        /// Replace an existing account (new device, new key).
        #[arg(long)]
        force: bool,
        /// Challenge: pin, voice or missedcall.
        #[arg(long)]
        challenge: Option<String>,
        /// The code, when known in advance; otherwise it is asked for on the terminal.
        #[arg(long)]
        code: Option<String>,
        /// Directory for the key files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Generate an RSA-2048 key, as Kontalk's clients do (default Ed25519).
        #[arg(long)]
        rsa: bool,
        /// Name in the key's User ID.
        #[arg(long, default_value = "Kontalk user")]
        name: String,
        /// Accept the server's terms of service.
        #[arg(long)]
        accept_terms: bool,
    },
}

fn load(args: &ConfigArgs, http: Option<SocketAddr>) -> anyhow::Result<Config> {
    Ok(Config::load(
        args.config.as_deref(),
        &Overrides {
            data_dir: args.data_dir.clone(),
            http,
            domain: args.domain.clone(),
        },
    )?)
}

fn init_logging(filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, http } => {
            let config = load(&config, http)?;
            init_logging(&config.log_filter);
            let listener = tokio::net::TcpListener::bind(config.http_listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.http_listen))?;
            kontalk_registrar::run(config, Listeners { http: listener }, shutdown_signal()).await
        }
        Command::Migrate { config } => {
            let config = load(&config, None)?;
            init_logging(&config.log_filter);
            let store = kontalk_registrar::open_store(&config).await?;
            println!(
                "{} database is up to date (schema version {})",
                store.kind(),
                store.schema_version().await?
            );
            Ok(())
        }
        Command::Keygen { out, domain } => {
            let key = openpgp::ServerKey::generate(&domain)?;
            key.save(&out)?;
            println!("{}", key.fingerprint());
            Ok(())
        }
        Command::ExportServerKey { config } => {
            let config = load(&config, None)?;
            init_logging(&config.log_filter);
            std::fs::create_dir_all(&config.data_dir)?;
            let key = load_server_key(&config)?;
            print!("{}", key.public_armored());
            Ok(())
        }
        Command::Provider(ProviderCommand::Test {
            name,
            phone,
            challenge,
            config,
        }) => {
            let config = load(&config, None)?;
            init_logging(&config.log_filter);
            let challenge = challenge
                .parse()
                .map_err(|e| anyhow::anyhow!("--challenge: {e}"))?;
            let answer =
                kontalk_registrar::provider_test(&config, &name, &phone, challenge).await?;
            println!("{answer}");
            Ok(())
        }
        Command::Client(ClientCommand::Register {
            phone,
            server,
            force,
            challenge,
            code,
            out,
            rsa,
            name,
            accept_terms,
        }) => {
            init_logging("warn");
            let r = client::register(&client::RegisterOptions {
                phone,
                server,
                force,
                challenge,
                code,
                out_dir: out,
                rsa,
                name,
                accept_terms,
            })
            .await?;
            println!("registered {}", r.jid);
            println!("fingerprint {}", r.fingerprint);
            println!("certified key {}", r.public_binary.display());
            println!("certified key (armored) {}", r.public_armored.display());
            println!("secret key {}", r.secret_armored.display());
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kontalk-registrar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
