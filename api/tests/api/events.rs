//! Server-sent events: `GET /v1/jobs/{id}/events` and `GET /v1/events`,
//! read as a client reads them, while real workers change the jobs.

use std::time::Duration;

use serde_json::{Value, json};
use shared::job::JobStatus;
use shared::scope::Scope;
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

use crate::helpers::{TestApp, client_with, key, spawn_app, spawn_app_with, wait_until};
use crate::submit::PgPoolOptionsUnused;

/// Longest a test waits for the next event.
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Event {
    id: Option<String>,
    name: Option<String>,
    data: Value,
}

impl Event {
    fn status(&self) -> &str {
        self.data["status"].as_str().unwrap_or_default()
    }
}

/// An event stream read as `EventSource` reads it: blocks separated by a
/// blank line, `data:` lines joined, comments skipped, and the last id seen
/// kept (a block with an id and no data moves it without an event).
struct Events {
    response: reqwest::Response,
    text: String,
    last_id: Option<String>,
    heartbeats: usize,
}

impl Events {
    async fn open(client: &reqwest::Client, url: String, last_id: Option<&str>) -> reqwest::Response {
        let mut request = client.get(url).header("Accept", "text/event-stream");
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.expect("answered")
    }

    async fn connect(client: &reqwest::Client, url: String, last_id: Option<&str>) -> Self {
        let response = Self::open(client, url, last_id).await;
        assert_eq!(response.status(), 200, "{:?}", response.headers());
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self { response, text: String::new(), last_id: None, heartbeats: 0 }
    }

