//! `bench`: drives a running Conveyor through its public HTTP API and prints
//! what it measured: a table for people, then one JSON line for scripts.
//!
//! It shares the machine with what it measures, so it is frugal: one
//! single-threaded tokio runtime and one HTTP client whose connections are
//! reused. Worker processes, when a mode needs them, are started by the
//! bench itself (`--worker-bin`), so that `drain` can enqueue with no worker
//! running and then time the workers alone.
//!
//! Modes: `submit`, `batch`, `drain`, `e2e`, `latency`, `poll`, `overload`, `noisy` (see `--help`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "bench", version, about = "Load Conveyor through its HTTP API and report the figures")]
struct Cli {
    /// The API's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// An API key with jobs:read, jobs:write (and admin is not needed).
    #[arg(long, env = "CONVEYOR_TOKEN", global = true)]
    token: String,
    /// The API server's pid, to sample its memory (RSS).
    #[arg(long, global = true)]
    api_pid: Option<u32>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Closed-loop submissions of noop jobs: jobs/s and latency.
    Submit(Load),
    /// Closed-loop batch submissions (`POST /v1/jobs/batch`) of noop jobs: jobs/s and latency per batch.
    Batch(BatchLoad),
    /// Enqueue N jobs with no worker running, then start the workers and time until all are done.
    Drain(Drained),
    /// Submit with workers running: jobs/s until every job is done.
    E2e(Drained),
    /// Open loop at a fixed rate: submit → done, as a client polling every
    /// 2 ms sees it (or, with `--wait`, a client long-polling with `?wait=`).
    Latency(Latency),
    /// Many clients waiting on a job that does not change, with long-polls
    /// (`?wait=`) or event streams: the API's memory and CPU while they wait.
    Idle(Idle),
    /// GET of a finished job against GET /healthz, on the same server in the same run.
    Poll(Poll),
    /// `GET /v1/jobs` pages one after another: each query's latency.
    List(List),
    /// Submissions at a fixed rate, before and while `api prune` runs:
    /// whether deleting history stalls the front door.
    Prune(Prune),
    /// A flood: many clients, each submitting as fast as it is answered;
    /// latency of accepted and of refused submissions apart; then workers
    /// drain what was accepted and every job must have succeeded.
    Overload(Overload),
    /// A noisy neighbour: tenant A (the main token) puts a backlog of
    /// `sleep` jobs in the default queue, then tenant B (`--token-b`)
    /// submits jobs one by one: how long B's jobs take, submit to done.
    Noisy(Noisy),
}

#[derive(Debug, Args)]
struct Noisy {
    /// A key of another tenant, with jobs:read and jobs:write.
    #[arg(long, env = "CONVEYOR_TOKEN_B")]
    token_b: String,
    /// Tenant A's backlog: `sleep` jobs.
    #[arg(long, default_value_t = 2000)]
    backlog: usize,
    /// How long each of A's jobs sleeps.
    #[arg(long, default_value_t = 200)]
    sleep_ms: u64,
    /// Tenant B's jobs (`noop`), one after the other.
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Between B's submissions.
    #[arg(long, default_value_t = 20)]
    every_ms: u64,
    #[command(flatten)]
    workers: Workers,
}

#[derive(Debug, Args)]
struct Overload {
    /// Clients, each with its own connection.
    #[arg(long, default_value_t = 4000)]
    clients: usize,
    /// Seconds of flood.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Send again at once after a 503, instead of after its Retry-After.
    #[arg(long)]
    ignore_retry_after: bool,
    #[command(flatten)]
    workers: Workers,
}

#[derive(Debug, Args)]
struct Load {
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Debug, Args)]
struct BatchLoad {
    /// Jobs in all.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Clients submitting at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Jobs per batch.
    #[arg(long, default_value_t = 100)]
    size: usize,
}

#[derive(Debug, Args)]
struct Workers {
    /// The worker binary to start.
    #[arg(long, default_value = "target/release/worker")]
    worker_bin: PathBuf,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Concurrency of each worker process.
    #[arg(long, default_value_t = 64)]
    worker_concurrency: u16,
}

#[derive(Debug, Args)]
struct Drained {
    #[command(flatten)]
    load: Load,
    #[command(flatten)]
    workers: Workers,
    /// Drain only: submit the backlog in batches of this many jobs (0: one by one).
    #[arg(long, default_value_t = 0)]
    batch_size: usize,
    /// E2e only: clients polling jobs still moving (each GETs, again and
    /// again, one of the last 64 jobs submitted), as impatient clients do.
    #[arg(long, default_value_t = 0)]
    pollers: usize,
}

