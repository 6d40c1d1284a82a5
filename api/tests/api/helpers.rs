//! `spawn_app`: the real API server on a random port and in-process workers,
//! against the test's own database and RabbitMQ namespace.

use std::future::Future;
use std::time::Duration;

use api::auth::{Scope, Scopes};
use api::startup::{Application, StopHandle};
use serde_json::Value;
use shared::config::Settings;
use shared::job::{Job, JobStatus};
use shared::testing::logs::Logs;
use shared::testing::{AmqpNamespace, settings};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::{Worker, WorkerConfig};

/// Queues every test app has.
pub const QUEUES: &[&str] = &["default", "critical"];

pub struct TestApp {
    pub address: String,
    /// Sends an admin key of tenant `default` with every request.
    pub client: reqwest::Client,
    /// That key.
    pub token: String,
    /// The app's own pool (the API and workers share it).
    pub pool: PgPool,
    pub settings: Settings,
    pub amqp: AmqpNamespace,
    server: StopHandle,
    workers: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

/// Starts the API for the database `#[sqlx::test]` created.
pub async fn spawn_app(connect: PgConnectOptions) -> TestApp {
    spawn_app_with(connect, |_| {}).await
}

/// Like [`spawn_app`], after `configure` edits the settings.
pub async fn spawn_app_with(connect: PgConnectOptions, configure: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        shared::telemetry::init(shared::config::LogFormat::Pretty);
    }
    let amqp = AmqpNamespace::new(QUEUES);
    let mut settings = settings(&connect, &amqp);
    settings.queues.insert("critical".to_owned(), shared::config::QueueSettings { max_depth: 1_000_000, weight: 2 });
    configure(&mut settings);
    let pool =
        PgPoolOptions::new().max_connections(32).acquire_timeout(Duration::from_secs(10)).connect_lazy_with(connect);
    let app = Application::build_with_pool(settings.clone(), pool.clone()).await.expect("the API starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let server = app.handle();
    tokio::spawn(app.run_until_stopped());
    let token = key(&pool, "default", &[Scope::Admin]).await;
    let client = client_with(&token);
    TestApp { address, client, token, pool, settings, amqp, server, workers: Vec::new() }
}

/// Runs `api <args>` (the real binary) configured like the test app.
pub async fn api_cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"));
    command.args(args).env_clear().envs(shared::testing::child_env(&app.settings));
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the CLI finishes")
        .expect("the CLI runs")
}

/// Starts `api serve` as a process of its own, configured like `settings`,
/// and returns it (killed on drop) once it accepts connections, with its
/// `host:port`.
pub async fn spawn_api_process(settings: &Settings) -> (tokio::process::Child, String) {
    spawn_api_process_with(settings, 0, |_| ()).await
}

/// Like [`spawn_api_process`], on `port` (a replica restarted where its load
/// balancer expects it).
pub async fn spawn_api_process_on(settings: &Settings, port: u16) -> tokio::process::Child {
    spawn_api_process_with(settings, port, |_| ()).await.0
}

/// Like [`spawn_api_process`], with its JSON log lines kept.
pub async fn spawn_logged_api_process(settings: &Settings) -> (tokio::process::Child, String, Logs) {
    let (mut server, address) = spawn_api_process_with(settings, 0, |command| {
        command.env("CONVEYOR__LOG__FORMAT", "json").env("RUST_LOG", "info").stderr(std::process::Stdio::piped());
    })
    .await;
    let logs = Logs::capture(server.stderr.take().expect("stderr is piped"));
    (server, address, logs)
}

/// `port` 0: any free one.
async fn spawn_api_process_with(
    settings: &Settings,
    port: u16,
    configure: impl FnOnce(&mut tokio::process::Command),
) -> (tokio::process::Child, String) {
    let port = match port {
        0 => free_port(),
        given => given,
    };
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"));
    command
        .arg("serve")
        .env_clear()
        .envs(shared::testing::child_env(settings))
        .env("CONVEYOR__HTTP__PORT", port.to_string())
        .kill_on_drop(true);
    configure(&mut command);
    let server = command.spawn().expect("api serve starts");
    let address = format!("127.0.0.1:{port}");
    let up =
        wait_until(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(&address).await.is_ok() }).await;
    assert!(up, "the server did not start listening");
    (server, address)
}

