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
    /// Operator tools for the abuse counters: spend, daily caps, SMS-pumping blocks.
    #[command(subcommand)]
    Abuse(AbuseCommand),
    /// Login (bridge) certificates.
    #[command(subcommand)]
    LoginCert(LoginCertCommand),
}

#[derive(Subcommand)]
enum LoginCertCommand {
    /// Checks a login certificate (PEM or DER) as the XMPP server would: the certificate, our
    /// certification on its key, and that the key is the account's current key in the
    /// database. Prints the account and exits 0, or prints the failed check and exits 1.
    Verify {
        /// The certificate file (`-` for standard input).
        file: PathBuf,
        /// Print the result as JSON (`{"jid", "account", "fingerprint"}` or `{"refused", "check"}`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum AbuseCommand {
    /// Prints the messages and their cost per day, provider, country and challenge, today's
    /// daily-cap counters, and the blocked prefixes.
    Report {
        /// UTC days to cover, today included.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=3660))]
        days: u32,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Lifts the SMS-pumping measure (block or missed calls) of an E.164 prefix (`+4479111`), or of
    /// a country by its calling code (`+44`).
    Unblock {
        /// The blocked prefix, as the report shows it.
        prefix: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
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
        /// Base URL of the service's HTTP API (default http://127.0.0.1:8080). With --xmpp, the
        /// server key is fetched from it to check the certification, when given.
        #[arg(long)]
        server: Option<String>,
        /// Register as Kontalk's clients do, over XMPP at HOST:PORT (an XMPP server with the
        /// modules in prosody/), instead of the HTTP API.
        #[arg(long, value_name = "HOST:PORT")]
        xmpp: Option<String>,
        /// The XMPP domain of the accounts (default: the host of --xmpp).
        #[arg(long, requires = "xmpp")]
        xmpp_domain: Option<String>,
        /// PEM certificates to trust for the XMPP server's TLS certificate (default: the
        /// system's roots).
        #[arg(long, requires = "xmpp", value_name = "FILE")]
        xmpp_ca: Option<PathBuf>,
        /// Accept any TLS certificate from the XMPP server (development servers only).
        #[arg(long, requires = "xmpp", conflicts_with = "xmpp_ca")]
        xmpp_insecure: bool,
        /// Also write a key pack (kontalk-keys.zip) as Kontalk's Android client exports it.
        #[arg(long, value_name = "FILE", requires = "passphrase_file")]
        keypack: Option<PathBuf>,
        /// File whose first line is the key pack's passphrase.
        #[arg(long, value_name = "FILE", requires = "keypack")]
        passphrase_file: Option<PathBuf>,
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
    // Colours only on a terminal: a log collected from a pipe or a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
        Command::Abuse(AbuseCommand::Report { days, config }) => {
            let config = load(&config, None)?;
            init_logging(&config.log_filter);
            let app = kontalk_registrar::offline_app(config).await?;
            print!("{}", abuse_report(&app, days).await?);
            Ok(())
        }
        Command::Abuse(AbuseCommand::Unblock { prefix, config }) => {
            let digits = prefix.trim().trim_start_matches('+');
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                anyhow::bail!("{prefix:?} is not an E.164 prefix (digits, `+` optional)");
            }
            let config = load(&config, None)?;
            init_logging(&config.log_filter);
            let app = kontalk_registrar::offline_app(config).await?;
            if app.registrar.unblock(digits).await? {
                println!("+{digits}: pumping measure lifted");
            } else {
                println!("+{digits}: had no pumping measure");
            }
            Ok(())
        }
        Command::LoginCert(LoginCertCommand::Verify { file, json, config }) => {
            let input = if file.as_os_str() == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(std::io::stdin(), 1024 * 1024 + 1),
                    &mut buf,
                )?;
                if buf.len() > 1024 * 1024 {
                    anyhow::bail!("standard input: larger than 1 MiB, not a login certificate");
                }
                buf
            } else {
                let size = std::fs::metadata(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
                    .len();
                if size > 1024 * 1024 {
                    anyhow::bail!(
                        "{}: larger than 1 MiB, not a login certificate",
                        file.display()
                    );
                }
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let config = load(&config, None)?;
            init_logging("warn");
            let app = kontalk_registrar::offline_app(config).await?;
            let outcome = app.registrar.check_login(input).await;
            // Close the database before a refusal exits the process.
            drop(app);
            match outcome {
                Ok(id) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"jid": id.jid, "account": id.account, "fingerprint": id.fingerprint})
                        );
                    } else {
                        println!("accepted {}", id.jid);
                        println!("account {}", id.account);
                        println!("fingerprint {}", id.fingerprint);
                    }
                    Ok(())
                }
                Err(kontalk_registrar::registrar::Error::LoginRefused(r)) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"refused": r.to_string(), "check": r.code()})
                        );
                    } else {
                        println!("refused {}: {r}", r.code());
                    }
                    std::process::exit(1);
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Client(ClientCommand::Register {
            phone,
            server,
            xmpp,
            xmpp_domain,
            xmpp_ca,
            xmpp_insecure,
            keypack,
            passphrase_file,
            force,
            challenge,
            code,
            out,
            rsa,
            name,
            accept_terms,
        }) => {
            init_logging("warn");
            let keypack = match (keypack, passphrase_file) {
                (Some(path), Some(file)) => {
                    let text = zeroize::Zeroizing::new(
                        std::fs::read_to_string(&file)
                            .with_context(|| format!("cannot read {}", file.display()))?,
                    );
                    let passphrase = text.lines().next().unwrap_or("").to_owned();
                    if passphrase.is_empty() {
                        anyhow::bail!(
                            "{}: the first line (the passphrase) is empty",
                            file.display()
                        );
                    }
                    Some(client::KeypackOptions {
                        path,
                        passphrase: zeroize::Zeroizing::new(passphrase),
                    })
                }
                _ => None,
            };
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
                xmpp: xmpp.map(|address| client::xmpp::XmppOptions {
                    address,
                    domain: xmpp_domain,
                    ca_file: xmpp_ca,
                    insecure: xmpp_insecure,
                }),
                keypack,
            })
            .await?;
            if let Some(bound) = &r.logged_in_as {
                println!("logged in as {bound}");
            }
            if let Some(pack) = &r.keypack {
                println!("key pack {}", pack.display());
            }
            println!("registered {}", r.jid);
            println!("fingerprint {}", r.fingerprint);
            println!("certified key {}", r.public_binary.display());
            println!("certified key (armored) {}", r.public_armored.display());
            println!("secret key {}", r.secret_armored.display());
            println!("login certificate {}", r.certificate.display());
            println!("login certificate key {}", r.certificate_key.display());
            Ok(())
        }
    }
}

