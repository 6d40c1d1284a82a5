//! API replicas behind nginx (deploy/nginx.conf, run by `scripts/stack
//! balance`) broken on purpose while clients submit through it: a replica
//! and a worker killed and started again; every replica restarted in turn.
//! Clients do what the README asks of them: each submission carries an
//! Idempotency-Key, and what is retryable (a connection error, 502, 503 with
//! `Retry-After`, 504) is sent again with the same key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use shared::job::JobStatus;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::Child;
use uuid::Uuid;

use crate::helpers::{
    TestApp, client_with, free_port, root, spawn_api_process, spawn_api_process_on, spawn_app_with,
    spawn_logged_worker_process, wait_until,
};

/// nginx over the replicas on `ports`, on a port of its own; killed on drop.
struct Balancer {
    _nginx: Child,
    url: String,
    dir: PathBuf,
}

impl Balancer {
    async fn start(ports: &[u16]) -> Self {
        let dir = std::env::temp_dir().join(format!("conveyor-nginx-{}", Uuid::now_v7()));
        let port = free_port();
        let script = root().join("scripts/stack");
        let nginx = tokio::process::Command::new(script)
            .arg("balance")
            .arg(&dir)
            .arg(port.to_string())
            .args(ports.iter().map(u16::to_string))
            .kill_on_drop(true)
            .spawn()
            .expect("scripts/stack balance starts");
        let url = format!("http://127.0.0.1:{port}");
        let health = format!("{url}/healthz");
        let up = wait_until(Duration::from_secs(10), || async {
            reqwest::get(&health).await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(up, "nginx did not answer (is it unpacked? scripts/setup)");
        Self { _nginx: nginx, url, dir }
    }
}

impl Balancer {
    /// nginx's error log so far, first lines first (why it answered 502).
    fn errors(&self, lines: usize) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default();
        log.lines().take(lines).map(str::to_owned).collect()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    accepted: Vec<Uuid>,
    /// Retryable answers, by kind, each followed by a retry.
    retried: BTreeMap<String, u32>,
    /// Anything else: a client must never see it.
    wrong: Vec<String>,
}

/// Clients submitting through the balancer until stopped.
struct Traffic {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(balancer: &Balancer, token: &str, clients: usize) -> Self {
        let (tally, stop) = (Arc::new(Mutex::new(Tally::default())), Arc::new(AtomicBool::new(false)));
        let url = format!("{}/v1/jobs", balancer.url);
        let clients = (0..clients)
            .map(|_| tokio::spawn(submit_until_stopped(client_with(token), url.clone(), stop.clone(), tally.clone())))
            .collect();
        Self { tally, stop, clients }
    }

    fn accepted(&self) -> usize {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner).accepted.len()
    }

    /// Until `n` more submissions than now have been accepted.
    async fn more(&self, n: usize) {
        let target = self.accepted() + n;
        let reached = wait_until(Duration::from_secs(60), || async { self.accepted() >= target }).await;
        assert!(reached, "traffic stalled at {} accepted", self.accepted());
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("client task");
        }
        Arc::try_unwrap(self.tally).expect("clients are done").into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn submit_until_stopped(http: reqwest::Client, url: String, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let note = |f: &dyn Fn(&mut Tally)| f(&mut tally.lock().unwrap_or_else(PoisonError::into_inner));
    while !stop.load(Ordering::Relaxed) {
        let key = Uuid::now_v7().to_string();
        for attempt in 1.. {
            let sent = http
                .post(&url)
                .header("Idempotency-Key", &key)
                .json(&json!({"type": "noop"}))
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            let retryable = match sent {
                Ok(answer) if answer.status().is_success() => {
                    let job: Value = answer.json().await.unwrap_or_default();
                    match job["id"].as_str().and_then(|id| id.parse::<Uuid>().ok()) {
                        Some(id) => note(&|t| t.accepted.push(id)),
                        None => note(&|t| t.wrong.push(format!("a success without a job id: {job}"))),
                    }
                    break;
                }
                Ok(answer) if matches!(answer.status().as_u16(), 502 | 504) => answer.status().as_u16().to_string(),
                Ok(answer) if answer.status() == 503 && answer.headers().contains_key("retry-after") => "503".into(),
                Ok(answer) => {
                    let status = answer.status();
                    let body = answer.text().await.unwrap_or_default();
                    note(&|t| t.wrong.push(format!("{status}: {body}")));
                    break;
                }
                Err(e) if e.is_timeout() => "timeout".into(),
                Err(_) => "connection error".into(),
            };
            note(&|t| *t.retried.entry(retryable.clone()).or_default() += 1);
            if attempt == 20 {
                note(&|t| t.wrong.push(format!("still {retryable} after {attempt} tries")));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `n` API processes configured like `app`, and their ports.
async fn spawn_replicas(app: &TestApp, n: usize) -> (Vec<Child>, Vec<u16>) {
    let (mut apis, mut ports) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (api, address) = spawn_api_process(&app.settings).await;
        apis.push(api);
        ports.push(address.rsplit(':').next().and_then(|port| port.parse().ok()).expect("host:port"));
    }
    (apis, ports)
}

async fn terminate(child: &mut Child) {
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("drained in 30 s");
    assert!(exited.expect("exit status").success(), "a clean exit after SIGTERM");
}

async fn kill(child: &mut Child) {
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
}

/// Every accepted job ends `succeeded`, and the jobs table holds exactly the
/// accepted ones: none lost, none made twice by a retry.
async fn every_accepted_job_succeeds(app: &TestApp, accepted: &[Uuid]) {
    let count = |status: Option<&'static str>| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND ($2::text IS NULL OR status = $2)",
        )
        .bind(accepted)
        .bind(status)
        .fetch_one(&app.pool)
        .await
        .expect("count")
    };
    let all = i64::try_from(accepted.len()).expect("a count");
    let done =
        wait_until(Duration::from_secs(60), || async { count(Some(JobStatus::Succeeded.as_str())).await == all }).await;
    assert!(done, "{} of {all} accepted jobs succeeded", count(Some("succeeded")).await);
    assert_eq!(app.job_count().await, all, "the jobs table holds exactly the accepted jobs");
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_replica_and_a_worker_killed_mid_traffic_lose_no_job(_: PgPoolOptions, connect: PgConnectOptions) {
    // A killed worker's jobs are rescued once their lease lapses.
    let app = spawn_app_with(connect, |s| {
        s.worker.heartbeat_seconds = 1;
        s.worker.lease_seconds = 3;
    })
    .await;
    let (mut apis, ports) = spawn_replicas(&app, 3).await;
    let mut workers: Vec<Child> = (0..2).map(|_| spawn_logged_worker_process(&app.settings).0).collect();
    let balancer = Balancer::start(&ports).await;
    let traffic = Traffic::start(&balancer, &app.token, 8);

    traffic.more(100).await;
    kill(&mut apis[1]).await;
    traffic.more(150).await;
    kill(&mut workers[0]).await;
    traffic.more(150).await;
    apis[1] = spawn_api_process_on(&app.settings, ports[1]).await;
    workers[0] = spawn_logged_worker_process(&app.settings).0;
    traffic.more(150).await;
    let tally = traffic.stop().await;

    eprintln!("killed: {} accepted, retried {:?}", tally.accepted.len(), tally.retried);
    assert!(
        tally.wrong.is_empty(),
        "clients saw what they cannot retry: {:?}; nginx said {:#?}",
        tally.wrong,
        balancer.errors(8)
    );
    every_accepted_job_succeeds(&app, &tally.accepted).await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_rolling_restart_of_the_replicas_loses_no_request(_: PgPoolOptions, connect: PgConnectOptions) {
    // As shipped (the tests' settings stop at once).
    let app = spawn_app_with(connect, |s| s.http.drain_ms = 1000).await;
    let (mut apis, ports) = spawn_replicas(&app, 3).await;
    let _worker = spawn_logged_worker_process(&app.settings).0;
    let balancer = Balancer::start(&ports).await;
    let traffic = Traffic::start(&balancer, &app.token, 8);

    traffic.more(100).await;
    // As an operator would: the next replica only once the last is back in
    // nginx's rotation (nginx leaves a replica it could not reach alone
    // for 5 s, then tries it again).
    for (api, port) in apis.iter_mut().zip(&ports) {
        terminate(api).await;
        *api = spawn_api_process_on(&app.settings, *port).await;
        let metrics = format!("http://127.0.0.1:{port}/metrics");
        let serving = wait_until(Duration::from_secs(30), || async {
            let scraped = reqwest::get(&metrics).await.ok();
            let text = match scraped {
                Some(answer) => answer.text().await.unwrap_or_default(),
                None => String::new(),
            };
            text.lines().any(|line| line.starts_with("conveyor_api_requests_total") && line.contains("status=\"202\""))
        })
        .await;
        assert!(serving, "the restarted replica on {port} got no submission through nginx");
    }
    let tally = traffic.stop().await;

    eprintln!("rolling restart: {} accepted, retried {:?}", tally.accepted.len(), tally.retried);
    assert!(tally.wrong.is_empty(), "clients saw what they cannot retry: {:?}", tally.wrong);
    assert!(
        tally.retried.is_empty(),
        "every request answered the first time: {:?}; nginx said {:#?}",
        tally.retried,
        balancer.errors(8)
    );
    every_accepted_job_succeeds(&app, &tally.accepted).await;
    app.stop().await;
}
