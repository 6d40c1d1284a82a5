//! Rate limits (GCRA, as in `governor`): per client address before
//! authentication, per tenant after it.
//!
//! The address limit runs in middleware ahead of every route, so a flood of
//! made-up tokens is refused without a key lookup. The tenant limit runs once
//! the caller is known ([`crate::auth`]): a tenant's keys and JWTs share one
//! bucket at `rate_limit.tenant_*`, and a key created with a limit of its own
//! has a bucket of its own at that rate.
//!
//! With `rate_limit.backend = "redis"` the tenant buckets live in Redis, so
//! every replica draws from the same bucket. When Redis cannot be reached, the
//! process falls back to its own buckets (the limit then holds per replica),
//! says so in `/readyz` and the log, and goes back to Redis once it answers:
//! the limiter being down never refuses traffic.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::HttpMessage as _;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{ResponseError as _, web};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use shared::config::{RateLimitBackend, RateLimitSettings};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::overload;

/// A rate: `per_second` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    /// `None`, no limit, when either is 0.
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        Some(Self { per_second: NonZeroU32::new(per_second)?, burst: NonZeroU32::new(burst)? })
    }

    /// The time one request's worth of the bucket takes to come back.
    fn interval(self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.per_second.get()))
    }

    /// What one request costs: `cost` requests' worth, capped at the burst so
    /// that anything the bucket can hold when full is admitted when it is.
    fn cost(self, cost: u32) -> NonZeroU32 {
        NonZeroU32::new(cost.clamp(1, self.burst.get())).unwrap_or(NonZeroU32::MIN)
    }
}

/// What a check decided, in the terms of the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket's size: the burst.
    pub limit: u32,
    /// Requests the bucket still holds.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until this request would be admitted; zero when it was.
    pub retry_after: Duration,
}

/// Whole seconds, rounded up: a client told `0` would retry at once.
pub fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Decision {
    /// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 3] {
        [
            (HeaderName::from_static("ratelimit-limit"), HeaderValue::from(self.limit)),
            (HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(self.remaining)),
            (HeaderName::from_static("ratelimit-reset"), HeaderValue::from(ceil_seconds(self.reset))),
        ]
    }
}

type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, StateInformationMiddleware>;

/// Buckets kept in this process, one per key, grouped by rate (a `governor`
/// limiter has one quota). Idle buckets are dropped by [`Buckets::evict`].
pub struct Buckets<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    clock: C,
    by_rate: RwLock<HashMap<Rate, Arc<Keyed<K, C>>>>,
}

impl<K: Hash + Eq + Clone> Default for Buckets<K> {
    fn default() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> Buckets<K, C> {
    pub fn with_clock(clock: C) -> Self {
        Self { clock, by_rate: RwLock::new(HashMap::new()) }
    }

    fn limiter(&self, rate: Rate) -> Arc<Keyed<K, C>> {
        if let Ok(by_rate) = self.by_rate.read()
            && let Some(limiter) = by_rate.get(&rate)
        {
            return limiter.clone();
        }
        let fresh = || {
            let quota = Quota::with_period(rate.interval()).unwrap_or(Quota::per_second(rate.per_second));
            Arc::new(
                RateLimiter::dashmap_with_clock(quota.allow_burst(rate.burst), self.clock.clone())
                    .with_middleware::<StateInformationMiddleware>(),
            )
        };
        match self.by_rate.write() {
            Ok(mut by_rate) => by_rate.entry(rate).or_insert_with(fresh).clone(),
            // A poisoned map still must not let traffic through unlimited.
            Err(_) => fresh(),
        }
    }

    /// Takes `cost` requests' worth from `key`'s bucket, if it holds them.
    pub fn check(&self, key: &K, rate: Rate, cost: u32) -> Decision {
        let limiter = self.limiter(rate);
        let cost = rate.cost(cost);
        let interval = rate.interval();
        match limiter.check_key_n(key, cost) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: rate.burst.get(),
                    remaining,
                    reset: interval * (rate.burst.get() - remaining.min(rate.burst.get())),
                    retry_after: Duration::ZERO,
                }
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Decision {
                    allowed: false,
                    limit: rate.burst.get(),
                    remaining: 0,
                    reset: wait + interval * (rate.burst.get() - cost.get()),
                    retry_after: wait,
                }
            }
            // Unreachable: the cost is capped at the burst.
            Err(_) => Decision {
                allowed: false,
                limit: rate.burst.get(),
                remaining: 0,
                reset: interval * rate.burst.get(),
                retry_after: interval * rate.burst.get(),
            },
        }
    }

    /// Drops the buckets that are full again (indistinguishable from new).
    pub fn evict(&self) {
        let limiters: Vec<_> = match self.by_rate.read() {
            Ok(by_rate) => by_rate.values().cloned().collect(),
            Err(_) => return,
        };
        for limiter in limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.by_rate.read().map(|by_rate| by_rate.values().map(|l| l.len()).sum()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bucket of an address: IPv4 as is, IPv6 by its /64, the block one
/// subscriber usually holds whole (a limit per IPv6 address is a limit per
/// attacker's whim).
pub fn address_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Whose bucket a request draws from once its caller is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// The tenant's shared bucket.
    Tenant(String),
    /// A key with a rate of its own.
    Key(uuid::Uuid),
}

impl Bucket {
    fn redis_key(&self, namespace: &str) -> String {
        match self {
            Self::Tenant(tenant) => format!("{namespace}:rate:tenant:{tenant}"),
            Self::Key(id) => format!("{namespace}:rate:key:{id}"),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Self::Tenant(_) => "this tenant",
            Self::Key(_) => "this API key",
        }
    }
}

/// A refusal: which limit, and the decision behind it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub whose: &'static str,
    pub rate: Rate,
    pub decision: Decision,
}