/// The worker binary, as a process of its own configured like `settings`,
/// consuming `default`, its JSON log lines kept. It is the workspace's
/// `worker` binary beside `api`'s: `cargo test --workspace` builds both.
pub fn spawn_logged_worker_process(settings: &Settings) -> (tokio::process::Child, Logs) {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_api")).with_file_name("worker");
    assert!(
        binary.exists(),
        "{} is missing: build it (cargo build -p worker; cargo test --workspace does)",
        binary.display()
    );
    let mut worker = tokio::process::Command::new(binary)
        .args(["--queues", "default", "--concurrency", "2"])
        .env_clear()
        .envs(shared::testing::child_env(settings))
        .env("CONVEYOR__LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker binary starts");
    let logs = Logs::capture(worker.stderr.take().expect("stderr is piped"));
    (worker, logs)
}

/// The workspace's root directory.
pub fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root")
}

/// A YAML sequence's strings (empty when it is not a sequence).
pub fn strings(yaml: &yaml_rust2::Yaml) -> Vec<String> {
    yaml.as_vec().map(|items| items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// The settings a deployment's environment (`key`, `value` pairs) gives a
/// Conveyor process, after checking that Conveyor reads every key; `what`
/// names the deployment in failures.
pub fn deployed_settings(what: &str, env: &[(String, String)]) -> Settings {
    for (key, _) in env {
        assert!(
            key.starts_with("CONVEYOR__") || ["DATABASE_URL", "AMQP_URL", "RUST_LOG"].contains(&key.as_str()),
            "{what}: environment key {key} is not read by Conveyor"
        );
    }
    Settings::from_layers(None, env).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port()
}

/// Creates an API key of `tenant` with `scopes` and returns its token.
pub async fn key(pool: &PgPool, tenant: &str, scopes: &[Scope]) -> String {
    let (_, token) =
        api::auth::keys::create(pool, tenant, Some("test"), Scopes::of(scopes), None).await.expect("key created");
    token
}

/// An HTTP client that sends `token` as its bearer token.
pub fn client_with(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii token");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().default_headers(headers).build().expect("client")
}

impl TestApp {
    /// Starts an in-process worker on `queues` with `concurrency` slots.
    pub fn spawn_worker(&mut self, queues: &[&str], concurrency: u16) {
        self.spawn_worker_with(self.settings.clone(), queues, concurrency);
    }

    /// Like [`spawn_worker`](Self::spawn_worker), with settings of its own.
    pub fn spawn_worker_with(&mut self, settings: Settings, queues: &[&str], concurrency: u16) {
        self.spawn(settings, self.pool.clone(), queues, concurrency);
    }

    /// Like [`spawn_worker`](Self::spawn_worker), on a pool of its own.
    pub fn spawn_worker_on(&mut self, pool: PgPool, queues: &[&str], concurrency: u16) {
        self.spawn(self.settings.clone(), pool, queues, concurrency);
    }

    fn spawn(&mut self, settings: Settings, pool: PgPool, queues: &[&str], concurrency: u16) {
        let config = WorkerConfig { queues: queues.iter().map(|q| (*q).to_owned()).collect(), concurrency };
        let worker = Worker::new(settings, pool, config).expect("valid worker config");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        self.workers.push((shutdown, handle));
    }

    /// Stops every worker gracefully and waits until each has.
    pub async fn stop_workers(&mut self) {
        for (shutdown, _) in &self.workers {
            shutdown.cancel();
        }
        for (_, handle) in self.workers.drain(..) {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("worker failed: {e:#}"),
                Err(e) => panic!("worker panicked: {e}"),
            }
        }
    }

    /// Stops workers, then the server, then closes the pool, so that
    /// `#[sqlx::test]` can drop the database.
    pub async fn stop(mut self) {
        self.stop_workers().await;
        self.server.stop().await;
        self.pool.close().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `POST /v1/jobs` with a JSON body.
    pub async fn submit(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/v1/jobs")).json(body).send().await.expect("request sent")
    }

    /// Submits a job that must be accepted, and returns it.
    pub async fn submit_ok(&self, body: &Value) -> Job {
        let response = self.submit(body).await;
        assert_eq!(response.status(), 202, "submission of {body} refused");
        response.json().await.expect("a job in the body")
    }

    pub async fn get_job(&self, id: uuid::Uuid) -> Job {
        let response = self.client.get(self.url(&format!("/v1/jobs/{id}"))).send().await.expect("request sent");
        assert_eq!(response.status(), 200);
        response.json().await.expect("a job in the body")
    }

    /// Polls the API until the job satisfies `done`, for at most `limit`.
    pub async fn wait_for(&self, id: uuid::Uuid, limit: Duration, done: impl Fn(&Job) -> bool) -> Job {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let job = self.get_job(id).await;
            if done(&job) {
                return job;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("job {id} did not get there within {limit:?}; last seen: {job:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the job is terminal.
    pub async fn wait_terminal(&self, id: uuid::Uuid) -> Job {
        self.wait_for(id, Duration::from_secs(30), |job| job.status.is_terminal()).await
    }

    /// Rows in `jobs`, to show that a refused request wrote nothing.
    pub async fn job_count(&self) -> i64 {
        shared::testing::db::count(&self.pool, None, None).await
    }

    /// Jobs in `status`.
    pub async fn count_in(&self, status: JobStatus) -> i64 {
        shared::testing::db::count(&self.pool, Some(status), None).await
    }
}

/// Lets `http` jobs reach local test endpoints (by default they may not).
pub fn allow_loopback(settings: &mut Settings) {
    settings.jobs.http.allow = vec!["127.0.0.1/32".to_owned()];
}

/// Statements waiting for a lock on the jobs table (held by a test to make
/// the API's statements queue up).
pub async fn waiting_for_jobs_table(pool: &PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'jobs'::regclass")
        .fetch_one(pool)
        .await
        .unwrap_or_default()
}

/// Re-checks `condition` every few milliseconds until it holds (true) or
/// `limit` passes (false). The bound keeps a broken test from hanging CI.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A local HTTP endpoint for `http` jobs: answers every request with the
/// current status and records what it received.
pub struct Endpoint {
    pub url: String,
    pub port: u16,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    location: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    body: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    server: actix_web::dev::ServerHandle,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Endpoint {
    pub async fn start(status: u16) -> Self {
        use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
        use std::sync::atomic::Ordering;

        let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(status));
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let location = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let answer_body = std::sync::Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let (s, r, l, b) = (status.clone(), received.clone(), location.clone(), answer_body.clone());
        let server = HttpServer::new(move || {
            let (s, r, l, b) = (s.clone(), r.clone(), l.clone(), b.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (s, r, l, b) = (s.clone(), r.clone(), l.clone(), b.clone());
                async move {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                        .collect();
                    if let Ok(mut log) = r.lock() {
                        log.push(Received {
                            method: req.method().to_string(),
                            path: req.path().to_owned(),
                            headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                        });
                    }
                    let code = actix_web::http::StatusCode::from_u16(s.load(Ordering::SeqCst))
                        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
                    let mut answer = HttpResponse::build(code);
                    if let Some(location) = l.lock().ok().and_then(|l| l.clone()) {
                        answer.insert_header((actix_web::http::header::LOCATION, location));
                    }
                    match b.lock().ok().and_then(|b| b.clone()) {
                        Some(bytes) => answer.body(bytes),
                        None => answer.body(format!("answered {}", code.as_u16())),
                    }
                }
            }))
        })
        .workers(1)
        .disable_signals()
        .bind("127.0.0.1:0")
        .expect("bind");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url: format!("http://127.0.0.1:{port}"),
            port,
            status,
            location,
            body: answer_body,
            received,
            server: handle,
        }
    }

    /// Answers every request with these bytes as the body.
    pub fn answer_with(&self, body: &[u8]) {
        if let Ok(mut b) = self.body.lock() {
            *b = Some(body.to_vec());
        }
    }

    /// Answers every request with `302 Found` to `location`.
    pub fn redirect_to(&self, location: &str) {
        if let Ok(mut l) = self.location.lock() {
            *l = Some(location.to_owned());
        }
        self.answer(302);
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|log| log.clone()).unwrap_or_default()
    }

    pub async fn stop(self) {
        self.server.stop(true).await;
    }
}
