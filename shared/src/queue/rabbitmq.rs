//! lapin underneath [`super`]: connecting, declaring the topology, publishing
//! with confirms, and consuming.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{Delivery, Held, Message, Names, QueueError};
use crate::config::AmqpSettings;
use crate::job::{Enqueued, MAX_PRIORITY};
use crate::trace;

/// AMQP delivery mode 2: the broker writes the message to disk (with a durable
/// queue, it survives a broker restart).
const PERSISTENT: u8 = 2;

/// The largest AMQP frame asked of RabbitMQ (its default is 128 KiB). lapin
/// keeps 32 frames of buffer each way per connection, touched in full: 8 MiB
/// of resident memory per connection at 128 KiB, 512 KiB at this size. Job
/// messages are under 100 bytes, and anything larger is split into frames.
const FRAME_MAX: u32 = 8192;

/// Opens a connection named after the process, so `rabbitmqctl list_connections`
/// tells an API replica from a worker.
///
/// The heartbeat is `amqp.heartbeat_seconds` whatever the URL says: it bounds
/// how long RabbitMQ keeps messages delivered to a process that stopped
/// answering without closing its socket (frozen, paused), and how long this
/// process takes to notice a broker that went silent.
pub async fn connect(settings: &AmqpSettings, name: &str) -> lapin::Result<Connection> {
    let mut uri: AMQPUri = settings
        .url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    uri.query.heartbeat = Some(settings.heartbeat_seconds);
    uri.query.frame_max = Some(FRAME_MAX);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties).await
}

/// Declares the namespace's dead-letter exchange and queue, and one durable
/// queue per name in `queues`. Idempotent; every process declares what it
/// uses at start, so no start order is needed.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    queues: impl IntoIterator<Item = &str>,
    lanes: u16,
) -> Result<(), QueueError> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(names.dead_letter_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(names.dead_letter_queue().into(), durable, queue_version_2()).await?;
    channel
        .queue_bind(
            names.dead_letter_queue().into(),
            names.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for queue in queues {
        let mut args = queue_version_2();
        // Priorities 0–9 (README, "Submitting"); a classic queue with x-max-priority keeps one
        // sub-queue per level, so fewer levels would be cheaper but lossy.
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(MAX_PRIORITY as u8));
        // A rejected (unparseable) message goes to `ns.dead`, never into the void.
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(names.dead_letter_exchange().into()));
        for name in names.lanes(queue, lanes) {
            let declared = channel.queue_declare(name.as_str().into(), durable, args.clone()).await;
            declared.map_err(|e| incompatible(e, &name))?;
        }
    }
    Ok(())
}

/// A declare refused with PRECONDITION_FAILED: the queue exists with other
/// arguments, which retrying will not change. Anything else as it is.
fn incompatible(e: lapin::Error, queue: &str) -> QueueError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
            QueueError::Incompatible { queue: queue.to_owned(), detail: amqp.get_message().to_string() }
        }
        _ => QueueError::Amqp(e),
    }
}

/// Classic queues of the second storage version (RabbitMQ ≥ 3.10): a
/// persistent message is confirmed in about two thirds of the time of version
/// 1 here, the largest share of a submission's latency (docs/BENCHMARKS.md).
/// Part of the queue's identity: a queue declared without it by an older
/// Conveyor must be deleted (or given the `queue-version` policy) first.
fn queue_version_2() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-version".into(), AMQPValue::ShortShortUInt(2));
    args
}

/// Why a publish did not get a positive confirm.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] QueueError),
    /// No channel to publish on; shared by every message of the attempt.
    #[error("cannot publish: {0}")]
    NoChannel(Arc<QueueError>),
    #[error("RabbitMQ did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ has no queue {0:?} (was it declared?)")]
    Unroutable(String),
}

impl From<lapin::Error> for PublishError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(QueueError::Amqp(e))
    }
}

/// Publishes job messages with publisher confirms over one shared channel,
/// reconnecting on the next publish after the connection broke.
///
/// Many publishes may be in flight at once on the channel; each waits only
/// for its own confirm.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    settings: AmqpSettings,
    names: Names,
    /// Queues declared on (re)connect.
    queues: Vec<String>,
    connection_name: String,
    link: Mutex<Option<(Arc<Connection>, Channel)>>,
}

impl Publisher {
    /// A publisher for `queues` (declared on every connect). It connects on
    /// first use and again after the connection broke, so a process can start
    /// while RabbitMQ is down.
    pub fn new(settings: &AmqpSettings, queues: Vec<String>, connection_name: &str) -> Self {
        Self {
            inner: Arc::new(PublisherInner {
                settings: settings.clone(),
                names: Names::new(&settings.namespace),
                queues,
                connection_name: connection_name.to_owned(),
                link: Mutex::new(None),
            }),
        }
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        Ok(self.link().await?.1)
    }

