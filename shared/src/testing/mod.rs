//! Helpers for integration tests (feature `test-util`): settings pointed at a
//! per-test database and a per-test RabbitMQ namespace that is deleted when
//! the test ends, even when it panics; the environment of a child binary
//! configured the same way; a TCP proxy to cut connections; and, in [`db`],
//! what tests read and poke in the database.

pub mod db;
pub mod logs;
pub mod scrape;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sqlx::postgres::PgConnectOptions;

use crate::config::Settings;
use crate::queue::Names;
use crate::queue::rabbitmq;

/// The broker tests use: `AMQP_URL` when set, else the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Settings for a helper's own short connection to the test broker.
fn amqp_settings(namespace: &str) -> crate::config::AmqpSettings {
    crate::config::AmqpSettings {
        url: amqp_url(),
        namespace: namespace.to_owned(),
        confirm_timeout_ms: 5000,
        heartbeat_seconds: 10,
        lanes: 1,
        jobs_per_message: 16,
    }
}

/// `amqp.lanes` of the tests that need several (the default's).
pub const FAIRNESS_TEST_LANES: u16 = 8;

/// A RabbitMQ namespace of one test. Dropping it deletes its queues and exchanges.
#[derive(Debug)]
pub struct AmqpNamespace {
    pub name: String,
    queues: Vec<String>,
}

impl AmqpNamespace {
    pub fn new(queues: &[&str]) -> Self {
        let name = format!("test-{}", uuid::Uuid::now_v7().simple());
        Self { name, queues: queues.iter().map(|q| (*q).to_owned()).collect() }
    }
}

