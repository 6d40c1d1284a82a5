//! Jobs kept in memory, already rendered, so that clients polling a job are
//! answered without a round trip to Postgres while it has not changed.
//!
//! Every change a client can see of a job (its creation, status, progress,
//! cancel request) is announced by Postgres on `conveyor_job_changed`, and
//! [`crate::changes`]' listener makes the cache [`forget`](JobCache::forget)
//! those jobs. Operators' requeues and prunes also fire
//! `conveyor_ended_changed`, which empties the cache. Triggers announce them
//! whoever makes them (another replica, the CLI, psql). The cache serves only
//! while it is listening: when the `LISTEN` connection is lost, notifications
//! sent meanwhile are lost too, so it empties and stays off until it listens
//! again. An entry is kept `http.ended_cache_seconds` at most.
//!
//! A read that races a change must not store what it read before it: a miss
//! hands out a [`Ticket`], taken before the read from Postgres, and storing
//! with it does nothing if the cache was emptied, or the job forgotten, in
//! between.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use sha2::{Digest, Sha256};
use shared::job::Job;
use uuid::Uuid;

use crate::caching::Freshness;

/// Jobs forgotten lately, kept to refuse a store that raced one of them; a
/// ticket older than that is refused whatever its job.
const FORGOTTEN_KEPT: usize = 65_536;

/// A job as the API sends it: the JSON body and its strong `ETag`.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub body: Bytes,
    pub etag: String,
}

impl Rendered {
    pub fn of(job: &Job) -> serde_json::Result<Self> {
        let body = serde_json::to_vec(job)?;
        // A digest of the body itself: equal bodies, equal tags, on every replica.
        let digest = Sha256::digest(&body);
        let etag = format!("\"{}\"", shared::hex(&digest[..16]));
        Ok(Self { body: Bytes::from(body), etag })
    }
}

/// A cached job, whose it is, and what clients may assume of it.
#[derive(Debug)]
pub struct Entry {
    pub tenant: String,
    pub rendered: Rendered,
    pub freshness: Freshness,
    stored_at: Instant,
}

impl Entry {
    /// Seconds since it was read from Postgres (the `Age` header).
    pub fn age(&self) -> u64 {
        self.stored_at.elapsed().as_secs()
    }

    fn size(&self) -> usize {
        // Map slot, queue slot and allocation headers, roughly.
        self.rendered.body.len() + self.rendered.etag.len() + self.tenant.len() + 128
    }
}

/// Proof of the cache's state before a read from Postgres (its generation,
/// and how many jobs it had forgotten); see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64, u64);

/// Recently read jobs, bounded in bytes and in age.
#[derive(Debug)]
pub struct JobCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped whenever the cache is emptied or turned on or off.
    generation: u64,
    listening: bool,
    entries: HashMap<Uuid, Arc<Entry>>,
    /// Jobs forgotten so far, and the latest of them, numbered.
    forgets: u64,
    forgotten: VecDeque<(u64, Uuid)>,
    /// Insertion order, for eviction and expiry: each id with when it was
    /// stored, so that a stale slot never evicts a newer entry of the same id.
    order: VecDeque<(Uuid, Instant)>,
    bytes: usize,
}