    /// The live connection and confirm-mode channel, (re)connecting if needed.
    async fn link(&self) -> Result<(Arc<Connection>, Channel), QueueError> {
        let inner = &self.inner;
        let mut link = inner.link.lock().await;
        if let Some((connection, channel)) = link.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok((connection.clone(), channel.clone()));
        }
        *link = None;
        // Bounded: a black-holed broker must not hold the lock (and every
        // publisher waiting on it) for a TCP timeout.
        let timeout = inner.settings.confirm_timeout();
        let connection = tokio::time::timeout(timeout, connect(&inner.settings, &inner.connection_name))
            .await
            .map_err(|_| QueueError::Timeout("connecting to RabbitMQ"))??;
        let connection = Arc::new(connection);
        let channel = connection.create_channel().await?;
        declare(&channel, &inner.names, inner.queues.iter().map(String::as_str), inner.settings.lanes).await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        *link = Some((connection.clone(), channel.clone()));
        Ok((connection, channel))
    }

    /// Publishes messages for `jobs`, all sent before any confirm is awaited,
    /// and waits for their confirms (within one `amqp.confirm_timeout_ms` for
    /// all); a result per job, in order. Jobs with one `message_id` travel in
    /// one message (see [`Message::RunJobs`]) and share its result; the others
    /// have a message each.
    ///
    /// A message carries only what the broker needs: persistence, the
    /// priority, a body naming the jobs, and, when the trace of the request
    /// that submitted them is sampled, its W3C `traceparent` header (for
    /// tools that follow a trace through the broker; the worker reads its
    /// parent span from the job's row, which every republish has too). Everything else about a job (its request id
    /// included) is in its row; properties nobody reads cost the broker dearly
    /// (a headers table and three strings made the confirm p99 ~6 ms longer
    /// under load; docs/BENCHMARKS.md).
    pub async fn publish_jobs(&self, jobs: &[Enqueued]) -> Vec<Result<(), PublishError>> {
        let timeout = self.inner.settings.confirm_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let channel = match tokio::time::timeout_at(deadline, self.channel()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let reason = Arc::new(e);
                return jobs.iter().map(|_| Err(PublishError::NoChannel(reason.clone()))).collect();
            }
            Err(_) => return jobs.iter().map(|_| Err(PublishError::Timeout(timeout))).collect(),
        };
        let messages = messages_of(jobs);
        let mut sent = Vec::with_capacity(messages.len());
        let lanes = i32::from(self.inner.settings.lanes.max(1));
        for members in &messages {
            let first = &jobs[members[0]];
            let message = match members.as_slice() {
                [_] => Message::RunJob { job_id: first.id },
                _ => Message::RunJobs { job_ids: members.iter().map(|&i| jobs[i].id).collect() },
            };
            let body = serde_json::to_vec(&message).unwrap_or_default();
            let mut properties = BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_priority(u8::try_from(first.priority.clamp(0, MAX_PRIORITY)).unwrap_or(0));
            // A message's jobs come from one request, so share its trace. Only
            // a sampled one: a headers table costs RabbitMQ ~15% of its peak
            // publish rate (docs/BENCHMARKS.md), which a trace nobody records
            // should not pay; the worker reads the parent from the row anyway.
            if let Some(traceparent) = first.traceparent.as_ref().filter(|tp| trace::is_sampled(tp)) {
                let mut headers = FieldTable::default();
                headers.insert(trace::HEADER.into(), AMQPValue::LongString(traceparent.as_str().into()));
                properties = properties.with_headers(headers);
            }
            // A lane beyond those configured (amqp.lanes was lowered) folds back in.
            let lane = u16::try_from(i32::from(first.lane).rem_euclid(lanes)).unwrap_or(0);
            let routing_key = self.inner.names.lane(&first.queue, lane);
            // `mandatory`: if no queue takes the message, RabbitMQ returns it instead
            // of confirming a message that went nowhere.
            let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
            let publish =
                channel.basic_publish("".into(), ShortString::from(routing_key.clone()), options, &body, properties);
            let confirm = match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => Ok(confirm),
                Ok(Err(e)) => Err(PublishError::from(e)),
                Err(_) => Err(PublishError::Timeout(timeout)),
            };
            sent.push((routing_key, confirm));
        }
        let mut results: Vec<Result<(), PublishError>> = vec![Err(PublishError::Nacked); jobs.len()];
        for (members, (routing_key, confirm)) in messages.iter().zip(sent) {
            let result = match confirm {
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                    Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable(routing_key)),
                    Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err(PublishError::Nacked),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(PublishError::Timeout(timeout)),
                },
                Err(e) => Err(e),
            };
            for &i in members {
                results[i] = result.clone();
            }
        }
        results
    }

    /// Ready messages (all lanes) and consumers (of lane 0; every consumer
    /// takes every lane) of Conveyor queue `queue`, by passive declares on a
    /// channel of its own (a failed passive declare closes its channel).
    pub async fn queue_stats(&self, queue: &str) -> Result<(u32, u32), QueueError> {
        let (connection, _) = self.link().await?;
        let channel = connection.create_channel().await?;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let (mut ready, mut consumers) = (0u32, 0u32);
        for (lane, name) in self.inner.names.lanes(queue, self.inner.settings.lanes).enumerate() {
            match channel.queue_declare(name.into(), options, FieldTable::default()).await {
                Ok(declared) => {
                    ready = ready.saturating_add(declared.message_count());
                    if lane == 0 {
                        consumers = declared.consumer_count();
                    }
                }
                Err(e) => {
                    let _ = channel.close(200, "done".into()).await;
                    return Err(e.into());
                }
            }
        }
        let _ = channel.close(200, "done".into()).await;
        Ok((ready, consumers))
    }

    /// Whether the broker answers: used by `/readyz`.
    pub async fn is_ready(&self) -> bool {
        self.channel().await.is_ok()
    }
}

