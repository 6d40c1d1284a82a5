//! What an API process hears from Postgres, on its one `LISTEN` connection:
//! how jobs changed (for long-polls, server-sent events and the job cache,
//! [`Changes`], [`JobCache`]) and that operators requeued or pruned jobs
//! (which empties the cache).
//!
//! Each notification on the job channel is a [`Batch`]: a number Postgres
//! gave it and every change, as the trigger saw it (see the migration
//! `job_change_events`). A batch wakes the long-poll waiters of the ids it
//! names, in memory, and is appended to a bounded log ([`Log`]) that event
//! streams read and resume from: waiting and streaming cost no query.
//!
//! Waiters register a job id before they read the job, so a change that
//! lands between their read and their wait still wakes them; streams take
//! their place in the log before they read, for the same reason.
//!
//! While the connection is down, notifications are lost, so [`Changes`] says
//! it is not listening: waiters fall back to short waits, re-reading the
//! job every [`SHORT_WAIT`], until it is back; the log is emptied (what it
//! held can no longer be resumed past the gap) and open streams end.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shared::config::EventsSettings;
use shared::db::{ENDED_CHANGED_CHANNEL, JOB_CHANGED_CHANNEL, notify};
use shared::job::JobStatus;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::cache::JobCache;

/// How often a waiter re-reads its job while changes are not heard.
pub const SHORT_WAIT: Duration = Duration::from_secs(1);

/// Distinct queue, type and tenant names kept for sharing between changes;
/// past it the set starts over (names are only shared less).
const NAMES_REMEMBERED: usize = 4096;

/// One change to one job, as Postgres' trigger saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub id: Uuid,
    pub status: JobStatus,
    pub progress: Option<i16>,
    pub cancel_requested: bool,
    pub queue: Arc<str>,
    pub kind: Arc<str>,
    pub tenant: Arc<str>,
}

/// One notification: the number Postgres gave it, and its changes in order.
#[derive(Debug)]
pub struct Batch {
    pub seq: i64,
    pub changes: Vec<Change>,
    received: Instant,
}

impl Batch {
    /// A notification's payload, or `None` if it is not one.
    fn parse(payload: &str, names: &mut Names) -> Option<Self> {
        let mut lines = payload.split('\n');
        let seq = lines.next()?.parse().ok()?;
        let changes = lines.filter_map(|line| Change::parse(line, names)).collect();
        Some(Self { seq, changes, received: Instant::now() })
    }
}

impl Change {
    /// `<id> <status> <progress|-> <0|1> <queue> <type> <tenant>`.
    fn parse(line: &str, names: &mut Names) -> Option<Self> {
        let mut fields = line.split(' ');
        let id = Uuid::parse_str(fields.next()?).ok()?;
        let status = fields.next()?.parse().ok()?;
        let progress = match fields.next()? {
            "-" => None,
            progress => Some(progress.parse().ok()?),
        };
        let cancel_requested = fields.next()? == "1";
        let (queue, kind, tenant) = (fields.next()?, fields.next()?, fields.next()?);
        Some(Self {
            id,
            status,
            progress,
            cancel_requested,
            queue: names.intern(queue),
            kind: names.intern(kind),
            tenant: names.intern(tenant),
        })
    }
}

/// Names shared by every change that carries them.
#[derive(Default)]
struct Names(HashSet<Arc<str>>);

impl Names {
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        if self.0.len() >= NAMES_REMEMBERED {
            self.0.clear();
        }
        let name: Arc<str> = Arc::from(name);
        self.0.insert(name.clone());
        name
    }
}

/// An event's id: line `index` (from 0) of the notification numbered `seq`.
/// Every replica hears the same notifications in the same order, so an id
/// names the same change, and the same place in the log, on each of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventId {
    pub seq: i64,
    pub index: usize,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.seq, self.index)
    }
}