    /// The next event; `None` once the server ended the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let (mut data, mut name) = (Vec::new(), None);
                for line in block.lines() {
                    match line.split_once(": ") {
                        Some(("id", id)) => self.last_id = Some(id.to_owned()),
                        Some(("event", event)) => name = Some(event.to_owned()),
                        Some(("data", line)) => data.push(line),
                        _ if line.starts_with(": heartbeat") => self.heartbeats += 1,
                        _ => {}
                    }
                }
                if !data.is_empty() {
                    let data = serde_json::from_str(&data.join("\n")).expect("JSON data");
                    return Some(Event { id: self.last_id.clone(), name, data });
                }
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk()).await.expect("an event in time");
            match chunk.expect("the stream reads") {
                Some(chunk) => self.text.push_str(std::str::from_utf8(&chunk).expect("UTF-8")),
                None => return None,
            }
        }
    }

    /// Like [`Self::connect`], once the replica listens (`503` before).
    async fn connect_when_listening(client: &reqwest::Client, url: String) -> Self {
        for _ in 0..200 {
            let response = Self::open(client, url.clone(), None).await;
            if response.status() != 503 {
                assert_eq!(response.status(), 200);
                return Self { response, text: String::new(), last_id: None, heartbeats: 0 };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{url} kept answering 503");
    }

    /// Every event until the server ends the stream.
    async fn rest(mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn job_events(app: &TestApp, id: Uuid) -> String {
    app.url(&format!("/v1/jobs/{id}/events"))
}

/// What each event says of its job.
fn shape(events: &[Event]) -> Vec<(String, Option<i64>)> {
    events.iter().map(|event| (event.status().to_owned(), event.data["progress"].as_i64())).collect()
}

/// Progress reported while running, in order.
fn progress(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .filter(|event| event.status() == "running")
        .filter_map(|event| event.data["progress"].as_i64())
        .collect()
}

/// Statuses in order, each once however many progress events it had.
fn statuses(events: &[Event]) -> Vec<String> {
    let mut statuses: Vec<String> = Vec::new();
    for event in events {
        if statuses.last().map(String::as_str) != Some(event.status()) {
            statuses.push(event.status().to_owned());
        }
    }
    statuses
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_jobs_stream_shows_each_change_in_order_and_ends_with_the_ended_job(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let mut app = spawn_app_with(connect, |settings| {
        settings.jobs.retry_backoff_base_ms = 20;
        settings.worker.reconcile_interval_ms = 50;
    })
    .await;
    let slow = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 1500}})).await;
    let failing = app.submit_ok(&json!({"type": "fail", "payload": {"times": 1}, "queue": "critical"})).await;
    let slow_events = Events::connect(&app.client, job_events(&app, slow.id), None).await;
    let failing_events = Events::connect(&app.client, job_events(&app, failing.id), None).await;
    app.spawn_worker(&["default", "critical"], 2);
    let (slow_events, failing_events) = (slow_events.rest().await, failing_events.rest().await);

    // First the job as it was, then each change, then the ended job as GET shows it.
    let first = &slow_events[0];
    assert_eq!((first.status(), &first.data["payload"]), ("queued", &json!({"ms": 1500})));
    assert_eq!(statuses(&slow_events), ["queued", "running", "succeeded"]);
    let last = slow_events.last().expect("events");
    assert_eq!(last.id.as_deref(), Some("ended"));
    let get = app.client.get(app.url(&format!("/v1/jobs/{}", slow.id))).send().await.expect("answered");
    assert_eq!(last.data, get.json::<Value>().await.expect("the job"));
    let progress = progress(&slow_events);
    assert!(progress.len() >= 3 && progress.windows(2).all(|pair| pair[0] < pair[1]), "{progress:?}");
    for change in &slow_events[1..slow_events.len() - 1] {
        assert_eq!((&change.data["id"], &change.data["queue"]), (&json!(slow.id), &json!("default")));
        assert!(change.id.as_deref().is_some_and(|id| id.contains('-')), "{change:?}");
    }

    // A retried job: every status it went through, in order.
    assert_eq!(statuses(&failing_events), ["queued", "running", "retrying", "queued", "running", "succeeded"]);
    let ended = failing_events.last().expect("events");
    assert_eq!(ended.data["result"], json!({"succeeded_on_attempt": 2}));

    // A client that saw the end and reconnects (as EventSource does) is told there is no more.
    let again = Events::open(&app.client, job_events(&app, slow.id), Some("ended")).await;
    assert_eq!(again.status(), 204);
    // Without it, it gets the ended job and the end.
    let fresh = Events::connect(&app.client, job_events(&app, slow.id), None).await.rest().await;
    assert_eq!(fresh.len(), 1);
    assert_eq!((fresh[0].id.as_deref(), fresh[0].status()), (Some("ended"), "succeeded"));
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_stream_resumes_after_its_last_event_id_on_any_replica(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let replica = api::startup::Application::build_with_pool(app.settings.clone(), app.pool.clone())
        .await
        .expect("a second replica starts");
    let other = format!("http://127.0.0.1:{}", replica.port());
    let replica_handle = replica.handle();
    tokio::spawn(replica.run_until_stopped());

    let job = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 1500}})).await;
    let full = Events::connect(&app.client, job_events(&app, job.id), None).await;
    let mut events = Events::connect(&app.client, job_events(&app, job.id), None).await;
    // The other replica hears changes before the job starts.
    let listening = Events::connect_when_listening(&app.client, format!("{other}/v1/events")).await;
    app.spawn_worker(&["default"], 1);
    let mut seen = vec![events.next().await.expect("the job"), events.next().await.expect("its start")];
    assert_eq!(seen[1].status(), "running");
    let resume_from = seen[1].id.clone().expect("an id");
    drop(events);

    // Disconnected while it runs and ends; back on the other replica.
    let full = full.rest().await;
    assert_eq!(statuses(&full), ["queued", "running", "succeeded"]);
    let url = format!("{other}/v1/jobs/{}/events", job.id);
    let rest = Events::connect(&app.client, url, Some(&resume_from)).await.rest().await;
    assert_ne!(rest.first().map(Event::status), Some("queued"), "no fresh start: {rest:?}");
    seen.extend(rest);
    assert_eq!(shape(&seen), shape(&full), "nothing lost, nothing twice");
    drop(listening);

    // The tenant's stream resumes from the same ids, and so would any other.
    let url = format!("{other}/v1/events");
    let mut tenant = Events::connect(&app.client, url.clone(), Some(&resume_from)).await;
    let mut replayed = Vec::new();
    while replayed.len() < full.len() - 2 {
        replayed.push(tenant.next().await.expect("replayed"));
    }
    assert_eq!(shape(&replayed), shape(&full[2..]), "the same changes after the same id");
    // An id no replica holds: the tenant's stream says so; a job's starts over.
    let gone = Events::open(&app.client, url, Some("999999999-0")).await;
    assert_eq!(gone.status(), 410);
    assert_eq!(gone.headers()["content-type"], "application/problem+json");
    let fresh = Events::connect(&app.client, job_events(&app, job.id), Some("999999999-0")).await.rest().await;
    assert_eq!(fresh.iter().map(|event| event.status()).collect::<Vec<_>>(), ["succeeded"]);
    let bad = Events::open(&app.client, job_events(&app, job.id), Some("yesterday")).await;
    assert_eq!(bad.status(), 400);

    replica_handle.stop().await;
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_tenant_sees_only_its_own_jobs_events(_: PgPoolOptionsUnused, connect: PgConnectOptions) {
    let mut app = spawn_app(connect).await;
    let (acme, globex) = (
        client_with(&key(&app.pool, "acme", &[Scope::JobsRead, Scope::JobsWrite]).await),
        client_with(&key(&app.pool, "globex", &[Scope::JobsRead, Scope::JobsWrite]).await),
    );
    let writer = client_with(&key(&app.pool, "acme", &[Scope::JobsWrite]).await);
    let forbidden = Events::open(&writer, app.url("/v1/events"), None).await;
    assert_eq!(forbidden.status(), 403);
    let anonymous = reqwest::Client::new().get(app.url("/v1/events")).send().await.expect("answered");
    assert_eq!(anonymous.status(), 401);

    let mut everything = Events::connect(&acme, app.url("/v1/events"), None).await;
    let mut critical = Events::connect(&acme, app.url("/v1/events?queue=critical&type=echo"), None).await;
    let jobs = app.url("/v1/jobs");
    let submit = |client: &reqwest::Client, body: Value| {
        let request = client.post(&jobs).json(&body);
        async move {
            let response = request.send().await.expect("answered");
            assert_eq!(response.status(), 202);
            let job: Value = response.json().await.expect("a job");
            job["id"].as_str().expect("an id").to_owned()
        }
    };
    let mut theirs = Vec::new();
    for _ in 0..5 {
        theirs.push(submit(&globex, json!({"type": "echo", "queue": "critical"})).await);
    }
    let ours = submit(&acme, json!({"type": "echo"})).await;
    let ours_critical = submit(&acme, json!({"type": "echo", "queue": "critical"})).await;
    app.spawn_worker(&["default", "critical"], 4);
    let succeeded = || shared::testing::db::count(&app.pool, Some(JobStatus::Succeeded), None);
    assert!(wait_until(PATIENCE, || async { succeeded().await == 7 }).await);
    // Changes reach streams in commit order: the last one's end comes after every other change.
    let last = submit(&acme, json!({"type": "echo"})).await;

    let mut seen: Vec<Event> = Vec::new();
    while seen.last().is_none_or(|event| event.data["id"] != json!(last) || event.status() != "succeeded") {
        seen.push(everything.next().await.expect("an event"));
    }
    let ids: Vec<&str> = seen.iter().map(|event| event.data["id"].as_str().unwrap_or_default()).collect();
    assert!(ids.iter().all(|id| [&ours, &ours_critical, &last].contains(&&(*id).to_owned())), "{ids:?}");
    for id in [&ours, &ours_critical, &last] {
        let of_job: Vec<Event> = seen.iter().filter(|event| event.data["id"] == json!(id)).cloned().collect();
        let statuses = ["queued", "running", "succeeded"].map(|status| (status.to_owned(), None));
        assert_eq!(shape(&of_job), statuses, "{seen:?}");
    }
    let only_critical = [critical.next().await.expect("running"), critical.next().await.expect("succeeded")];
    assert!(only_critical.iter().all(|event| event.data["id"] == json!(ours_critical) && event.name.is_none()));

    // Another tenant's job is not found, as with GET.
    let response = Events::open(&acme, job_events(&app, theirs[0].parse().expect("uuid")), None).await;
    assert_eq!(response.status(), 404);
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_quiet_stream_has_heartbeats_and_ends_when_the_server_stops(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |settings| settings.events.heartbeat_seconds = 1).await;
    let job = app.submit_ok(&json!({"type": "echo"})).await;
    let mut events = Events::connect(&app.client, job_events(&app, job.id), None).await;
    assert_eq!(events.next().await.expect("the job").status(), "queued");
    let waiting = tokio::spawn(async move {
        let end = events.next().await;
        (end.is_none(), events.heartbeats)
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stopping = std::time::Instant::now();
    app.stop().await;
    let (ended, heartbeats) = waiting.await.expect("joined");
    assert!(ended, "the stream ends");
    assert!(stopping.elapsed() < Duration::from_secs(5), "ended at once: {:?}", stopping.elapsed());
    assert!((2..=3).contains(&heartbeats), "one a second for 2.5 s: {heartbeats}");
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_client_that_does_not_read_is_told_it_fell_behind_and_disconnected(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app_with(connect, |settings| settings.events.replay_changes = 100).await;
    // A client with a small receive window that reads nothing for now.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("set");
    let address = app.address.trim_start_matches("http://").parse().expect("an address");
    let mut stream = socket.connect(address).await.expect("connected");
    let request = format!(
        "GET /v1/events HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        app.token
    );
    stream.write_all(request.as_bytes()).await.expect("sent");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.expect("the answer's start");
    assert_eq!(&head, b"HTTP/1.1 200");

    // Far more changes than both socket buffers and the log hold.
    sqlx::query("INSERT INTO jobs (id, queue, type, status) SELECT gen_random_uuid(), 'default', 'echo', 'queued' FROM generate_series(1, 200)")
        .execute(&app.pool)
        .await
        .expect("inserted");
    for progress in 1..=100 {
        sqlx::query("UPDATE jobs SET progress = $1").bind(progress).execute(&app.pool).await.expect("updated");
    }
    let mut read = Vec::new();
    let told = tokio::time::timeout(PATIENCE, async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(told.is_ok(), "the server closed the stream");
    let read = String::from_utf8_lossy(&read);
    assert!(read.contains("event: lagged\ndata: {\"detail\""), "told: {}", &read[read.len().saturating_sub(300)..]);
    assert!(read.len() < 20_000 * 120, "not every change was sent: {} bytes", read.len());
    app.stop().await;
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_lost_listening_connection_wakes_long_polls_and_ends_streams(
    _: PgPoolOptionsUnused,
    connect: PgConnectOptions,
) {
    let app = spawn_app(connect).await;
    let job = app.submit_ok(&json!({"type": "sleep", "payload": {"ms": 60_000}})).await;
    let mut events = Events::connect(&app.client, job_events(&app, job.id), None).await;
    assert_eq!(events.next().await.expect("the job").status(), "queued");
    let poll = app.client.get(app.url(&format!("/v1/jobs/{}?wait=25", job.id))).send();
    let poll = tokio::spawn(poll);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The listener's backend goes, and the job is cancelled before it is back:
    // no notification tells of the cancel.
    let killed = shared::testing::db::cut_listeners(&app.pool, shared::db::JOB_CHANGED_CHANNEL).await;
    assert_eq!(killed, 1, "one listening connection per API process");
    sqlx::query("UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = $1")
        .bind(job.id)
        .execute(&app.pool)
        .await
        .expect("cancelled");

    let started = std::time::Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(10), poll).await.expect("answered in time");
    let job_now: shared::job::Job = answered.expect("joined").expect("sent").json().await.expect("a job");
    assert_eq!(job_now.status, JobStatus::Cancelled);
    eprintln!("long-poll answered {} ms after the listener was lost", started.elapsed().as_millis());
    assert!(events.next().await.is_none(), "the stream ended");

    // Back (once the replica listens again), the stream starts over from the job as it is.
    let mut reopened = None;
    for _ in 0..100 {
        let response = Events::open(&app.client, job_events(&app, job.id), events.last_id.as_deref()).await;
        if response.status() == 200 {
            reopened = Some(response);
            break;
        }
        assert_eq!(response.status(), 503, "refused while not listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = reopened.expect("the replica listens again");
    let rest = Events { response, text: String::new(), last_id: None, heartbeats: 0 }.rest().await;
    assert_eq!(rest.iter().map(Event::status).collect::<Vec<_>>(), ["cancelled"]);
    app.stop().await;
}