/// Which of `jobs` travel together: one list of indexes per message, in the
/// order of each message's first job.
fn messages_of(jobs: &[Enqueued]) -> Vec<Vec<usize>> {
    let mut messages: Vec<Vec<usize>> = Vec::new();
    let mut shared: HashMap<Uuid, usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        match job.message_id {
            Some(message) => match shared.get(&message) {
                Some(&at) => messages[at].push(i),
                None => {
                    shared.insert(message, messages.len());
                    messages.push(vec![i]);
                }
            },
            None => messages.push(vec![i]),
        }
    }
    messages
}

/// A worker's link to RabbitMQ: one connection, one channel, one consumer per
/// queue. Closing it returns every unsettled delivery to its queue.
pub struct Subscription {
    connection: Connection,
    channel: Channel,
    consumers: Vec<Consumer>,
}

impl Subscription {
    /// Connects (within `amqp.confirm_timeout_ms`), declares the topology, and
    /// consumes `queues` with at most `prefetch` unacknowledged messages per
    /// lane and a few more across all of them. Deliveries count in `held`
    /// until they are settled.
    pub async fn open(
        settings: &AmqpSettings,
        queues: &[String],
        prefetch: u16,
        name: &str,
        held: &Held,
    ) -> Result<Self, QueueError> {
        let connection = tokio::time::timeout(settings.confirm_timeout(), connect(settings, name))
            .await
            .map_err(|_| QueueError::Timeout("connecting to RabbitMQ"))??;
        let names = Names::new(&settings.namespace);
        let channel = connection.create_channel().await?;
        declare(&channel, &names, queues.iter().map(String::as_str), settings.lanes).await?;
        let consumers_count = queues.len() * usize::from(settings.lanes);
        // Two limits, both enforced by RabbitMQ. Each consumer's (each lane's)
        // own: `prefetch`, as a worker on one lane always had. The channel's,
        // shared by every consumer: one eighth more (at least 2), so that while
        // one lane's messages fill a consumer's share (a batch's messages settle
        // only once all their jobs have started, which takes a while) another
        // lane's message still arrives at once, not when one of those settles.
        let reserve = if consumers_count > 1 { (prefetch / 8).max(2) } else { 0 };
        channel.basic_qos(prefetch, BasicQosOptions { global: false }).await?;
        channel.basic_qos(prefetch.saturating_add(reserve), BasicQosOptions { global: true }).await?;
        let mut consumers = Vec::with_capacity(consumers_count);
        for queue in queues {
            // One consumer per lane on the one channel: when a slot frees,
            // RabbitMQ offers it to the lanes with messages in turn, so a
            // tenant's backlog in its lane does not starve the others.
            for lane in names.lanes(queue, settings.lanes) {
                // Tags are unique per process and queue, so a restarted worker never
                // collides with its predecessor's consumers.
                let tag = format!("{name}.{lane}");
                let inner = channel
                    .basic_consume(lane.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
                    .await?;
                consumers.push(Consumer { inner, queue: queue.clone(), held: held.clone() });
            }
        }
        Ok(Self { connection, channel, consumers })
    }

    /// The consumers, one per lane of each queue, to be read each on its own task.
    pub fn take_consumers(&mut self) -> Vec<Consumer> {
        std::mem::take(&mut self.consumers)
    }

    /// Closes the channel and the connection: RabbitMQ puts every message
    /// delivered here and not yet settled back in its queue, at once.
    pub async fn close(self) {
        let _ = self.channel.close(200, "worker stopping".into()).await;
        let _ = self.connection.close(200, "worker stopping".into()).await;
    }
}

/// The deliveries of one queue.
pub struct Consumer {
    inner: lapin::Consumer,
    queue: String,
    held: Held,
}

impl Consumer {
    /// The Conveyor queue it consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery; `None` when RabbitMQ cancelled the consumer (the
    /// queue was deleted), an error when the channel or connection failed.
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let delivery = self.inner.next().await?;
        Some(
            delivery
                .map(|delivery| Delivery::amqp(delivery, &self.queue, self.held.hold(&self.queue)))
                .map_err(Into::into),
        )
    }
}
