//! The reconciler: every worker process runs this loop, and the one holding
//! the reconciler's leadership ([`leadership`]) is active. Each pass
//!
//! 1. queues scheduled and retrying jobs whose `run_at` has come, and publishes them;
//! 2. rescues running jobs whose lease expired (their worker died or froze):
//!    retried with the attempt counted, or failed on their last attempt;
//! 3. republishes queued jobs whose publish was never confirmed (the outbox);
//! 4. every heartbeat, republishes queued jobs whose messages RabbitMQ no
//!    longer holds (a purged queue, a lost node): see [`Reconciler::find_lost_messages`];
//! 5. deletes ended jobs past their retention (`retention.*`), a bounded share
//!    of each pass: see [`Reconciler::expire_ended`].
//!
//! Leadership is a row with an expiry, renewed as the leader works, not a lock
//! tied to a connection: a leader that stops making progress (dead, frozen,
//! cut off) loses it `worker.leader_ttl_seconds` after its last renewal, even
//! if its sockets stay open, and a standby takes over at that moment. Every
//! statement of a pass is fenced by the leader's term in Postgres, and nothing
//! is published once the term may have lapsed by this process's own clock, so
//! a leader that wakes up after losing the leadership does no reconciler work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::config::Settings;
use shared::db::leadership::{self, Claim, RECONCILER, Term};
use shared::db::{self, jobs, workers};
use shared::job::{Enqueued, JobStatus};
use shared::outbox::{self, Outbox};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{Action, Metrics};

/// Rows per statement; a pass loops while batches come back full.
const BATCH: i64 = 1000;

/// One ended status's retention, and where its sweep stands.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    status: JobStatus,
    keep: chrono::Duration,
    /// Where the next batch starts: when the newest job deleted so far ended
    /// (`None`: the oldest; a new leader starts there once).
    from: Option<DateTime<Utc>>,
}

/// The leadership as this process holds it.
#[derive(Debug, Clone, Copy)]
pub struct Lead {
    /// The fencing token every statement presents.
    pub term: Term,
    /// Until when this process may act on it, by its own clock: the renewal's
    /// send time plus the time-to-live, never later than the database's expiry.
    until: Instant,
    renewed: Instant,
}

impl Lead {
    pub fn new(term: Term, asked: Instant, ttl: Duration) -> Self {
        Self { term, until: asked + ttl, renewed: asked }
    }

    /// Whether the leadership can still be ours: a process that was frozen
    /// past this point must assume another reconciler has taken over.
    pub fn live(&self) -> bool {
        Instant::now() < self.until
    }
}

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    #[error("another reconciler leads now")]
    Lost,
    #[error(transparent)]
    Db(#[from] db::Error),
}

pub struct Reconciler {
    /// The worker process's id: the holder named in the leadership row.
    id: Uuid,
    pool: PgPool,
    outbox: Outbox,
    /// Every configured queue, consumed here or not: the leader looks after all.
    queues: Vec<String>,
    interval: Duration,
    ttl: Duration,
    heartbeat: Duration,
    outbox_grace_seconds: i32,
    /// Workers heard from within this are counted as holding what they report.
    live_seconds: i32,
    /// Per queue, the messages found missing at the previous look.
    suspects: HashMap<String, i64>,
    next_lost_check: Instant,
    /// `tenants.max_running`: parked jobs are published again as room frees.
    max_running: i32,
    retention: Vec<Expiry>,
    next_expiry: Instant,
    metrics: Arc<Metrics>,
}