impl Drop for AmqpNamespace {
    fn drop(&mut self) {
        let names = Names::new(&self.name);
        // Lanes a test may have asked for (deleting a queue that is not there is harmless).
        let lanes = FAIRNESS_TEST_LANES;
        let mut queues: Vec<String> =
            self.queues.iter().flat_map(|q| names.lanes(q, lanes).collect::<Vec<_>>()).collect();
        queues.push(names.dead_letter_queue());
        let exchange = names.dead_letter_exchange();
        // Drop cannot await, and the test's runtime may be shutting down: clean
        // up on a thread of our own with a small runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let settings = amqp_settings("cleanup");
                let Ok(connection) = rabbitmq::connect(&settings, "conveyor-test-cleanup").await else {
                    return;
                };
                let Ok(channel) = connection.create_channel().await else {
                    return;
                };
                for queue in queues {
                    let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
                }
                let _ = channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await;
                let _ = connection.close(200, "bye".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A job of `kind` for tenant `default` on queue `default`, as the API would
/// build it from `{"type": kind, "payload": payload}`, for tests that insert
/// jobs without going through HTTP.
pub fn new_job(kind: &str, payload: serde_json::Value) -> crate::job::NewJob {
    crate::job::NewJob {
        lane: 0,
        message_id: None,
        traceparent: None,
        id: uuid::Uuid::now_v7(),
        tenant: "default".to_owned(),
        queue: "default".to_owned(),
        kind: kind.to_owned(),
        payload: match crate::job::RawJson::of(&payload) {
            Ok(payload) => payload,
            Err(e) => panic!("a test payload is JSON: {e}"),
        },
        priority: 0,
        max_attempts: 5,
        timeout_seconds: 60,
        run_at: None,
        idempotency_key: None,
        request_id: None,
    }
}

/// Settings for a test: the defaults, pointed at the test's database (as
/// `#[sqlx::test]` made it) and RabbitMQ namespace, listening on a random port.
pub fn settings(db: &PgConnectOptions, namespace: &AmqpNamespace) -> Settings {
    let mut settings = match Settings::defaults() {
        Ok(settings) => settings,
        Err(e) => panic!("built-in defaults are invalid: {e}"),
    };
    settings.database.url = format!(
        "postgres://{}@{}:{}/{}",
        db.get_username(),
        db.get_host(),
        db.get_port(),
        db.get_database().unwrap_or("postgres")
    );
    settings.amqp.url = amqp_url();
    settings.amqp.namespace = namespace.name.clone();
    settings.http.port = 0;
    settings.http.workers = 2;
    settings.database.migrate_on_start = false;
    // Tests submit far faster than a tenant's default limit, all from one
    // address; the rate-limit tests turn the limits back on.
    settings.rate_limit.tenant_per_second = 0;
    settings.rate_limit.ip_per_second = 0;
    // One lane per queue: every lane is a RabbitMQ queue to declare and
    // delete, and a hundred tests declaring eight per queue at once slowed
    // the broker for all of them. The fairness tests ask for lanes.
    settings.amqp.lanes = 1;
    // Tests run many workers at once; the health port tests pick a port each.
    settings.worker.http_port = 0;
    // A stopping test server need not wait for its clients' idle
    // connections; the rolling-restart test drains as shipped.
    settings.http.drain_ms = 0;
    settings
}

/// The environment of a child `api` or `worker` process configured like
/// `settings` (the test's database, RabbitMQ namespace and worker timings),
/// for `Command::env_clear().envs(…)`. `RUST_LOG` passes through, `warn` by default.
pub fn child_env(settings: &Settings) -> Vec<(String, String)> {
    let (worker, amqp) = (&settings.worker, &settings.amqp);
    let fixed = [
        ("DATABASE_URL", settings.database.url.clone()),
        ("AMQP_URL", amqp.url.clone()),
        ("CONVEYOR__AMQP__NAMESPACE", amqp.namespace.clone()),
        ("CONVEYOR__AMQP__HEARTBEAT_SECONDS", amqp.heartbeat_seconds.to_string()),
        ("CONVEYOR__AMQP__LANES", amqp.lanes.to_string()),
        ("CONVEYOR__AMQP__JOBS_PER_MESSAGE", amqp.jobs_per_message.to_string()),
        ("CONVEYOR__DATABASE__MIGRATE_ON_START", "false".to_owned()),
        ("CONVEYOR__WORKER__HEARTBEAT_SECONDS", worker.heartbeat_seconds.to_string()),
        ("CONVEYOR__WORKER__LEASE_SECONDS", worker.lease_seconds.to_string()),
        ("CONVEYOR__WORKER__RECONCILE_INTERVAL_MS", worker.reconcile_interval_ms.to_string()),
        ("CONVEYOR__WORKER__LEADER_TTL_SECONDS", worker.leader_ttl_seconds.to_string()),
        ("CONVEYOR__WORKER__OUTBOX_GRACE_SECONDS", worker.outbox_grace_seconds.to_string()),
        ("CONVEYOR__WORKER__SHUTDOWN_GRACE_SECONDS", worker.shutdown_grace_seconds.to_string()),
        ("CONVEYOR__WORKER__HTTP_PORT", worker.http_port.to_string()),
        ("CONVEYOR__HTTP__DRAIN_MS", settings.http.drain_ms.to_string()),
        ("CONVEYOR__RATE_LIMIT__TENANT_PER_SECOND", settings.rate_limit.tenant_per_second.to_string()),
        ("CONVEYOR__RATE_LIMIT__TENANT_BURST", settings.rate_limit.tenant_burst.to_string()),
        ("CONVEYOR__RATE_LIMIT__IP_PER_SECOND", settings.rate_limit.ip_per_second.to_string()),
        ("CONVEYOR__RATE_LIMIT__BACKEND", format!("{:?}", settings.rate_limit.backend).to_lowercase()),
        ("CONVEYOR__RATE_LIMIT__REDIS_URL", settings.rate_limit.redis_url.clone()),
        ("CONVEYOR__TELEMETRY__OTLP_ENDPOINT", settings.telemetry.otlp_endpoint.clone()),
        ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned())),
    ];
    let mut env: Vec<(String, String)> = fixed.into_iter().map(|(key, value)| (key.to_owned(), value)).collect();
    // Queues beyond the built-in `default` exist only when named.
    for (name, queue) in &settings.queues {
        env.push((format!("CONVEYOR__QUEUES__{}__WEIGHT", name.to_uppercase()), queue.weight.to_string()));
    }
    env
}

/// A short-lived connection and channel to the test broker, for looking at queues.
async fn channel() -> lapin::Channel {
    let settings = amqp_settings("inspect");
    let connection = match rabbitmq::connect(&settings, "conveyor-test-inspect").await {
        Ok(connection) => connection,
        Err(e) => panic!("tests need RabbitMQ at {}: {e}", amqp_url()),
    };
    match connection.create_channel().await {
        Ok(channel) => channel,
        Err(e) => panic!("could not open a channel: {e}"),
    }
}

impl AmqpNamespace {
    /// Messages ready in Conveyor queue `queue` (not counting unacknowledged ones).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.depth_of(&Names::new(&self.name).queue(queue)).await
    }