impl FromStr for EventId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (seq, index) = s.split_once('-').ok_or(())?;
        Ok(Self { seq: seq.parse().map_err(drop)?, index: index.parse().map_err(drop)? })
    }
}

/// A reader's place in the [`Log`]: the next batch to read and how many of
/// its changes were already read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    epoch: u64,
    next: u64,
    skip: usize,
}

/// Why a reader cannot go on from its [`Cursor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// What it had yet to read was dropped: it fell behind the log's bounds.
    Lagged,
    /// The log was emptied (the listening connection was lost): changes
    /// since the reader's place may never have been heard.
    Reset,
}

/// The batches heard lately, oldest first, within
/// `events.replay_seconds` and `events.replay_changes`.
#[derive(Debug)]
pub struct Log {
    batches: VecDeque<Arc<Batch>>,
    /// Position of `batches[0]`. Positions count every batch ever held, so
    /// a cursor keeps its meaning as old batches are dropped.
    first: u64,
    /// Where each held batch is, by its number.
    positions: HashMap<i64, u64>,
    /// Changes in `batches`.
    held: usize,
    /// Bumped when the log is emptied.
    epoch: u64,
    replay: Duration,
    max_changes: usize,
}

impl Log {
    fn new(replay: Duration, max_changes: usize) -> Self {
        Self { batches: VecDeque::new(), first: 0, positions: HashMap::new(), held: 0, epoch: 0, replay, max_changes }
    }

    fn end_position(&self) -> u64 {
        self.first + self.batches.len() as u64
    }

    fn push(&mut self, batch: Arc<Batch>) {
        self.held += batch.changes.len();
        self.positions.insert(batch.seq, self.end_position());
        self.batches.push_back(batch);
        let now = Instant::now();
        while self.batches.len() > 1 {
            let Some(oldest) = self.batches.front() else { break };
            if self.held <= self.max_changes && now.duration_since(oldest.received) <= self.replay {
                break;
            }
            self.held -= oldest.changes.len();
            if self.positions.get(&oldest.seq) == Some(&self.first) {
                self.positions.remove(&oldest.seq);
            }
            self.batches.pop_front();
            self.first += 1;
        }
    }

    /// Forgets everything: nothing held can be resumed past the gap to come.
    fn clear(&mut self) {
        self.first = self.end_position();
        self.batches.clear();
        self.positions.clear();
        self.held = 0;
        self.epoch += 1;
    }

    /// The place after everything heard so far.
    pub fn end(&self) -> Cursor {
        Cursor { epoch: self.epoch, next: self.end_position(), skip: 0 }
    }

    /// The place just after the change `id`, if it is still held.
    pub fn resume(&self, id: EventId) -> Option<Cursor> {
        let position = *self.positions.get(&id.seq)?;
        let batch = self.batches.get(usize::try_from(position - self.first).ok()?)?;
        (id.index < batch.changes.len()).then(|| Cursor { epoch: self.epoch, next: position, skip: id.index + 1 })
    }

    /// Every change after `cursor` (each batch with how many of its changes
    /// to skip), moving `cursor` past them.
    pub fn read(&self, cursor: &mut Cursor) -> Result<Vec<(Arc<Batch>, usize)>, Gone> {
        if cursor.epoch != self.epoch {
            return Err(Gone::Reset);
        }
        if cursor.next < self.first {
            return Err(Gone::Lagged);
        }
        let from = usize::try_from(cursor.next - self.first).map_err(|_| Gone::Lagged)?;
        let mut read: Vec<_> = self.batches.range(from.min(self.batches.len())..).map(|b| (b.clone(), 0)).collect();
        if let Some(first) = read.first_mut() {
            first.1 = cursor.skip;
        }
        *cursor = self.end();
        Ok(read)
    }

