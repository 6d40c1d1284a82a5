//! What an API process hears from Postgres, on its one `LISTEN` connection:
//! which jobs changed (for long-polls, [`Changes`]) and that an ended job
//! changed (for the ended-job cache, [`EndedJobs`]).
//!
//! Waiters register a job id before they read the job, so a change that
//! lands between their read and their wait still wakes them. A notification
//! wakes every waiter of each id it names, in memory: waiting costs no query.
//! While the connection is down, notifications are lost, so [`Changes`] says
//! it is not listening and waiters fall back to short waits, re-reading the
//! job every [`SHORT_WAIT`], until it is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shared::db::{ENDED_CHANGED_CHANNEL, JOB_CHANGED_CHANNEL, notify};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::cache::EndedJobs;

/// How often a waiter re-reads its job while changes are not heard.
pub const SHORT_WAIT: Duration = Duration::from_secs(1);

/// The waiters of each job, woken when Postgres says it changed.
#[derive(Debug, Default)]
pub struct Changes {
    waiters: Mutex<HashMap<Uuid, Waiters>>,
    listening: AtomicBool,
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

    /// Wakes the waiters of every id in `payload` (comma-separated).
    fn changed(&self, payload: &str) {
        let waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if waiters.is_empty() {
            return;
        }
        for id in payload.split(',').filter_map(|id| Uuid::parse_str(id).ok()) {
            if let Some(entry) = waiters.get(&id) {
                entry.notify.notify_waiters();
            }
        }
    }

    /// Changes are heard, or no longer: either way every waiter re-reads.
    fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
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
    ended: Arc<EndedJobs>,
    backoff: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                listened = listen(&pool, &changes, &ended) => if let Err(e) = listened {
                    tracing::debug!(error = %e, "job change listener lost; long-polls poll and the cache is off until it is back");
                },
            }
            changes.set_listening(false);
            ended.set_listening(false);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
        }
    })
}

async fn listen(pool: &PgPool, changes: &Changes, ended: &EndedJobs) -> shared::db::Result<()> {
    let mut listener = notify::listen_all(pool, &[ENDED_CHANGED_CHANNEL, JOB_CHANGED_CHANNEL]).await?;
    ended.set_listening(true);
    changes.set_listening(true);
    // `None`: the connection was lost, and with it what was notified meanwhile.
    while let Some((channel, payload)) = listener.recv_from().await? {
        if channel == JOB_CHANGED_CHANNEL {
            changes.changed(&payload);
        } else {
            ended.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_is_woken_by_its_ids_only_and_forgotten_when_dropped() {
        let changes = Arc::new(Changes::default());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let watch = changes.watch(a);
        let second = changes.watch(a);
        {
            let mut woken = std::pin::pin!(watch.notify().notified());
            woken.as_mut().enable();
            changes.changed(&b.to_string());
            assert!(futures_lite::future::block_on(futures_lite::future::poll_once(woken.as_mut())).is_none());
            changes.changed(&format!("{b},{a}"));
            assert!(futures_lite::future::block_on(futures_lite::future::poll_once(woken.as_mut())).is_some());
        }
        assert_eq!(changes.watched(), 1);
        drop(watch);
        assert_eq!(changes.watched(), 1, "the second watch of the same job keeps it");
        drop(second);
        assert_eq!(changes.watched(), 0);
    }
}