#[derive(Debug, Args)]
struct Latency {
    /// Jobs submitted per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Follow each job with `?wait=` long-polls instead of polling every 2 ms.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    workers: Workers,
}

#[derive(Debug, Args)]
struct Idle {
    /// Clients, each with its own connection.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Event streams (`GET /v1/jobs/{id}/events`) instead of long-polls.
    #[arg(long)]
    events: bool,
    /// Seconds measured once every client waits.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

#[derive(Debug, Args)]
struct Poll {
    /// Seconds of load per target.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Debug, Args)]
struct List {
    /// Requests per query.
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Requests per query sent first and not measured: the first reads of a
    /// table copied from its template find its pages outside every cache.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

#[derive(Debug, Args)]
struct Prune {
    /// Jobs submitted per second, open loop (a stall delays every submission
    /// due during it, and each one's latency counts from when it was due).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds of submissions before the prune starts: the baseline.
    #[arg(long, default_value_t = 10)]
    before: u64,
    /// The `api` binary whose `prune` runs (against its `DATABASE_URL`).
    #[arg(long)]
    api_bin: PathBuf,
    /// What follows `api prune`.
    #[arg(long, default_value = "--older-than 1h", allow_hyphen_values = true)]
    prune_args: String,
    /// Workers run the submitted jobs from before the baseline to the end,
    /// so that no backlog grows under the measurement.
    #[command(flatten)]
    workers: Workers,
}

/// The listings measured: a tenant's newest jobs, by status (a common one
/// and a rare one), and a queue's.
const LISTINGS: [(&str, &str); 4] = [
    ("newest", "/v1/jobs?limit=50"),
    ("succeeded", "/v1/jobs?status=succeeded&limit=50"),
    ("failed", "/v1/jobs?status=failed&limit=50"),
    ("queue", "/v1/jobs?queue=default&limit=50"),
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&runtime, run(cli))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The HTTP side of the bench.
struct Api {
    base: String,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
}

impl Api {
    fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        Self::with_connections(base, token, 1024)
    }