impl JobCache {
    /// A cache that keeps entries for `ttl` within `max_bytes`; off until
    /// the listener has its `LISTEN` in place. A zero `ttl` or `max_bytes`
    /// keeps nothing.
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), ttl, max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections cannot leave the map half-updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry of `id`, or (when there is none) the [`Ticket`] to store
    /// what the caller is about to read from Postgres.
    pub fn get(&self, id: Uuid) -> Result<Arc<Entry>, Ticket> {
        let mut inner = self.lock();
        self.expire(&mut inner);
        inner.entries.get(&id).map(Arc::clone).ok_or(Ticket(inner.generation, inner.forgets))
    }

    /// Drops entries older than the ttl, oldest first (they are in `order`).
    fn expire(&self, inner: &mut Inner) {
        while let Some(&(id, stored_at)) = inner.order.front() {
            if stored_at.elapsed() < self.ttl {
                break;
            }
            inner.order.pop_front();
            Self::remove(inner, id, stored_at);
        }
    }

    /// Removes `id`'s entry if it is the one stored at `stored_at`.
    fn remove(inner: &mut Inner, id: Uuid, stored_at: Instant) {
        if inner.entries.get(&id).is_some_and(|entry| entry.stored_at == stored_at)
            && let Some(entry) = inner.entries.remove(&id)
        {
            inner.bytes -= entry.size();
        }
    }

    /// Stores a job read after `ticket` was taken, unless the cache was
    /// emptied or the job forgotten since (the read may predate the change).
    pub fn insert(&self, ticket: Ticket, id: Uuid, tenant: &str, rendered: Rendered, freshness: Freshness) {
        let stored_at = Instant::now();
        let entry = Entry { tenant: tenant.to_owned(), rendered, freshness, stored_at };
        let size = entry.size();
        // One big job must not push out hundreds of small ones.
        if size > self.max_bytes / 64 {
            return;
        }
        let mut inner = self.lock();
        self.expire(&mut inner);
        if !inner.listening || inner.generation != ticket.0 || inner.entries.contains_key(&id) {
            return;
        }
        if inner.forgets > ticket.1 {
            let oldest = inner.forgotten.front().map_or(u64::MAX, |&(n, _)| n);
            let since = inner.forgotten.iter().rev().take_while(|&&(n, _)| n > ticket.1);
            if oldest > ticket.1 + 1 || since.clone().any(|&(_, forgotten)| forgotten == id) {
                return;
            }
        }
        while inner.bytes + size > self.max_bytes {
            let Some((oldest, at)) = inner.order.pop_front() else { break };
            Self::remove(&mut inner, oldest, at);
        }
        inner.entries.insert(id, Arc::new(entry));
        inner.order.push_back((id, stored_at));
        inner.bytes += size;
    }

    /// Forgets these jobs, which changed (and voids outstanding tickets for them).
    pub fn forget(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut inner = self.lock();
        for id in ids {
            inner.forgets += 1;
            let n = inner.forgets;
            if inner.forgotten.len() == FORGOTTEN_KEPT {
                inner.forgotten.pop_front();
            }
            inner.forgotten.push_back((n, id));
            // Its slot in `order` stays, and is skipped once it comes up.
            if let Some(entry) = inner.entries.remove(&id) {
                inner.bytes -= entry.size();
            }
        }
    }

    /// Forgets every entry (and voids outstanding tickets).
    pub fn clear(&self) {
        let mut inner = self.lock();
        Self::empty(&mut inner);
    }

    /// Whether the listener hears changes; the cache serves only while it does.
    pub fn set_listening(&self, listening: bool) {
        let mut inner = self.lock();
        inner.listening = listening;
        Self::empty(&mut inner);
    }

    fn empty(inner: &mut Inner) {
        inner.generation += 1;
        inner.entries.clear();
        inner.order.clear();
        inner.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDED: Freshness = Freshness::Ended { max_age: 60 };

    #[test]
    fn a_changed_job_is_forgotten_and_a_read_older_than_the_change_not_stored() {
        let cache = listening(Duration::from_secs(60), 1 << 20);
        let (id, other) = (Uuid::now_v7(), Uuid::now_v7());
        let live = Freshness::Live { retry_after: 1 };
        cache.insert(ticket(&cache, id), id, "t", rendered("{}"), live);
        assert_eq!(cache.get(id).map(|entry| entry.freshness).ok(), Some(live));
        cache.forget([id]);
        assert!(cache.get(id).is_err(), "forgotten");

        let (before, before_other) = (ticket(&cache, id), ticket(&cache, other));
        cache.forget([id]);
        cache.insert(before, id, "t", rendered("{}"), live);
        assert!(cache.get(id).is_err(), "read before the change: not stored");
        cache.insert(before_other, other, "t", rendered("{}"), live);
        assert!(cache.get(other).is_ok(), "another job's change does not matter");
        let after = ticket(&cache, id);
        cache.insert(after, id, "t", rendered("{}"), live);
        assert!(cache.get(id).is_ok(), "read after the change: stored");
        assert_eq!(cache.lock().bytes, 2 * (2 + 3 + 1 + 128));
    }

    fn rendered(body: &str) -> Rendered {
        Rendered { body: Bytes::copy_from_slice(body.as_bytes()), etag: "\"x\"".to_owned() }
    }

    fn ticket(cache: &JobCache, id: Uuid) -> Ticket {
        cache.get(id).err().unwrap_or(Ticket(u64::MAX, 0))
    }

    fn listening(ttl: Duration, max_bytes: usize) -> JobCache {
        let cache = JobCache::new(ttl, max_bytes);
        cache.set_listening(true);
        cache
    }

    #[test]
    fn serves_what_was_stored_until_it_expires() {
        let cache = listening(Duration::from_millis(50), 1 << 20);
        let id = Uuid::now_v7();
        cache.insert(ticket(&cache, id), id, "t", rendered("{}"), ENDED);
        assert_eq!(cache.get(id).map(|e| e.tenant.clone()).ok().as_deref(), Some("t"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(id).is_err());
    }

    #[test]
    fn a_read_older_than_a_clear_is_not_stored() {
        let cache = listening(Duration::from_secs(60), 1 << 20);
        let id = Uuid::now_v7();
        let before = ticket(&cache, id);
        cache.clear();
        cache.insert(before, id, "t", rendered("{}"), ENDED);
        assert!(cache.get(id).is_err());
    }

    #[test]
    fn stores_nothing_while_not_listening() {
        let cache = JobCache::new(Duration::from_secs(60), 1 << 20);
        let id = Uuid::now_v7();
        cache.insert(ticket(&cache, id), id, "t", rendered("{}"), ENDED);
        assert!(cache.get(id).is_err());
    }

    #[test]
    fn evicts_the_oldest_to_stay_within_its_bytes() {
        let body = "x".repeat(100);
        let size = 100 + 3 + 1 + 128;
        let cache = listening(Duration::from_secs(60), size * 64);
        let ids: Vec<_> = (0..65).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            cache.insert(ticket(&cache, *id), *id, "t", rendered(&body), ENDED);
        }
        assert!(cache.get(ids[0]).is_err(), "the oldest makes room");
        assert!(ids[1..].iter().all(|id| cache.get(*id).is_ok()));
        assert_eq!(cache.lock().bytes, size * 64);
    }

    #[test]
    fn expired_entries_leave_no_trace() {
        let cache = listening(Duration::from_millis(20), 1 << 20);
        for _ in 0..10 {
            let id = Uuid::now_v7();
            cache.insert(ticket(&cache, id), id, "t", rendered("{}"), ENDED);
        }
        std::thread::sleep(Duration::from_millis(30));
        let id = Uuid::now_v7();
        cache.insert(ticket(&cache, id), id, "t", rendered("{}"), ENDED);
        let inner = cache.lock();
        assert_eq!((inner.entries.len(), inner.order.len()), (1, 1), "no slot kept for an expired entry");
        assert_eq!(inner.bytes, 2 + 3 + 1 + 128);
    }
}