/// Every limit of one API process.
pub struct Limits {
    address: Option<Rate>,
    addresses: Buckets<IpAddr>,
    tenant: Option<Rate>,
    tenants: Buckets<Bucket>,
    redis: Option<redis_store::Store>,
    trusted_proxies: Vec<IpNet>,
}

/// How often idle buckets are dropped and a lost Redis is tried again.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

impl Limits {
    /// Connects to Redis when that is the backend; an unreachable Redis is
    /// not an error (the local fallback serves until it answers).
    pub async fn new(settings: &RateLimitSettings, trusted_proxies: &[String], namespace: &str) -> Arc<Self> {
        let redis = match settings.backend {
            RateLimitBackend::Local => None,
            RateLimitBackend::Redis => Some(redis_store::Store::connect(&settings.redis_url, namespace).await),
        };
        Arc::new(Self {
            address: Rate::new(settings.ip_per_second, settings.ip_burst),
            addresses: Buckets::default(),
            tenant: Rate::new(settings.tenant_per_second, settings.tenant_burst),
            tenants: Buckets::default(),
            redis,
            // Validated with the settings; anything unparsable was refused there.
            trusted_proxies: trusted_proxies.iter().filter_map(|cidr| parse_proxy(cidr).ok()).collect(),
        })
    }

    /// The client's address: the peer, or when the peer is a trusted proxy,
    /// the nearest address in `X-Forwarded-For` that is not one.
    pub fn client_address<'a>(&self, peer: IpAddr, forwarded_for: impl Iterator<Item = &'a str>) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|net| net.contains(&ip.to_canonical()));
        if !trusted(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded_for.flat_map(|value| value.split(',')).collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => client = ip,
                // A hop we cannot read ends what we can believe.
                Err(_) => break,
            }
            if !trusted(client) {
                break;
            }
        }
        client
    }

    /// Checks the address limit; `None` when it is off.
    pub fn check_address(&self, ip: IpAddr) -> Option<Result<Decision, Refusal>> {
        let rate = self.address?;
        let decision = self.addresses.check(&address_bucket(ip), rate, 1);
        Some(if decision.allowed {
            Ok(decision)
        } else {
            Err(Refusal { whose: "this client address", rate, decision })
        })
    }

    /// Takes what a request costs (at most the burst) less what it `paid`
    /// before from the caller's bucket; `None` when no limit applies or
    /// nothing is left to take.
    pub async fn charge(
        &self,
        bucket: &Bucket,
        own: Option<Rate>,
        cost: u32,
        paid: u32,
    ) -> Option<Result<Decision, Refusal>> {
        let rate = own.or(self.tenant)?;
        let cost = cost.min(rate.burst.get()).checked_sub(paid).filter(|c| *c > 0)?;
        let from_redis = match &self.redis {
            Some(redis) => redis.check(bucket, rate, cost).await,
            None => None,
        };
        let decision = from_redis.unwrap_or_else(|| self.tenants.check(bucket, rate, cost));
        Some(if decision.allowed { Ok(decision) } else { Err(Refusal { whose: bucket.describe(), rate, decision }) })
    }

    /// What `/readyz` says of the limiter: `None` when there is nothing to say.
    pub fn degraded(&self) -> Option<&'static str> {
        match &self.redis {
            Some(redis) if !redis.is_up() => {
                Some("redis unreachable: tenant limits are held per replica until it answers")
            }
            _ => None,
        }
    }

    /// The backend in use, for `/readyz`.
    pub fn backend(&self) -> &'static str {
        match &self.redis {
            None => "local",
            Some(redis) if redis.is_up() => "redis",
            Some(_) => "local (fallback)",
        }
    }

    /// Drops idle buckets and retries a lost Redis, every second until `stop`.
    pub fn spawn_housekeeping(self: &Arc<Self>, tasks: &TaskTracker, stop: CancellationToken) {
        let limits = self.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                limits.addresses.evict();
                limits.tenants.evict();
                if let Some(redis) = &limits.redis {
                    redis.reconnect_if_down().await;
                }
            }
        });
    }
}