    /// The id of the last change before `cursor`, if it is still held: what
    /// a client resumes from to miss nothing after it.
    pub fn last_id(&self, cursor: &Cursor) -> Option<EventId> {
        if cursor.epoch != self.epoch || cursor.next < self.first {
            return None;
        }
        let at = usize::try_from(cursor.next - self.first).ok()?;
        let (batch, seen) = match cursor.skip {
            0 => (self.batches.get(at.checked_sub(1)?)?, None),
            skip => (self.batches.get(at)?, Some(skip)),
        };
        let seen = seen.unwrap_or(batch.changes.len());
        Some(EventId { seq: batch.seq, index: seen.checked_sub(1)? })
    }
}

/// The waiters of each job, woken when Postgres says it changed, and the
/// log of those changes for event streams.
#[derive(Debug)]
pub struct Changes {
    waiters: Mutex<HashMap<Uuid, Waiters>>,
    listening: AtomicBool,
    log: Mutex<Log>,
    /// Bumped at every batch and reset: event streams wait on it.
    heard: watch::Sender<u64>,
}

#[derive(Debug)]
struct Waiters {
    notify: Arc<Notify>,
    count: usize,
}

/// A registered interest in one job's changes; dropping it unregisters.
pub struct Watch {
    changes: Arc<Changes>,
    id: Uuid,
    notify: Arc<Notify>,
}

impl Watch {
    /// The wake-up of this job's next change (or of a lost connection).
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.changes.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = waiters.get_mut(&self.id) {
            entry.count -= 1;
            if entry.count == 0 {
                waiters.remove(&self.id);
            }
        }
    }
}

impl Changes {
    pub fn new(settings: &EventsSettings) -> Self {
        Self {
            waiters: Mutex::default(),
            listening: AtomicBool::new(false),
            log: Mutex::new(Log::new(Duration::from_secs(settings.replay_seconds), settings.replay_changes)),
            heard: watch::Sender::new(0),
        }
    }

    /// Registers interest in job `id`'s changes.
    pub fn watch(self: &Arc<Self>, id: Uuid) -> Watch {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = waiters.entry(id).or_insert_with(|| Waiters { notify: Arc::new(Notify::new()), count: 0 });
        entry.count += 1;
        Watch { changes: self.clone(), id, notify: entry.notify.clone() }
    }

    /// Whether changes are heard now; if not, waiters re-read every [`SHORT_WAIT`].
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Jobs being waited for now, in this process.
    pub fn watched(&self) -> usize {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// What changed in the log since the receiver last looked. Take it
    /// before a place in the log, so that nothing pushed after the place is
    /// missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.heard.subscribe()
    }

    /// The log, to take a place in it or read from one.
    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the waiters of every job the batch names and appends it to the log.
    fn heard(&self, batch: Batch) {
        {
            let waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            if !waiters.is_empty() {
                for change in &batch.changes {
                    if let Some(entry) = waiters.get(&change.id) {
                        entry.notify.notify_waiters();
                    }
                }
            }
        }
        self.log().push(Arc::new(batch));
        self.heard.send_modify(|heard| *heard += 1);
    }

    /// Changes are heard, or no longer: either way every waiter re-reads;
    /// when they are no longer heard, the log is emptied and streams end.
    fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
        if !listening {
            self.log().clear();
            self.heard.send_modify(|heard| *heard += 1);
        }
        for entry in self.waiters.lock().unwrap_or_else(PoisonError::into_inner).values() {
            entry.notify.notify_waiters();
        }
    }
}

/// Listens on both channels until `stop`, reconnecting after `backoff` when
/// the connection is lost; while it is down the cache is off and waiters
/// poll.
pub fn spawn_listener(
    tasks: &TaskTracker,
    pool: PgPool,
    changes: Arc<Changes>,
    cache: Arc<JobCache>,
    backoff: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tasks.spawn(async move {
        let mut names = Names::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                listened = listen(&pool, &changes, &cache, &mut names) => if let Err(e) = listened {
                    tracing::debug!(error = %e, "job change listener lost; long-polls poll, event streams end and the cache is off until it is back");
                },
            }
            changes.set_listening(false);
            cache.set_listening(false);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
        }
    })
}