    /// Messages ready in the dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        self.depth_of(&Names::new(&self.name).dead_letter_queue()).await
    }

    async fn depth_of(&self, rabbit_queue: &str) -> u32 {
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        match channel().await.queue_declare(rabbit_queue.into(), options, Default::default()).await {
            Ok(queue) => queue.message_count(),
            Err(e) => panic!("queue {rabbit_queue} does not exist: {e}"),
        }
    }

    /// Deletes the ready messages of Conveyor queue `queue`, as an operator's
    /// purge (or a lost broker node) would; returns how many went.
    pub async fn purge(&self, queue: &str) -> u32 {
        let rabbit_queue = Names::new(&self.name).queue(queue);
        match channel().await.queue_purge(rabbit_queue.into(), Default::default()).await {
            Ok(purged) => purged,
            Err(e) => panic!("queue.purge failed: {e}"),
        }
    }

    /// Takes `n` messages off Conveyor queue `queue` without acknowledging
    /// them, as a worker holding them in its prefetch would: they stay
    /// delivered (not ready) until the returned value is dropped.
    pub async fn hold(&self, queue: &str, n: u16) -> HeldMessages {
        use futures_lite::StreamExt as _;
        let channel = channel().await;
        let rabbit_queue = Names::new(&self.name).queue(queue);
        let consumed = async {
            channel.basic_qos(n, Default::default()).await?;
            let mut consumer = channel
                .basic_consume(rabbit_queue.into(), "holder".into(), Default::default(), Default::default())
                .await?;
            for _ in 0..n {
                if let Some(delivery) = consumer.next().await {
                    delivery?;
                }
            }
            Ok::<_, lapin::Error>(consumer)
        };
        match consumed.await {
            Ok(consumer) => HeldMessages { _consumer: consumer, _channel: channel },
            Err(e) => panic!("could not take messages: {e}"),
        }
    }

    /// Declares Conveyor queue `queue` as a plain durable queue, without the
    /// arguments Conveyor gives it: what a much older version would have left.
    pub async fn declare_plain(&self, queue: &str) {
        let rabbit_queue = Names::new(&self.name).queue(queue);
        let options = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
        if let Err(e) = channel().await.queue_declare(rabbit_queue.into(), options, Default::default()).await {
            panic!("queue.declare failed: {e}");
        }
    }

    /// Takes one message off Conveyor queue `queue`, in the order a consumer would get it.
    pub async fn take(&self, queue: &str) -> Option<(Vec<u8>, lapin::BasicProperties)> {
        let rabbit_queue = Names::new(&self.name).queue(queue);
        let options = lapin::options::BasicGetOptions { no_ack: true };
        match channel().await.basic_get(rabbit_queue.into(), options).await {
            Ok(message) => message.map(|m| (m.delivery.data, m.delivery.properties)),
            Err(e) => panic!("basic.get failed: {e}"),
        }
    }

    /// Publishes raw bytes to Conveyor queue `queue`, as a misbehaving producer would.
    pub async fn publish_raw(&self, queue: &str, body: &[u8]) {
        let channel = channel().await;
        let confirmed = async {
            channel.confirm_select(Default::default()).await?;
            let rabbit_queue = Names::new(&self.name).queue(queue);
            channel
                .basic_publish("".into(), rabbit_queue.into(), Default::default(), body, Default::default())
                .await?
                .await
        };
        if let Err(e) = confirmed.await {
            panic!("raw publish failed: {e}");
        }
    }
}

/// Messages taken and not acknowledged (see [`AmqpNamespace::hold`]); dropping
/// this closes their connection, and RabbitMQ puts them back in their queue.
pub struct HeldMessages {
    _consumer: lapin::Consumer,
    _channel: lapin::Channel,
}

/// A TCP proxy for breaking connections on purpose: it forwards to
/// `upstream` until [`cut`](Proxy::cut), which severs every live connection
/// and refuses new ones until [`restore`](Proxy::restore).
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => panic!("proxy cannot bind: {e}"),
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let (cut_flag, live_conns) = (cut.clone(), live.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if cut_flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                if let Ok(mut live) = live_conns.lock() {
                    live.retain(|handle| !handle.is_finished());
                    live.push(relay.abort_handle());
                }
            }
        });
        Self { port, cut, live, accept }
    }

    /// Severs every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut live) = self.live.lock() {
            for relay in live.drain(..) {
                relay.abort();
            }
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// `url` with its host and port replaced by this proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some((userinfo, hostpath)) => (format!("{userinfo}@"), hostpath),
            None => (String::new(), rest),
        };
        let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
        format!("{scheme}://{userinfo}127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Makes a made-up process the reconciler's leader (for a minute), for tests
/// that call the reconciler's statements directly; its term fences them.
pub async fn lead(db: &sqlx::PgPool) -> crate::db::leadership::Term {
    use crate::db::leadership::{self, Claim};
    let holder = uuid::Uuid::now_v7();
    match leadership::claim(db, leadership::RECONCILER, holder, std::time::Duration::from_secs(60)).await {
        Ok(Claim::Held { term, .. }) => term,
        Ok(Claim::Elsewhere { holder, .. }) => panic!("the reconciler's leadership is held by {holder}"),
        Err(e) => panic!("could not take the reconciler's leadership: {e}"),
    }
}