/// A `rate_limit.trusted_proxies`-style entry: a CIDR or a single address.
pub fn parse_proxy(entry: &str) -> Result<IpNet, String> {
    let entry = entry.trim();
    entry
        .parse::<IpNet>()
        .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{entry:?} is neither an address nor a CIDR"))
}

/// Middleware: the address limit before anything else runs, and the caller's
/// `RateLimit-*` headers on the way out.
pub async fn limit(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let limits = req.app_data::<web::Data<Arc<Limits>>>().map(|data| data.get_ref().clone());
    if let Some(limits) = &limits
        && !overload::is_probe(req.path())
        && let Some(peer) = req.peer_addr().map(|addr| addr.ip())
    {
        let forwarded = req.headers().get_all("x-forwarded-for").filter_map(|v| v.to_str().ok());
        let client = limits.client_address(peer, forwarded);
        if let Some(Err(refusal)) = limits.check_address(client) {
            overload::discard_small_body(&mut req).await;
            let response = ApiError::RateLimited(Box::new(refusal)).error_response();
            return Ok(req.into_response(response).map_into_right_body());
        }
    }
    let mut response = next.call(req).await?;
    let decision = response.request().extensions().get::<Decision>().copied();
    if let Some(decision) = decision {
        let headers = response.headers_mut();
        for (name, value) in decision.headers() {
            headers.insert(name, value);
        }
    }
    Ok(response.map_into_left_body())
}

/// Tenant buckets in Redis: GCRA in one Lua call, so replicas never race.
mod redis_store {
    use std::time::Duration;

    use redis::aio::MultiplexedConnection;

    use super::{AtomicBool, Bucket, Decision, Ordering, Rate, RwLock};

    /// GCRA on one key holding the theoretical arrival time (µs, Redis's
    /// clock, so replicas' clocks do not matter). ARGV: interval µs, burst,
    /// cost. Returns allowed (0/1), remaining, retry-after µs, reset µs.
    const GCRA: &str = r"
local now = redis.call('TIME')
local t = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local capacity = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < t then tat = t end
local new_tat = tat + cost * interval
if new_tat - t > capacity then
  return {0, math.max(0, math.floor((capacity - (tat - t)) / interval)), new_tat - t - capacity, tat - t}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - t) / 1000)))