impl Reconciler {
    pub fn new(id: Uuid, pool: PgPool, outbox: Outbox, settings: &Settings) -> Self {
        let worker = &settings.worker;
        Self {
            id,
            pool,
            outbox,
            queues: settings.queues.keys().cloned().collect(),
            interval: Duration::from_millis(worker.reconcile_interval_ms),
            ttl: worker.leader_ttl(),
            heartbeat: worker.heartbeat(),
            outbox_grace_seconds: i32::try_from(worker.outbox_grace_seconds).unwrap_or(i32::MAX),
            max_running: i32::try_from(settings.tenants.max_running).unwrap_or(i32::MAX),
            live_seconds: i32::try_from(worker.heartbeat_seconds.saturating_mul(3)).unwrap_or(i32::MAX),
            suspects: HashMap::new(),
            next_lost_check: Instant::now(),
            retention: settings
                .retention
                .rules()
                .into_iter()
                .filter_map(|(status, keep)| {
                    Some(Expiry { status, keep: chrono::Duration::from_std(keep).ok()?, from: None })
                })
                .collect(),
            next_expiry: Instant::now(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Counts what it does in `metrics` (its worker's).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Tries once to take (or renew) the leadership: what tests use to make a
    /// reconciler lead without running its loop.
    pub async fn elect(&self) -> db::Result<Option<Lead>> {
        let asked = Instant::now();
        Ok(match leadership::claim(&self.pool, RECONCILER, self.id, self.ttl).await? {
            Claim::Held { term, .. } => Some(Lead::new(term, asked, self.ttl)),
            Claim::Elsewhere { .. } => None,
        })
    }

    /// Runs until `stop`: stands by until the leadership is free, then leads
    /// until it is lost or `stop`, when it gives the leadership up.
    pub async fn run(mut self, stop: CancellationToken) {
        // Standbys ask at most this often, and at the moment the leader's term
        // would lapse: a frozen leader is replaced within the time-to-live.
        let standby = self.interval.max(Duration::from_millis(200)).saturating_mul(4).min(self.ttl);
        loop {
            let asked = Instant::now();
            let claim = tokio::select! {
                () = stop.cancelled() => return,
                claim = leadership::claim(&self.pool, RECONCILER, self.id, self.ttl) => claim,
            };
            let wait = match claim {
                Ok(Claim::Held { term, .. }) => {
                    tracing::info!(term = term.term, "reconciler active: this worker leads");
                    self.lead(Lead::new(term, asked, self.ttl), &stop).await;
                    self.metrics.forget_platform();
                    if stop.is_cancelled() {
                        return;
                    }
                    standby
                }
                // Just after the leader's term would end, if that comes first.
                Ok(Claim::Elsewhere { remaining, .. }) => remaining.min(standby) + Duration::from_millis(10),
                Err(e) => {
                    tracing::debug!(error = %e, "reconciler could not ask for the leadership");
                    standby
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Passes every interval until the leadership is lost (returns) or `stop`
    /// (gives it up, then returns).
    async fn lead(&mut self, mut lead: Lead, stop: &CancellationToken) {
        self.suspects.clear();
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    if let Err(e) = leadership::release(&self.pool, RECONCILER, lead.term).await {
                        tracing::debug!(error = %e, "could not give the leadership up; it lapses by itself");
                    }
                    return;
                }
                _ = ticks.tick() => {}
            }
            match self.pass(&mut lead).await {
                Ok(()) => failing = false,
                Err(Interrupted::Lost) => return,
                Err(Interrupted::Db(e)) => {
                    // Postgres is away: every fenced statement fails, nothing is done
                    // twice. Once back, the next renewal says whether we still lead.
                    if !failing {
                        tracing::warn!(error = %e, "reconciler pass failed; retrying every pass");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Renews the leadership: always when `force` (the start of a pass), else
    /// once a quarter of its time-to-live has gone by since the last renewal,
    /// so that a long pass renews between its steps.
    async fn renew(&self, lead: &mut Lead, force: bool) -> Result<(), Interrupted> {
        if !force && lead.renewed.elapsed() < self.ttl / 4 {
            return Ok(());
        }
        let asked = Instant::now();
        match leadership::claim(&self.pool, RECONCILER, self.id, self.ttl).await? {
            Claim::Held { term, .. } if term == lead.term => {
                *lead = Lead::new(term, asked, self.ttl);
                Ok(())
            }
            Claim::Held { term, .. } => {
                // It lapsed while this process stalled, and nobody else took it.
                // Statements made under the old term are void; go on under the new.
                tracing::warn!(
                    old = lead.term.term,
                    new = term.term,
                    "reconciler leadership lapsed and was taken again"
                );
                *lead = Lead::new(term, asked, self.ttl);
                Ok(())
            }
            Claim::Elsewhere { holder, .. } => {
                tracing::warn!(leader = %holder, "reconciler lost its leadership (this process stalled past it); standing by");
                Err(Interrupted::Lost)
            }
        }
    }

    /// One pass under `lead`. Public so tests can drive it step by step with
    /// any lead, a stale one included.
    pub async fn pass(&mut self, lead: &mut Lead) -> Result<(), Interrupted> {
        self.renew(lead, true).await?;
        loop {
            let due = jobs::queue_due(&self.pool, lead.term, BATCH).await?;
            let full = due.len() as i64 == BATCH;
            if !due.is_empty() {
                tracing::debug!(count = due.len(), "queued due jobs");
                self.metrics.acted(Action::QueuedDue, due.len());
                self.publish(due, lead).await;
            }
            if !full {
                break;
            }
            self.renew(lead, false).await?;
        }
        if self.max_running > 0 {
            self.renew(lead, false).await?;
            let unparked = jobs::unpark(&self.pool, lead.term, self.max_running, BATCH).await?;
            if !unparked.is_empty() {
                tracing::debug!(count = unparked.len(), "published parked jobs of tenants under their cap");
                self.metrics.acted(Action::Unparked, unparked.len());
                self.publish(unparked, lead).await;
            }
        }
        self.renew(lead, false).await?;
        let rescued = jobs::rescue_expired(&self.pool, lead.term, BATCH).await?;
        if rescued > 0 {
            // They are `retrying`, due now: the next pass queues them.
            tracing::warn!(count = rescued, "rescued jobs whose worker was lost");
            self.metrics.acted(Action::Rescued, usize::try_from(rescued).unwrap_or(usize::MAX));
        }
        self.renew(lead, false).await?;
        let unpublished = db::outbox::sweep(&self.pool, lead.term, self.outbox_grace_seconds, BATCH).await?;
        if !unpublished.is_empty() {
            tracing::info!(count = unpublished.len(), "republishing jobs whose publish was never confirmed");
            self.metrics.acted(Action::Republished, unpublished.len());
            self.publish(unpublished, lead).await;
        }
        if !self.retention.is_empty() && Instant::now() >= self.next_expiry {
            self.expire_ended(lead).await?;
        }
        if Instant::now() >= self.next_lost_check {
            let started = Instant::now();
            self.renew(lead, false).await?;
            self.find_lost_messages(lead).await?;
            self.forget_expired_keys(lead).await?;
            self.export_platform().await?;
            // Never more than a tenth of the leader's time, however long the queues.
            self.next_lost_check = Instant::now() + self.heartbeat.max(started.elapsed() * 10);
        }
        Ok(())
    }

    /// What only the leader exports, so that it is exported once: how many
    /// workers heartbeat, and how old the oldest unconfirmed publish is.
    async fn export_platform(&self) -> Result<(), Interrupted> {
        let alive = workers::count_live(&self.pool, self.live_seconds).await?;
        let oldest = db::outbox::oldest_age_seconds(&self.pool).await?;
        self.metrics.set_platform(alive, oldest);
        Ok(())
    }

    /// Deletes expired idempotency keys (a lapsed key is already free: this
    /// only keeps the table small), a batch at a time.
    async fn forget_expired_keys(&self, lead: &mut Lead) -> Result<(), Interrupted> {
        loop {
            self.renew(lead, false).await?;
            let deleted = db::idempotency::prune_expired(&self.pool, BATCH).await?;
            if deleted < BATCH as u64 {
                return Ok(());
            }
        }
    }

    /// Deletes ended jobs past their retention, oldest first, a batch at a
    /// time for at most a fifth of the pass interval: a backlog (months of
    /// history when retention is first set) is worked off over many passes,
    /// each going on where the last stopped, without holding up the pass's
    /// other work or taking the database from submissions. Once nothing is
    /// left, the next look is a heartbeat away. Not fenced: deleting what has
    /// expired is right whoever does it, and a stale leader doing it too only
    /// finds less to delete.
    pub async fn expire_ended(&mut self, lead: &mut Lead) -> Result<(), Interrupted> {
        let budget = Instant::now() + self.interval / 5;
        let now = Utc::now();
        for i in 0..self.retention.len() {
            loop {
                self.renew(lead, false).await?;
                let Expiry { status, keep, from } = self.retention[i];
                let Some(before) = now.checked_sub_signed(keep) else { break };
                let batch = jobs::prune_batch(&self.pool, status, before, from, BATCH).await?;
                self.metrics.acted(Action::Expired, usize::try_from(batch.deleted).unwrap_or(usize::MAX));
                // The cursor stays where the sweep stopped, even once it is
                // through: jobs that expire later ended later, and a walk from
                // the oldest would step again over every deleted job's index
                // entry until vacuum removes them (seconds, after a backlog).
                self.retention[i].from = batch.last.or(from);
                if batch.deleted < BATCH as u64 {
                    break;
                }
                if Instant::now() >= budget {
                    self.next_expiry = Instant::now();
                    return Ok(());
                }
            }
        }
        self.next_expiry = Instant::now() + self.heartbeat;
        Ok(())
    }

    /// Finds queued jobs whose messages RabbitMQ lost after confirming them,
    /// and publishes them again.
    ///
    /// Every queued job outside the outbox had a confirmed message, so for each
    /// queue the messages RabbitMQ still has (ready in the queue, or delivered
    /// and held unacknowledged by a worker, as workers report at each
    /// heartbeat) should be at least as many as those jobs; a shortfall is
    /// messages lost. They are the oldest ones (a purge or a lost node takes all
    /// that came before it), so the jobs queued longest are published again,
    /// as many as are missing; a duplicate is dropped by the worker that finds
    /// its job claimed. Jobs queued for less than `worker.outbox_grace_seconds`
    /// are not counted. The three counts are read at slightly different
    /// moments and held counts are a heartbeat old, so only a shortfall seen at
    /// two looks in a row is acted on, and only the smaller of the two.
    pub async fn find_lost_messages(&mut self, lead: &Lead) -> Result<(), Interrupted> {
        for queue in &self.queues {
            // Read first: a message claimed meanwhile leaves the queued count
            // too, so the shortfall can only be underestimated, never invented.
            let ready = match self.outbox.publisher().queue_stats(queue).await {
                Ok((ready, _consumers)) => {
                    self.metrics.set_ready(queue, i64::from(ready));
                    i64::from(ready)
                }
                Err(e) => {
                    tracing::debug!(%queue, error = %e, "could not count a queue's messages");
                    continue;
                }
            };
            let held = workers::held(&self.pool, queue, self.live_seconds).await?;
            let messages = ready + held;
            let queued = jobs::confirmed_queued(&self.pool, queue, self.outbox_grace_seconds, messages + BATCH).await?;
            let missing = queued - messages;
            let before = self.suspects.remove(queue);
            if missing <= 0 {
                continue;
            }
            let Some(before) = before else {
                self.suspects.insert(queue.clone(), missing);
                continue;
            };
            let lost =
                jobs::longest_queued(&self.pool, lead.term, queue, self.outbox_grace_seconds, missing.min(before))
                    .await?;
            if lost.is_empty() {
                continue;
            }
            if !lead.live() {
                return Err(Interrupted::Lost);
            }
            tracing::warn!(%queue, count = lost.len(), ready, held, queued, "republishing queued jobs whose messages RabbitMQ no longer has");
            self.metrics.acted(Action::RepublishedLost, lost.len());
            // Not through the outbox: a failed publish leaves the shortfall, found again at the next looks.
            let published =
                tokio::time::timeout_at(lead.until, outbox::publish_all(self.outbox.publisher(), lost)).await;
            if published.is_err() {
                tracing::warn!(%queue, "leadership may have lapsed while republishing; the next leader looks again");
            }
        }
        Ok(())
    }

    /// Publishes jobs the pass moved or found, while the leadership can still
    /// be ours: past that, they stay in the outbox for the next leader's sweep.
    async fn publish(&self, jobs: Vec<Enqueued>, lead: &Lead) {
        let count = jobs.len();
        if tokio::time::timeout_at(lead.until, self.outbox.publish(jobs)).await.is_err() {
            tracing::warn!(count, "leadership may have lapsed while publishing; the outbox keeps the rest");
        }
    }
}