    /// With up to `connections` kept open.
    fn with_connections(base: &str, token: &str, connections: usize) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
        let client = reqwest::Client::builder()
            .default_headers(headers.clone())
            .pool_max_idle_per_host(connections)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), client, headers })
    }

    /// Submits a noop job; returns the status code and, on 202, the job id.
    async fn submit(&self) -> (u16, Option<String>) {
        let response = self
            .client
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", "application/json")
            .body(r#"{"type":"noop"}"#)
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                // The id from `Location: /v1/jobs/{id}`, not the body: parsing
                // every job's JSON cost the driver CPU that the stack it
                // measures could use. The body is still read, so that the
                // connection goes back to the pool.
                let id = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|location| location.to_str().ok())
                    .and_then(|location| location.rsplit('/').next())
                    .map(str::to_owned)
                    .filter(|_| status == 202);
                let _ = response.bytes().await;
                (status, id)
            }
            Err(_) => (0, None),
        }
    }

    /// Submits `body`, a batch; returns the status code.
    async fn submit_batch(&self, body: &str) -> u16 {
        let response = self
            .client
            .post(format!("{}/v1/jobs/batch", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                status
            }
            Err(_) => 0,
        }
    }

    /// The headers every request carries (the token).
    fn client_headers(&self) -> reqwest::header::HeaderMap {
        self.headers.clone()
    }

    /// A gauge's value in the API's `/metrics`.
    async fn gauge(&self, name: &str) -> Option<f64> {
        let text = self.client.get(format!("{}/metrics", self.base)).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    async fn get(&self, path: &str) -> (u16, Option<Value>) {
        match self.client.get(format!("{}{path}", self.base)).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.ok())
            }
            Err(_) => (0, None),
        }
    }

    /// Jobs of this tenant not yet ended, at least `limit` of them counted:
    /// cheap index lookups, so polling it does not load the database.
    async fn any_unfinished(&self) -> anyhow::Result<bool> {
        for status in ["queued", "running", "retrying", "scheduled"] {
            let (code, page) = self.get(&format!("/v1/jobs?status={status}&limit=1")).await;
            if code != 200 {
                bail!("listing {status} jobs answered {code}");
            }
            if page.is_some_and(|p| p["jobs"].as_array().is_some_and(|jobs| !jobs.is_empty())) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn wait_all_done(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.any_unfinished().await? {
            if Instant::now() > deadline {
                bail!("jobs still unfinished after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// Latencies in microseconds, summarised.
fn percentiles(mut micros: Vec<u64>) -> Value {
    micros.sort_unstable();
    let at = |p: f64| -> f64 {
        if micros.is_empty() {
            return 0.0;
        }
        let i = ((micros.len() as f64 - 1.0) * p).round() as usize;
        micros[i] as f64 / 1000.0
    };
    json!({"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

/// Samples the resident memory of some processes every 100 ms; keeps the peak.
struct RssSampler {
    peaks: Rc<std::cell::RefCell<BTreeMap<String, u64>>>,
    stop: Rc<std::cell::Cell<bool>>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl RssSampler {
    fn start(processes: Vec<(String, u32)>) -> Self {
        let peaks = Rc::new(std::cell::RefCell::new(BTreeMap::new()));
        let stop = Rc::new(std::cell::Cell::new(false));
        let (p, s) = (peaks.clone(), stop.clone());
        tokio::task::spawn_local(async move {
            while !s.get() {
                for (name, pid) in &processes {
                    if let Some(kib) = rss_kib(*pid) {
                        let mut peaks = p.borrow_mut();
                        let peak = peaks.entry(name.clone()).or_insert(0);
                        *peak = (*peak).max(kib);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { peaks, stop }
    }

    fn finish(self) -> Value {
        self.stop.set(true);
        let peaks = self.peaks.borrow();
        Value::Object(
            peaks
                .iter()
                .map(|(name, kib)| (name.clone(), json!((*kib as f64 / 1024.0 * 10.0).round() / 10.0)))
                .collect(),
        )
    }
}

/// Worker processes started for a mode, stopped (SIGTERM, then waited for) at the end.
struct WorkerProcesses {
    children: Vec<tokio::process::Child>,
}

impl WorkerProcesses {
    async fn start(workers: &Workers) -> anyhow::Result<Self> {
        let mut children = Vec::new();
        for _ in 0..workers.workers {
            let child = tokio::process::Command::new(&workers.worker_bin)
                .args(["--concurrency", &workers.worker_concurrency.to_string()])
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("Failed to start {}", workers.worker_bin.display()))?;
            children.push(child);
        }
        Ok(Self { children })
    }

    fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.id().map(|pid| (format!("worker{}_mib", i + 1), pid)))
            .collect()
    }

    async fn stop(mut self) {
        for child in &self.children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
        }
        for child in &mut self.children {
            let _ = child.wait().await;
        }
    }
}

/// Runs the jobs earlier modes left unfinished (`submit` runs none), untimed:
/// a timed mode that waits for "all done" must wait for its own jobs only.
async fn settle(api: &Api, workers: &Workers) -> anyhow::Result<()> {
    if !api.any_unfinished().await? {
        return Ok(());
    }
    let running = WorkerProcesses::start(workers).await?;
    let settled = api.wait_all_done(Duration::from_secs(600)).await;
    running.stop().await;
    settled
}

/// Closed loop: `concurrency` clients submit until `n` submissions are done.
async fn submit_load(api: &Rc<Api>, load: &Load) -> (Duration, Vec<u64>, BTreeMap<u16, u64>) {
    closed_loop(api, load.n, load.concurrency, None, None).await
}

/// Closed loop: `concurrency` clients send `requests` requests in all, each a
/// single submission or, with `batch`, that batch. Latency and status per request.
async fn closed_loop(
    api: &Rc<Api>,
    requests: usize,
    concurrency: usize,
    batch: Option<Rc<str>>,
    submitted: Option<Rc<std::cell::RefCell<Vec<String>>>>,
) -> (Duration, Vec<u64>, BTreeMap<u16, u64>) {
    let next = Rc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (api, next, n, batch, submitted) =
            (api.clone(), next.clone(), requests as u64, batch.clone(), submitted.clone());
        clients.push(tokio::task::spawn_local(async move {
            let mut latencies = Vec::new();
            let mut codes: BTreeMap<u16, u64> = BTreeMap::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let sent = Instant::now();
                let code = match &batch {
                    Some(body) => api.submit_batch(body).await,
                    None => {
                        let (code, id) = api.submit().await;
                        if let (Some(submitted), Some(id)) = (&submitted, id) {
                            submitted.borrow_mut().push(id);
                        }
                        code
                    }
                };
                latencies.push(sent.elapsed().as_micros() as u64);
                *codes.entry(code).or_default() += 1;
            }
            (latencies, codes)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut codes: BTreeMap<u16, u64> = BTreeMap::new();
    for client in clients {
        if let Ok((l, c)) = client.await {
            latencies.extend(l);
            for (code, count) in c {
                *codes.entry(code).or_default() += count;
            }
        }
    }
    (started.elapsed(), latencies, codes)
}

/// Accepted jobs (202s) per second: a refused submission is not throughput.
fn accepted_per_second(codes: &BTreeMap<u16, u64>, took: Duration) -> f64 {
    (codes.get(&202).copied().unwrap_or(0) as f64 / took.as_secs_f64()).round()
}

/// Samples the RSS of the API and of `workers` until `finish`.
fn watch(api_process: &[(String, u32)], workers: &WorkerProcesses) -> RssSampler {
    let mut watched = api_process.to_vec();
    watched.extend(workers.pids());
    RssSampler::start(watched)
}

async fn run(cli: Cli) -> anyhow::Result<Value> {
    let api = Rc::new(Api::new(&cli.url, &cli.token)?);
    let (code, _) = api.get("/v1/jobs?limit=1").await;
    if code != 200 {
        bail!("{} does not answer GET /v1/jobs with 200 (got {code}); is it up, and is the token right?", cli.url);
    }
    let api_process: Vec<(String, u32)> = cli.api_pid.map(|pid| ("api_mib".to_owned(), pid)).into_iter().collect();
    let report = match cli.mode {
        Mode::Submit(load) => {
            let rss = RssSampler::start(api_process);
            let (took, latencies, codes) = submit_load(&api, &load).await;
            let rss = rss.finish();
            let report = json!({
                "mode": "submit", "n": load.n, "concurrency": load.concurrency,
                "jobs_per_s": accepted_per_second(&codes, took), "latency": percentiles(latencies),
                "status": codes, "rss_mib": rss,
            });
            println!(
                "submit  n={} c={}: {} jobs/s, latency {}, status {}, rss {}",
                load.n, load.concurrency, report["jobs_per_s"], report["latency"], report["status"], report["rss_mib"]
            );
            report
        }
        Mode::Batch(load) => {
            let size = load.size.max(1);
            let body: Rc<str> = json!({ "jobs": vec![json!({"type": "noop"}); size] }).to_string().into();
            let rss = RssSampler::start(api_process);
            let (took, latencies, codes) =
                closed_loop(&api, load.n.div_ceil(size), load.concurrency, Some(body), None).await;
            let rss = rss.finish();
            let jobs_per_s = accepted_per_second(&codes, took) * size as f64;
            let report = json!({
                "mode": "batch", "n": load.n, "concurrency": load.concurrency, "size": size,
                "jobs_per_s": jobs_per_s, "latency": percentiles(latencies), "status": codes, "rss_mib": rss,
            });
            println!(
                "batch   n={} c={} size={}: {} jobs/s, latency per batch {}, status {}, rss {}",
                load.n,
                load.concurrency,
                size,
                report["jobs_per_s"],
                report["latency"],
                report["status"],
                report["rss_mib"]
            );
            report
        }
        Mode::Overload(overload) => {
            settle(&api, &overload.workers).await?;
            // Each client connects first, untimed: the figures are of a flood
            // on open connections, not of a connection storm.
            let mut floods = Vec::with_capacity(overload.clients);
            for _ in 0..overload.clients {
                // A client (and connection pool) each, like separate callers:
                // one pool of thousands of connections costs the driver more
                // per request than the server spends on a refusal.
                floods.push(Api::with_connections(&cli.url, &cli.token, 1)?);
            }
            let connecting: Vec<_> = floods
                .into_iter()
                .map(|flood| {
                    tokio::task::spawn_local(async move {
                        for _ in 0..10 {
                            if flood.get("/healthz").await.0 == 200 {
                                break;
                            }
                        }
                        flood
                    })
                })
                .collect();
            let mut floods = Vec::with_capacity(overload.clients);
            for client in connecting {
                floods.push(client.await?);
            }
            let rss = RssSampler::start(api_process.clone());
            let until = Instant::now() + Duration::from_secs(overload.duration);
            let started = Instant::now();
            let mut clients = Vec::with_capacity(overload.clients);
            for flood in floods {
                let ignore_retry_after = overload.ignore_retry_after;
                clients.push(tokio::task::spawn_local(async move {
                    let mut by_status: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
                    while Instant::now() < until {
                        let sent = Instant::now();
                        let (code, _) = flood.submit().await;
                        by_status.entry(code).or_default().push(sent.elapsed().as_micros() as u64);
                        if code == 503 && !ignore_retry_after {
                            // As HTTP clients that honour Retry-After do (the API says 1 s),
                            // with jitter, lest every refused client come back at once.
                            tokio::time::sleep(Duration::from_millis(1000 + rand::random_range(0..1000))).await;
                        }
                    }
                    by_status
                }));
            }
            let mut by_status: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
            for client in clients {
                for (code, latencies) in client.await.unwrap_or_default() {
                    by_status.entry(code).or_default().extend(latencies);
                }
            }
            let took = started.elapsed();
            let rss = rss.finish();
            // Then every accepted job must run to success.
            let workers = WorkerProcesses::start(&overload.workers).await?;
            api.wait_all_done(Duration::from_secs(600)).await?;
            workers.stop().await;
            let (code, failed) = api.get("/v1/jobs?status=failed&limit=1").await;
            let failed = code != 200 || failed.is_none_or(|p| p["jobs"].as_array().is_none_or(|j| !j.is_empty()));
            let codes: BTreeMap<u16, u64> = by_status.iter().map(|(code, l)| (*code, l.len() as u64)).collect();
            let accepted = by_status.remove(&202).unwrap_or_default();
            let shed = by_status.remove(&503).unwrap_or_default();
            let report = json!({
                "mode": "overload", "clients": overload.clients, "duration_s": overload.duration,
                "ignore_retry_after": overload.ignore_retry_after,
                "accepted_per_s": accepted_per_second(&codes, took),
                "accepted_latency": percentiles(accepted), "shed_latency": percentiles(shed),
                "status": codes, "any_failed": failed, "rss_mib": rss,
            });
            println!(
                "overload clients={} {} s: {} accepted/s, accepted latency {}, shed latency {}, status {}, any failed: {}, rss {}",
                overload.clients,
                overload.duration,
                report["accepted_per_s"],
                report["accepted_latency"],
                report["shed_latency"],
                report["status"],
                failed,
                report["rss_mib"]
            );
            report
        }
        Mode::Noisy(noisy) => {
            settle(&api, &noisy.workers).await?;
            let tenant_b = Rc::new(Api::new(&cli.url, &noisy.token_b)?);
            let workers = WorkerProcesses::start(&noisy.workers).await?;
            // A's backlog, in batches: it is in the queue before B's first job.
            let sleep = json!({"type": "sleep", "payload": {"ms": noisy.sleep_ms}});
            let mut left = noisy.backlog;
            while left > 0 {
                let size = left.min(1000);
                let code = api.submit_batch(&json!({ "jobs": vec![sleep.clone(); size] }).to_string()).await;
                if code != 202 {
                    bail!("tenant A's backlog batch answered {code}");
                }
                left -= size;
            }
            let backlog_at = Instant::now();
            let mut watchers = Vec::with_capacity(noisy.jobs);
            for _ in 0..noisy.jobs {
                let submitted = Instant::now();
                let (code, id) = tenant_b.submit().await;
                let Some(id) = id else { bail!("tenant B's submission answered {code}") };
                let tenant_b = tenant_b.clone();
                watchers.push(tokio::task::spawn_local(async move {
                    loop {
                        let (_, job) = tenant_b.get(&format!("/v1/jobs/{id}")).await;
                        if job.is_some_and(|job| job["status"] == "succeeded") {
                            return Some(submitted.elapsed().as_micros() as u64);
                        }
                        if submitted.elapsed() > Duration::from_secs(600) {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }));
                tokio::time::sleep(Duration::from_millis(noisy.every_ms)).await;
            }
            let mut latencies = Vec::with_capacity(noisy.jobs);
            for watcher in watchers {
                latencies.extend(watcher.await.ok().flatten());
            }
            let b_done = backlog_at.elapsed();
            api.wait_all_done(Duration::from_secs(600)).await?;
            let a_done = backlog_at.elapsed();
            workers.stop().await;
            let report = json!({
                "mode": "noisy", "backlog": noisy.backlog, "sleep_ms": noisy.sleep_ms, "jobs_b": noisy.jobs,
                "b_done": latencies.len(), "b_latency": percentiles(latencies),
                "b_all_done_s": b_done.as_secs_f64(), "a_all_done_s": a_done.as_secs_f64(),
            });
            println!(
                "noisy   A: {} × sleep {} ms, B: {} noop: B submit→done {}, B all done after {:.1} s, A after {:.1} s",
                noisy.backlog,
                noisy.sleep_ms,
                noisy.jobs,
                report["b_latency"],
                b_done.as_secs_f64(),
                a_done.as_secs_f64()
            );
            report
        }
        Mode::Drain(drained) => {
            settle(&api, &drained.workers).await?;
            let mut codes = match drained.batch_size {
                0 => submit_load(&api, &drained.load).await.2,
                size => {
                    let body: Rc<str> = json!({ "jobs": vec![json!({"type": "noop"}); size] }).to_string().into();
                    closed_loop(&api, drained.load.n.div_ceil(size), drained.load.concurrency, Some(body), None).await.2
                }
            };
            // Counted in jobs, whichever way they were submitted.
            if let Some(accepted) = codes.get_mut(&202) {
                *accepted *= drained.batch_size.max(1) as u64;
            }
            let workers = WorkerProcesses::start(&drained.workers).await?;
            let rss = watch(&api_process, &workers);
            let started = Instant::now();
            api.wait_all_done(Duration::from_secs(600)).await?;
            let took = started.elapsed();
            let rss = rss.finish();
            workers.stop().await;
            let report = json!({
                "mode": "drain", "n": drained.load.n, "workers": drained.workers.workers,
                "worker_concurrency": drained.workers.worker_concurrency,
                "jobs_per_s": accepted_per_second(&codes, took), "seconds": took.as_secs_f64(),
                "submit_status": codes, "rss_mib": rss,
            });
            println!(
                "drain   n={} workers={}x{}: {} jobs/s ({:.2} s), rss {}",
                drained.load.n,
                drained.workers.workers,
                drained.workers.worker_concurrency,
                report["jobs_per_s"],
                took.as_secs_f64(),
                report["rss_mib"]
            );
            report
        }
        Mode::E2e(drained) => {
            let workers = WorkerProcesses::start(&drained.workers).await?;
            // Let the workers connect, and finish what earlier modes left,
            // before the clock starts.
            tokio::time::sleep(Duration::from_secs(1)).await;
            api.wait_all_done(Duration::from_secs(600)).await?;
            let rss = watch(&api_process, &workers);
            let started = Instant::now();
            let submitted = Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
            let stop = Rc::new(std::cell::Cell::new(false));
            let polls = Rc::new(AtomicU64::new(0));
            let pollers: Vec<_> = (0..drained.pollers)
                .map(|i| {
                    let (api, submitted, stop, polls) = (api.clone(), submitted.clone(), stop.clone(), polls.clone());
                    tokio::task::spawn_local(async move {
                        let mut k = i;
                        while !stop.get() {
                            k += 7;
                            let id = {
                                let ids = submitted.borrow();
                                (!ids.is_empty()).then(|| ids[ids.len() - 1 - k % ids.len().min(64)].clone())
                            };
                            match id {
                                Some(id) => {
                                    api.get(&format!("/v1/jobs/{id}")).await;
                                    polls.fetch_add(1, Ordering::Relaxed);
                                }
                                None => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                    })
                })
                .collect();
            let (_, latencies, codes) =
                closed_loop(&api, drained.load.n, drained.load.concurrency, None, Some(submitted)).await;
            api.wait_all_done(Duration::from_secs(600)).await?;
            let took = started.elapsed();
            stop.set(true);
            for poller in pollers {
                let _ = poller.await;
            }
            let rss = rss.finish();
            workers.stop().await;
            let polls_per_s = (polls.load(Ordering::Relaxed) as f64 / took.as_secs_f64()).round();
            let report = json!({
                "mode": "e2e", "n": drained.load.n, "concurrency": drained.load.concurrency,
                "workers": drained.workers.workers, "worker_concurrency": drained.workers.worker_concurrency,
                "pollers": drained.pollers, "polls_per_s": polls_per_s,
                "jobs_per_s": accepted_per_second(&codes, took), "submit_latency": percentiles(latencies),
                "status": codes, "rss_mib": rss,
            });
            println!(
                "e2e     n={} c={} workers={}x{} pollers={}: {} jobs/s, {polls_per_s} polls/s, rss {}",
                drained.load.n,
                drained.load.concurrency,
                drained.workers.workers,
                drained.workers.worker_concurrency,
                drained.pollers,
                report["jobs_per_s"],
                report["rss_mib"]
            );
            report
        }
        Mode::Latency(latency) => {
            let workers = WorkerProcesses::start(&latency.workers).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = watch(&api_process, &workers);
            let interval = Duration::from_secs_f64(1.0 / f64::from(latency.rate.max(1)));
            let total = latency.rate as u64 * latency.duration;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut probes = Vec::new();
            let wait = latency.wait;
            for _ in 0..total {
                ticks.tick().await;
                let api = api.clone();
                probes.push(tokio::task::spawn_local(async move {
                    let sent = Instant::now();
                    let (code, id) = api.submit().await;
                    let id = id?;
                    if code != 202 {
                        return None;
                    }
                    // A long-poll without an ETag answers when the job has ended.
                    let path = if wait { format!("/v1/jobs/{id}?wait=20") } else { format!("/v1/jobs/{id}") };
                    loop {
                        let (_, job) = api.get(&path).await;
                        let status = job.as_ref().and_then(|j| j["status"].as_str()).unwrap_or_default();
                        if matches!(status, "succeeded" | "failed" | "cancelled") {
                            return Some(sent.elapsed().as_micros() as u64);
                        }
                        if sent.elapsed() > Duration::from_secs(30) {
                            return None;
                        }
                        if !wait {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                }));
            }
            let mut latencies = Vec::new();
            let mut lost = 0;
            for probe in probes {
                match probe.await {
                    Ok(Some(micros)) => latencies.push(micros),
                    _ => lost += 1,
                }
            }
            let rss = rss.finish();
            workers.stop().await;
            let follow = if wait { "long-poll ?wait=" } else { "poll every 2 ms" };
            let report = json!({
                "mode": "latency", "rate": latency.rate, "duration_s": latency.duration, "follow": follow,
                "jobs": latencies.len(), "unfinished": lost,
                "submit_to_done": percentiles(latencies), "rss_mib": rss,
            });
            println!(
                "latency rate={}/s for {} s ({follow}): submit→done {}, unfinished {lost}, rss {}",
                latency.rate, latency.duration, report["submit_to_done"], report["rss_mib"]
            );
            report
        }
        Mode::Idle(idle) => idle_clients(&api, &idle, cli.api_pid).await?,
        Mode::List(list) => {
            let mut report = json!({"mode": "list", "n": list.n});
            for (name, path) in LISTINGS {
                let mut micros = Vec::with_capacity(list.n);
                for i in 0..list.warmup + list.n {
                    let started = Instant::now();
                    let (status, _) = api.get(path).await;
                    if status != 200 {
                        bail!("GET {path} answered {status}");
                    }
                    if i < list.warmup {
                        continue;
                    }
                    micros.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                report[name] = percentiles(micros);
            }
            println!(
                "list    n={}: {}",
                list.n,
                LISTINGS.map(|(name, _)| format!("{name} {}", report[name])).join(", ")
            );
            report
        }
        Mode::Prune(prune) => prune_under_load(&api, &prune).await?,
        Mode::Poll(poll) => {
            let (_, page) = api.get("/v1/jobs?status=succeeded&limit=1").await;
            let Some(id) = page.as_ref().and_then(|p| p["jobs"][0]["id"].as_str()).map(str::to_owned) else {
                bail!("poll needs a finished job of this tenant: run e2e or drain first");
            };
            let job_path = format!("/v1/jobs/{id}");
            let rss = RssSampler::start(api_process);
            let job = closed_loop_gets(&api, &job_path, &poll).await;
            let health = closed_loop_gets(&api, "/healthz", &poll).await;
            let rss = rss.finish();
            let report = json!({
                "mode": "poll", "concurrency": poll.concurrency, "duration_s": poll.duration,
                "job_req_per_s": job, "healthz_req_per_s": health,
                "ratio": (job / health * 1000.0).round() / 1000.0, "rss_mib": rss,
            });
            println!(
                "poll    c={}: GET job {job} req/s, GET /healthz {health} req/s, ratio {}, rss {}",
                poll.concurrency, report["ratio"], report["rss_mib"]
            );
            report
        }
    };
    Ok(report)
}

/// Submits at `prune.rate` for `prune.before` seconds, then runs `api
/// prune` and goes on submitting until it exits: submit latency before and
/// during it, and how fast it deleted.
async fn prune_under_load(api: &Rc<Api>, prune: &Prune) -> anyhow::Result<Value> {
    let workers = WorkerProcesses::start(&prune.workers).await?;
    let pruning = Rc::new(std::cell::Cell::new(false));
    let stop = Rc::new(std::cell::Cell::new(false));
    let submitter = {
        let (api, pruning, stop) = (api.clone(), pruning.clone(), stop.clone());
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(prune.rate.max(1))));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        tokio::task::spawn_local(async move {
            let mut probes = Vec::new();
            while !stop.get() {
                let due = ticks.tick().await.into_std();
                let (api, during) = (api.clone(), pruning.get());
                probes.push(tokio::task::spawn_local(async move {
                    let (code, _) = api.submit().await;
                    (due, during, code, u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX))
                }));
            }
            probes
        })
    };
    tokio::time::sleep(Duration::from_secs(prune.before)).await;
    pruning.set(true);
    let started = Instant::now();
    let output = tokio::process::Command::new(&prune.api_bin)
        .arg("prune")
        .args(prune.prune_args.split_whitespace())
        .output()
        .await
        .context("could not run api prune")?;
    let took = started.elapsed().as_secs_f64();
    stop.set(true);
    workers.stop().await;
    let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() {
        bail!("api prune failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let deleted: u64 = said.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    let (mut before, mut during, mut refused) = (Vec::new(), Vec::new(), BTreeMap::<u16, u64>::new());
    // p99 per 30 s of the prune: whether a stall hides in a long run's figures.
    let mut windows: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for probe in submitter.await.context("the submitter panicked")? {
        let (due, in_prune, code, micros) = probe.await.context("a submission panicked")?;
        if code != 202 {
            *refused.entry(code).or_default() += 1;
        }
        if in_prune {
            during.push(micros);
            let window = due.saturating_duration_since(started).as_secs() / 30;
            windows.entry(window).or_default().push(micros);
        } else {
            before.push(micros);
        }
    }
    let windows: Vec<f64> = windows.into_values().map(|w| percentiles(w)["p99_ms"].as_f64().unwrap_or(0.0)).collect();
    let report = json!({
        "mode": "prune", "rate": prune.rate, "prune_args": prune.prune_args,
        "deleted": deleted, "prune_s": (took * 10.0).round() / 10.0,
        "deleted_per_s": (deleted as f64 / took).round(), "not_accepted": refused,
        "submit_before": percentiles(before), "submit_during": percentiles(during),
        "p99_ms_per_30s": windows,
    });
    println!(
        "prune   rate={}/s: {said} in {:.1} s ({} rows/s); submit before {}, during {}, p99 per 30 s {}, not accepted {}",
        prune.rate,
        took,
        report["deleted_per_s"],
        report["submit_before"],
        report["submit_during"],
        report["p99_ms_per_30s"],
        report["not_accepted"]
    );
    Ok(report)
}

/// `idle.clients` clients wait on one queued job (no worker runs it): the
/// API's peak RSS and its CPU over `idle.duration` once all of them wait.
async fn idle_clients(api: &Rc<Api>, idle: &Idle, api_pid: Option<u32>) -> anyhow::Result<Value> {
    let (code, id) = api.submit().await;
    let Some(id) = id.filter(|_| code == 202) else { bail!("submitting the job to wait on answered {code}") };
    let client =
        reqwest::Client::builder().default_headers(api.client_headers()).timeout(Duration::from_secs(120)).build()?;
    let (path, gauge) = if idle.events {
        (format!("{}/v1/jobs/{id}/events", api.base), "conveyor_api_event_streams_open")
    } else {
        (format!("{}/v1/jobs/{id}?wait=30", api.base), "conveyor_api_long_polls_waiting")
    };
    let started = Instant::now();
    let mut clients = Vec::with_capacity(idle.clients);
    for _ in 0..idle.clients {
        let (client, path) = (client.clone(), path.clone());
        clients.push(tokio::task::spawn_local(async move {
            loop {
                match client.get(&path).send().await {
                    // A burst of arrivals may be shed (503) before they start waiting: come back.
                    Ok(response) if response.status() == 503 => {}
                    Ok(mut response) => while let Ok(Some(_)) = response.chunk().await {},
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut waiting = 0;
    while waiting < idle.clients {
        if Instant::now() > deadline {
            bail!("only {waiting} of {} clients waiting after 180 s", idle.clients);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        waiting = api.gauge(gauge).await.unwrap_or(0.0) as usize;
    }
    let connected = started.elapsed();
    let rss = RssSampler::start(api_pid.map(|pid| ("api_mib".to_owned(), pid)).into_iter().collect());
    let cpu_before = api_pid.and_then(cpu_seconds);
    tokio::time::sleep(Duration::from_secs(idle.duration)).await;
    let cpu_after = api_pid.and_then(cpu_seconds);
    let still = api.gauge(gauge).await.unwrap_or(0.0);
    let rss = rss.finish();
    for client in &clients {
        client.abort();
    }
    let cpu = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => json!(((after - before) / idle.duration as f64 * 1000.0).round() / 10.0),
        _ => Value::Null,
    };
    let kind = if idle.events { "event streams" } else { "long-polls" };
    let report = json!({
        "mode": "idle", "kind": kind, "clients": idle.clients, "connected_s": connected.as_secs_f64(),
        "waiting_at_end": still, "duration_s": idle.duration, "api_cpu_percent": cpu, "rss_mib": rss,
    });
    println!(
        "idle    {} {kind}: all waiting after {:.1} s; API CPU {}% of a core, rss {}",
        idle.clients,
        connected.as_secs_f64(),
        report["api_cpu_percent"],
        report["rss_mib"]
    );
    Ok(report)
}

/// A process's CPU time so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// Requests per second of GET `path`, closed loop, for the configured time.
async fn closed_loop_gets(api: &Rc<Api>, path: &str, poll: &Poll) -> f64 {
    let done = Rc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(poll.duration);
    let mut clients = Vec::new();
    for _ in 0..poll.concurrency {
        let (api, done, path) = (api.clone(), done.clone(), path.to_owned());
        clients.push(tokio::task::spawn_local(async move {
            while Instant::now() < deadline {
                if let Ok(response) = api.client.get(format!("{}{path}", api.base)).send().await
                    && response.status().is_success()
                    && response.bytes().await.is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for client in clients {
        let _ = client.await;
    }
    (done.load(Ordering::Relaxed) as f64 / poll.duration as f64).round()
}
