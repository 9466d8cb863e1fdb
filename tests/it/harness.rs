//! Starts the real service for a test: real HTTP listener, real SQLite in a temporary data
//! directory, a manual clock, and a capturing provider (or the configured ones).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use kontalk_registrar::clock::{Clock, ManualClock};
use kontalk_registrar::config::Config;
use kontalk_registrar::{Listeners, Services};
use registrar_providers::{CapturingProvider, Provider};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const EMULATOR: &str = "+15555215554";
pub const EMULATOR_ACCOUNT: &str = "4bdd4f929f3a1062253e4e496bafba0bdfb5db75";

pub struct TestServer {
    pub base: String,
    /// The database the server uses (SQLite in its data directory, or a PostgreSQL database).
    pub db_url: String,
    pub clock: ManualClock,
    pub provider: CapturingProvider,
    pub http: reqwest::Client,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub async fn from(r: reqwest::Response) -> Self {
        TestServer::reply(r).await
    }

    pub fn problem_type(&self) -> &str {
        self.body["type"]
            .as_str()
            .and_then(|t| t.strip_prefix("urn:kontalk-registrar:problem:"))
            .unwrap_or("")
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse().unwrap())
    }
}

/// With `KONTALK_TEST_POSTGRES` set (by scripts/test), a fresh PostgreSQL database for one test.
pub async fn postgres_database() -> Option<String> {
    let server = std::env::var("KONTALK_TEST_POSTGRES").ok()?;
    let name = format!("t_{}", unique_suffix());
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{server}/postgres"))
        .await
        .expect("the test PostgreSQL answers");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    Some(format!("{server}/{name}"))
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The store of the database `url`, opened beside the server (to look inside).
pub async fn open_store(url: &str) -> Box<dyn kontalk_registrar::registrar::ports::Store> {
    if url.starts_with("postgres") {
        Box::new(
            kontalk_registrar::store::PgStore::open(url, 1, Duration::from_secs(10))
                .await
                .unwrap(),
        )
    } else {
        Box::new(
            kontalk_registrar::store::SqliteStore::open(url, 1)
                .await
                .unwrap(),
        )
    }
}

/// Runs one SQL statement on the database `url` from outside the service (to break or inspect
/// it).
pub async fn execute(url: &str, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    if url.starts_with("postgres") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

impl TestServer {
    /// A server on the embedded defaults with a capturing provider.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server whose configuration `tweak` adjusts.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let provider = CapturingProvider::new("capture", "12345");
        let clock = ManualClock::new(chrono::Utc::now());
        Self::start_in(
            dir,
            clock,
            vec![Arc::new(provider.clone())],
            provider,
            tweak,
        )
        .await
    }

    /// A server on `port` (known in advance, for URLs that name it) with `providers`.
    pub async fn start_on(
        port: u16,
        providers: Vec<Arc<dyn Provider>>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let clock = ManualClock::new(chrono::Utc::now());
        let unused = CapturingProvider::new("unused", "0");
        Self::start_at(
            tempfile::tempdir().unwrap(),
            clock,
            providers,
            unused,
            tweak,
            port,
        )
        .await
    }

    /// A server in `dir` (kept across restarts) with `providers`.
    pub async fn start_in(
        dir: TempDir,
        clock: ManualClock,
        providers: Vec<Arc<dyn Provider>>,
        provider: CapturingProvider,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_at(dir, clock, providers, provider, tweak, 0).await
    }

    async fn start_at(
        dir: TempDir,
        clock: ManualClock,
        providers: Vec<Arc<dyn Provider>>,
        provider: CapturingProvider,
        tweak: impl FnOnce(&mut Config),
        port: u16,
    ) -> Self {
        let mut config = Config::development(dir.path()).unwrap();
        // A restart on the same data directory finds the same PostgreSQL database.
        let remembered = dir.path().join("test-postgres-url");
        if let Ok(url) = std::fs::read_to_string(&remembered) {
            config.database_url = url.into();
        } else if let Some(url) = postgres_database().await {
            std::fs::write(&remembered, &url).unwrap();
            config.database_url = url.into();
        }
        tweak(&mut config);
        let db_url = config.database_url.expose().to_owned();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let services = Services {
            clock: Some(Arc::new(clock.clone()) as Arc<dyn Clock>),
            providers: Some(providers),
        };
        let task = tokio::spawn(kontalk_registrar::run_with(
            config,
            Listeners { http: listener },
            async move {
                let _ = stopped.await;
            },
            services,
        ));
        let server = Self {
            base,
            db_url,
            clock,
            provider,
            http: http_client(),
            dir,
            stop: Some(stop),
            task: Some(task),
        };
        // Wait until it answers (start-up generates the key and runs migrations).
        for _ in 0..200 {
            if let Ok(r) = server.http.get(server.url("/healthz")).send().await
                && r.status().is_success()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the server did not come up");
    }

    pub fn clock_now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn reply(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        if status >= 400 && status != 405 {
            assert_eq!(
                headers["content-type"], "application/problem+json",
                "errors are problem+json"
            );
        }
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        Self::reply(
            self.http
                .post(self.url(path))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        Self::reply(
            self.http
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn get_text(&self, path: &str) -> String {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        assert!(r.status().is_success());
        r.text().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::reply(self.http.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        Self::reply(self.http.delete(self.url(path)).send().await.unwrap()).await
    }

    /// Starts a verification for `phone`; returns the reply.
    pub async fn start_verification(&self, phone: &str, force: bool) -> Reply {
        self.post("/v1/verifications", json!({"phone": phone, "force": force}))
            .await
    }

    /// The last code the capturing provider delivered to `phone`.
    pub fn code_for(&self, phone: &str) -> String {
        self.provider
            .last_code(phone)
            .expect("a code was delivered")
    }

    /// Submits `code` and `key` (binary) for verification `id`.
    pub async fn submit(&self, id: &str, code: &str, key: &[u8]) -> Reply {
        self.post(
            &format!("/v1/verifications/{id}/code"),
            json!({"code": code, "public_key": b64(key)}),
        )
        .await
    }

    /// Registers `phone` with a fresh Ed25519 key; returns the key and the verify reply.
    pub async fn register(&self, phone: &str, force: bool) -> (sequoia_openpgp::Cert, Reply) {
        let started = self.start_verification(phone, force).await;
        assert_eq!(started.status, 201, "{:?}", started.body);
        let id = started.body["id"].as_str().unwrap().to_owned();
        let jid = started.body["account"].as_str().unwrap().to_owned();
        let key = user_key(&jid);
        let reply = self.submit(&id, &self.code_for(phone), &public(&key)).await;
        (key, reply)
    }

    /// Stops the server gracefully and returns its data directory.
    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Kills the server without a graceful shutdown (a crash) and returns its data directory.
    pub fn crash(mut self) -> TempDir {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// A client key whose User ID names `jid`, as Kontalk clients make them.
pub fn user_key(jid: &str) -> sequoia_openpgp::Cert {
    kontalk_registrar::openpgp::generate_user_key("Test User", jid, false).unwrap()
}

pub fn public(cert: &sequoia_openpgp::Cert) -> Vec<u8> {
    kontalk_registrar::openpgp::public_bytes(cert).unwrap()
}

/// `N` distinct free loopback ports: the listeners are held until all are chosen, so that the
/// system cannot hand out one port twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// Waits until something listens on `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the service on `port` answers `GET /healthz` with 200 (start-up done).
pub fn wait_for_health(port: u16) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let mut reply = String::new();
            if c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_ok()
                && c.read_to_string(&mut reply).is_ok()
                && reply.split_whitespace().nth(1) == Some("200")
            {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service on {port} did not become healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is stopped with SIGTERM (then killed) when dropped.
pub struct Process(pub std::process::Child, pub &'static str);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("{} had to be killed", self.1);
    }
}

/// A TCP forwarder on loopback to `upstream` that can be cut (open connections reset, new ones
/// dropped at once), hung (every connection held open in silence: a database that stalls) and
/// restored: a database that goes away and comes back.
pub struct CuttableProxy {
    pub port: u16,
    /// 0: forwarding; 1: cut; 2: hung.
    state: Arc<std::sync::atomic::AtomicU8>,
    change: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl CuttableProxy {
    pub async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let change = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (state, change) = (state.clone(), change.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let (upstream, state, change) =
                        (upstream.clone(), state.clone(), change.clone());
                    tokio::spawn(async move {
                        match state.load(Ordering::SeqCst) {
                            1 => return,
                            2 => return std::future::pending::<()>().await,
                            _ => {}
                        }
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = change.notified() => {
                                if state.load(Ordering::SeqCst) == 2 {
                                    // Hold both ends open, silent.
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    });
                }
            })
        };
        Self {
            port,
            state,
            change,
            task,
        }
    }

    fn set(&self, state: u8) {
        self.state.store(state, std::sync::atomic::Ordering::SeqCst);
        self.change.notify_waiters();
    }

    /// Resets every open connection and drops new ones until [`CuttableProxy::restore`].
    pub fn cut(&self) {
        self.set(1);
    }

    /// Holds every connection open without a byte in either direction.
    pub fn hang(&self) {
        self.set(2);
    }

    pub fn restore(&self) {
        self.set(0);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