return {1, math.floor((capacity - (new_tat - t)) / interval), 0, new_tat - t}
";

    /// A check that takes longer falls back to the local bucket: the limiter
    /// must not become the slowest part of a request.
    const TIMEOUT: Duration = Duration::from_millis(100);

    pub struct Store {
        client: Option<redis::Client>,
        url: String,
        namespace: String,
        script: redis::Script,
        connection: RwLock<Option<MultiplexedConnection>>,
        up: AtomicBool,
    }

    impl Store {
        pub async fn connect(url: &str, namespace: &str) -> Self {
            let client = match redis::Client::open(url) {
                Ok(client) => Some(client),
                Err(e) => {
                    tracing::error!(error = %e, "rate_limit.redis_url cannot be used; tenant limits are per replica");
                    None
                }
            };
            let store = Self {
                client,
                url: shared::redact::secrets(url).into_owned(),
                namespace: namespace.to_owned(),
                script: redis::Script::new(GCRA),
                connection: RwLock::new(None),
                up: AtomicBool::new(false),
            };
            store.reconnect_if_down().await;
            if !store.is_up() {
                tracing::warn!(redis = %store.url, "redis unreachable at start: tenant limits are per replica until it answers");
            }
            store
        }

        pub fn is_up(&self) -> bool {
            self.up.load(Ordering::Relaxed)
        }

        /// `None` when Redis did not answer in time: the caller uses its own bucket.
        pub async fn check(&self, bucket: &Bucket, rate: Rate, cost: u32) -> Option<Decision> {
            if !self.is_up() {
                return None;
            }
            let mut connection = self.connection.read().ok()?.clone()?;
            let interval = rate.interval();
            let mut call = self.script.key(bucket.redis_key(&self.namespace));
            call.arg(interval.as_micros().max(1) as u64).arg(rate.burst.get()).arg(rate.cost(cost).get());
            let answer: Result<redis::RedisResult<Vec<i64>>, _> =
                tokio::time::timeout(TIMEOUT, call.invoke_async(&mut connection)).await;
            let values = match answer {
                Ok(Ok(values)) if values.len() == 4 => values,
                Ok(Ok(values)) => {
                    self.lost(&format!("the script answered {values:?}"));
                    return None;
                }
                Ok(Err(e)) => {
                    self.lost(&e.to_string());
                    return None;
                }
                Err(_) => {
                    self.lost("no answer within 100 ms");
                    return None;
                }
            };
            let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
            Some(Decision {
                allowed: values[0] == 1,
                limit: rate.burst.get(),
                remaining: u32::try_from(values[1]).unwrap_or(0),
                retry_after: micros(values[2]),
                reset: micros(values[3]),
            })
        }

        fn lost(&self, why: &str) {
            if self.up.swap(false, Ordering::Relaxed) {
                tracing::warn!(redis = %self.url, error = why, "rate limiter lost redis: tenant limits are per replica until it answers");
            }
            if let Ok(mut connection) = self.connection.write() {
                *connection = None;
            }
        }

        /// Connects when down; a no-op when up.
        pub async fn reconnect_if_down(&self) {
            if self.is_up() {
                return;
            }
            let Some(client) = &self.client else { return };
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(TIMEOUT));
            let connected = async {
                let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
                redis::cmd("PING").query_async::<()>(&mut connection).await?;
                Ok::<_, redis::RedisError>(connection)
            };
            match tokio::time::timeout(Duration::from_secs(2), connected).await {
                Ok(Ok(connection)) => {
                    if let Ok(mut slot) = self.connection.write() {
                        *slot = Some(connection);
                        self.up.store(true, Ordering::Relaxed);
                        tracing::info!(redis = %self.url, "rate limiter uses redis: tenant limits hold across replicas");
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "redis still unreachable"),
                Err(_) => tracing::debug!("redis still unreachable (timeout)"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate::new(per_second, burst).unwrap_or_else(|| panic!("a rate of {per_second}/{burst}"))
    }

    #[test]
    fn a_bucket_admits_its_burst_then_refuses_until_it_refills() {
        let clock = FakeRelativeClock::default();
        let buckets: Buckets<&str, _> = Buckets::with_clock(clock.clone());
        let r = rate(10, 3);
        let remaining: Vec<u32> = (0..3).map(|_| buckets.check(&"a", r, 1)).map(|d| d.remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = buckets.check(&"a", r, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        assert_eq!(refused.reset, Duration::from_millis(300));
        assert!(buckets.check(&"b", r, 1).allowed, "another key has its own bucket");
        clock.advance(Duration::from_millis(100));
        assert!(buckets.check(&"a", r, 1).allowed, "one interval later, one more");
        assert!(!buckets.check(&"a", r, 1).allowed);
    }

    #[test]
    fn a_cost_above_the_burst_takes_the_whole_full_bucket() {
        let clock = FakeRelativeClock::default();
        let buckets: Buckets<&str, _> = Buckets::with_clock(clock.clone());
        let r = rate(100, 200);
        let batch = buckets.check(&"a", r, 1000);
        assert!(batch.allowed);
        assert_eq!(batch.remaining, 0);
        assert!(!buckets.check(&"a", r, 1).allowed);
        clock.advance(Duration::from_secs(2));
        assert!(buckets.check(&"a", r, 150).allowed);
        assert_eq!(buckets.check(&"a", r, 60).remaining, 0, "only 50 left");
    }

    #[test]
    fn a_million_addresses_leave_nothing_behind_once_idle() {
        let clock = FakeRelativeClock::default();
        let buckets: Buckets<IpAddr, _> = Buckets::with_clock(clock.clone());
        let r = rate(1000, 2000);
        for i in 0..1_000_000u32 {
            buckets.check(&IpAddr::V4(Ipv4Addr::from(i)), r, 1);
        }
        assert_eq!(buckets.len(), 1_000_000);
        buckets.evict();
        assert_eq!(buckets.len(), 1_000_000, "buckets in use are kept");
        // Full again one interval after the check; `governor` keeps a bucket
        // one interval longer than that.
        clock.advance(Duration::from_millis(2));
        buckets.evict();
        assert_eq!(buckets.len(), 0, "a bucket full again is dropped");
    }

    #[test]
    fn ipv6_addresses_share_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(address_bucket(a), address_bucket(b));
        assert_ne!(address_bucket(a), address_bucket(c));
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(address_bucket(mapped), IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)));
    }
}