async fn listen(pool: &PgPool, changes: &Changes, cache: &JobCache, names: &mut Names) -> shared::db::Result<()> {
    let mut listener = notify::listen_all(pool, &[ENDED_CHANGED_CHANNEL, JOB_CHANGED_CHANNEL]).await?;
    cache.set_listening(true);
    changes.set_listening(true);
    // `None`: the connection was lost, and with it what was notified meanwhile.
    while let Some((channel, payload)) = listener.recv_from().await? {
        if channel != JOB_CHANGED_CHANNEL {
            cache.clear();
        } else if let Some(batch) = Batch::parse(&payload, names) {
            // Before the waiters wake: they read through the cache.
            cache.forget(batch.changes.iter().map(|change| change.id));
            changes.heard(batch);
        } else {
            tracing::warn!(payload = %payload.chars().take(80).collect::<String>(), "unreadable job change notification");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(replay_seconds: u64, replay_changes: usize) -> EventsSettings {
        EventsSettings { replay_seconds, replay_changes, heartbeat_seconds: 15 }
    }

    /// A notification as the trigger writes it, one line per `(id, status)`.
    fn payload(seq: i64, changes: &[(Uuid, &str)]) -> String {
        let mut payload = seq.to_string();
        for (id, status) in changes {
            payload.push_str(&format!("\n{id} {status} - 0 default sleep acme"));
        }
        payload
    }

    fn batch(seq: i64, changes: &[(Uuid, &str)]) -> Batch {
        Batch::parse(&payload(seq, changes), &mut Names::default()).expect("a valid payload")
    }

    fn read_ids(changes: &Changes, cursor: &mut Cursor) -> Result<Vec<EventId>, Gone> {
        let batches = changes.log().read(cursor)?;
        Ok(batches
            .iter()
            .flat_map(|(batch, skip)| (*skip..batch.changes.len()).map(|index| EventId { seq: batch.seq, index }))
            .collect())
    }

    #[test]
    fn a_notification_is_read_as_the_trigger_wrote_it() {
        let id = Uuid::now_v7();
        let mut names = Names::default();
        let batch = Batch::parse(&format!("42\n{id} running 40 1 default sleep acme\n{id} bogus"), &mut names)
            .expect("a valid payload");
        assert_eq!(batch.seq, 42);
        assert_eq!(batch.changes.len(), 1, "an unreadable line is skipped, not the notification");
        let change = &batch.changes[0];
        assert_eq!(
            (change.id, change.status, change.progress, change.cancel_requested),
            (id, JobStatus::Running, Some(40), true)
        );
        assert_eq!((&*change.queue, &*change.kind, &*change.tenant), ("default", "sleep", "acme"));
        assert!(Batch::parse(&id.to_string(), &mut names).is_none(), "ids alone are not a notification");
        assert_eq!("7-3".parse::<EventId>(), Ok(EventId { seq: 7, index: 3 }));
        assert_eq!(EventId { seq: 7, index: 3 }.to_string(), "7-3");
        assert!("7".parse::<EventId>().is_err() && "a-1".parse::<EventId>().is_err());
    }

    #[test]
    fn a_watch_is_woken_by_its_ids_only_and_forgotten_when_dropped() {
        let changes = Arc::new(Changes::new(&settings(60, 100)));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let watch = changes.watch(a);
        let second = changes.watch(a);
        {
            let mut woken = std::pin::pin!(watch.notify().notified());
            woken.as_mut().enable();
            changes.heard(batch(1, &[(b, "running")]));
            assert!(futures_lite::future::block_on(futures_lite::future::poll_once(woken.as_mut())).is_none());
            changes.heard(batch(2, &[(b, "succeeded"), (a, "running")]));
            assert!(futures_lite::future::block_on(futures_lite::future::poll_once(woken.as_mut())).is_some());
        }
        assert_eq!(changes.watched(), 1);
        drop(watch);
        assert_eq!(changes.watched(), 1, "the second watch of the same job keeps it");
        drop(second);
        assert_eq!(changes.watched(), 0);
    }

    #[test]
    fn a_reader_resumes_after_the_id_it_saw_and_misses_nothing() {
        let changes = Changes::new(&settings(60, 100));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut cursor = changes.log().end();
        assert_eq!(changes.log().last_id(&cursor), None, "nothing heard yet");
        changes.heard(batch(10, &[(a, "running"), (b, "running")]));
        changes.heard(batch(9, &[(a, "succeeded")]));
        let id = |seq, index| EventId { seq, index };
        assert_eq!(read_ids(&changes, &mut cursor), Ok(vec![id(10, 0), id(10, 1), id(9, 0)]));
        assert_eq!(read_ids(&changes, &mut cursor), Ok(vec![]));
        assert_eq!(changes.log().last_id(&cursor), Some(id(9, 0)));

        // Numbers need not rise: the log's order (the commit order) decides.
        let mut resumed = changes.log().resume(id(10, 0)).expect("held");
        assert_eq!(changes.log().last_id(&resumed), Some(id(10, 0)));
        assert_eq!(read_ids(&changes, &mut resumed), Ok(vec![id(10, 1), id(9, 0)]));
        let mut resumed = changes.log().resume(id(10, 1)).expect("held");
        assert_eq!(read_ids(&changes, &mut resumed), Ok(vec![id(9, 0)]));
        assert!(changes.log().resume(id(10, 2)).is_none(), "batch 10 has two changes");
        assert!(changes.log().resume(id(11, 0)).is_none(), "never heard");
    }

    #[test]
    fn the_log_keeps_at_most_its_changes_and_a_reader_behind_them_is_told() {
        let changes = Changes::new(&settings(60, 3));
        let job = Uuid::now_v7();
        let mut behind = changes.log().end();
        for seq in 1..=5 {
            changes.heard(batch(seq, &[(job, "running")]));
        }
        assert_eq!(read_ids(&changes, &mut behind), Err(Gone::Lagged));
        assert!(changes.log().resume(EventId { seq: 2, index: 0 }).is_none(), "dropped");
        assert!(changes.log().resume(EventId { seq: 3, index: 0 }).is_some(), "held");
        assert_eq!(changes.log().held, 3);
    }

    #[test]
    fn the_log_keeps_changes_for_its_replay_window_only() {
        let changes = Changes::new(&settings(0, 100));
        let job = Uuid::now_v7();
        changes.heard(batch(1, &[(job, "running")]));
        std::thread::sleep(Duration::from_millis(2));
        changes.heard(batch(2, &[(job, "succeeded")]));
        assert!(changes.log().resume(EventId { seq: 1, index: 0 }).is_none(), "older than the window");
        assert!(changes.log().resume(EventId { seq: 2, index: 0 }).is_some(), "the newest batch stays");
    }

    #[test]
    fn losing_the_connection_empties_the_log_and_ends_its_readers() {
        let changes = Changes::new(&settings(60, 100));
        let job = Uuid::now_v7();
        changes.heard(batch(1, &[(job, "running")]));
        let mut reader = changes.log().end();
        let heard = changes.subscribe();
        changes.set_listening(false);
        assert!(heard.has_changed().unwrap_or(false), "readers are woken");
        assert_eq!(read_ids(&changes, &mut reader), Err(Gone::Reset));
        assert!(changes.log().resume(EventId { seq: 1, index: 0 }).is_none());
        changes.set_listening(true);
        let mut fresh = changes.log().end();
        changes.heard(batch(2, &[(job, "succeeded")]));
        assert_eq!(read_ids(&changes, &mut fresh), Ok(vec![EventId { seq: 2, index: 0 }]));
    }
}