/// Rows of cells as plain text, each column as wide as its widest cell; the columns whose index
/// is in `right` are aligned right (numbers).
fn table(rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            if widths.len() <= i {
                widths.push(w);
            } else {
                widths[i] = widths[i].max(w);
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let w = widths[i];
            if right.contains(&i) {
                line.push_str(&format!("{cell:>w$}"));
            } else {
                line.push_str(&format!("{cell:<w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `+39 IT/VA`: a calling code with (some of) the regions that share it.
fn country_label(code: &str) -> String {
    let regions = code
        .parse::<u16>()
        .ok()
        .and_then(|c| phonenumber::metadata::DATABASE.region(&c))
        .unwrap_or_default();
    match regions.len() {
        0 => format!("+{code}"),
        1..=3 => format!("+{code} {}", regions.join("/")),
        _ => format!("+{code} {}/…", regions[..2].join("/")),
    }
}

fn utc_day(day: i64) -> String {
    chrono::DateTime::from_timestamp(day.saturating_mul(86_400), 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| day.to_string())
}

/// The text of `abuse report`: spend over the last `days` UTC days, today's daily-cap counters,
/// the blocked prefixes.
async fn abuse_report(app: &kontalk_registrar::App, days: u32) -> anyhow::Result<String> {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    let registrar = &app.registrar;
    let abuse = &registrar.settings().abuse;
    let currency = &abuse.currency;
    let mut out = String::new();

    let mut lines = registrar.spend_report(days).await?;
    lines.sort_by(|a, b| {
        let (a, b) = (&a.record, &b.record);
        (a.day, &a.provider, &a.country, a.challenge.as_str()).cmp(&(
            b.day,
            &b.provider,
            &b.country,
            b.challenge.as_str(),
        ))
    });
    writeln!(out, "Messages sent, last {days} UTC day(s):")?;
    if lines.is_empty() {
        writeln!(out, "  (none)")?;
    } else {
        let mut rows = vec![
            [
                "DAY",
                "PROVIDER",
                "COUNTRY",
                "CHALLENGE",
                "MESSAGES",
                "COST",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let (mut messages, mut priced, mut total) = (0u64, 0u64, 0f64);
        for l in &lines {
            let r = &l.record;
            messages += r.messages;
            if let Some(c) = l.cost {
                priced += r.messages;
                total += c;
            }
            rows.push(vec![
                utc_day(r.day),
                r.provider.clone(),
                country_label(&r.country),
                r.challenge.to_string(),
                r.messages.to_string(),
                l.cost
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.4} {currency}")),
            ]);
        }
        rows.push(vec![
            "total".to_owned(),
            String::new(),
            String::new(),
            String::new(),
            messages.to_string(),
            if priced == 0 {
                "-".to_owned()
            } else {
                format!("{total:.4} {currency}")
            },
        ]);
        out.push_str(&table(&rows, &[4, 5]));
        if priced < messages {
            writeln!(
                out,
                "{} message(s) have no price in abuse.costs and are not in the total",
                messages - priced
            )?;
        }
    }

    // Every configured cap, with today's count (0 when nothing was reserved under it).
    let mut counters: BTreeMap<String, u64> = registrar.sent_today().await?.into_iter().collect();
    if abuse.caps.total.is_some() {
        counters.entry("total".to_owned()).or_default();
    }
    for code in abuse.caps.countries.keys() {
        counters.entry(format!("country:{code}")).or_default();
    }
    let today = app.clock.now().timestamp().div_euclid(86_400);
    writeln!(out, "\nDaily caps, today ({} UTC):", utc_day(today))?;
    if counters.is_empty() {
        writeln!(out, "  (no caps configured, no messages today)")?;
    } else {
        let mut rows = vec![["SCOPE", "SENT", "CAP"].map(String::from).to_vec()];
        for (scope, sent) in &counters {
            let cap = match scope.strip_prefix("country:") {
                Some(code) => abuse.caps.for_country(code),
                None if scope == "total" => abuse.caps.total,
                None => None,
            };
            let label = match scope.strip_prefix("country:") {
                Some(code) => format!("country {}", country_label(code)),
                None => scope.clone(),
            };
            rows.push(vec![
                label,
                sent.to_string(),
                cap.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            ]);
        }
        out.push_str(&table(&rows, &[1, 2]));
    }

    let blocks = registrar.blocks().await?;
    writeln!(
        out,
        "\nPumping measures (block: nothing is sent; call: missed calls replace texts):"
    )?;
    if blocks.is_empty() {
        writeln!(out, "  (none)")?;
    } else {
        let mut rows = vec![
            ["SCOPE", "MEASURE", "SINCE", "UNTIL", "REASON"]
                .map(String::from)
                .to_vec(),
        ];
        let when =
            |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for b in &blocks {
            let scope = match (
                b.scope.strip_prefix("prefix:"),
                b.scope.strip_prefix("country:"),
            ) {
                (Some(digits), _) => format!("+{digits}"),
                (None, Some(code)) => format!("+{code} (country)"),
                _ => b.scope.clone(),
            };
            rows.push(vec![
                scope,
                b.measure.as_str().to_owned(),
                when(b.created_at),
                when(b.until),
                b.reason.clone(),
            ]);
        }
        out.push_str(&table(&rows, &[]));
    }
    Ok(out)
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
