//! RabbitMQ carries work to workers; Postgres decides everything else. This
//! module holds what travels (the [`Message`]), how names are made, and what
//! a consumer receives (a [`Delivery`]); the lapin details live in
//! [`rabbitmq`], and no lapin type leaves this module.
//!
//! # Topology (per namespace `ns`, default `conveyor`)
//!
//! - queues `ns.<queue>`, `ns.<queue>.1` … `ns.<queue>.<lanes-1>` for every
//!   configured queue (its lanes: a tenant's jobs all go to one, and workers
//!   consume them all, so tenants take turns): durable, classic, with
//!   `x-max-priority` 9 so job priorities are honoured, dead-lettering to `ns.dlx`;
//! - fanout exchange `ns.dlx` and its queue `ns.dead`: messages a worker could
//!   not understand end there, for a human to look at, instead of being dropped.
//!
//! Jobs are published to the default exchange with their lane's queue name as the
//! routing key, `mandatory`, persistent, and with publisher confirms.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod delivery;
pub mod rabbitmq;

pub use delivery::{Delivery, Held, Settlement};
pub use rabbitmq::{Consumer, PublishError, Publisher, Subscription};

/// Why talking to RabbitMQ failed (publishes have their own [`PublishError`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the channel closed before the message was settled; RabbitMQ delivers it again")]
    ChannelClosed,
    /// The queue exists with other arguments than Conveyor declares (say, made
    /// by an older version without `x-queue-version` 2). Retrying cannot help.
    #[error(
        "RabbitMQ refused to declare queue {queue:?} ({detail}): it exists with other arguments; \
         delete it (`rabbitmqctl delete_queue {queue}`, losing its messages, which the reconciler \
         republishes) or apply a `queue-version` policy, then restart"
    )]
    Incompatible { queue: String, detail: String },
}

/// What a queue message says. Tagged and versioned by variant name, so a
/// rolling upgrade can add `RunJobV2` while old messages still parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Run the job with this id, if it is still queued.
    RunJob { job_id: Uuid },
    /// Run each of these jobs that is still queued: a batch's jobs, several
    /// to a message (`amqp.jobs_per_message`). The message is settled once
    /// every one of them has been claimed or found not queued.
    RunJobs { job_ids: Vec<Uuid> },
}

impl Message {
    /// The jobs it asks to run, in order.
    pub fn job_ids(&self) -> &[Uuid] {
        match self {
            Self::RunJob { job_id } => std::slice::from_ref(job_id),
            Self::RunJobs { job_ids } => job_ids,
        }
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RunJob { .. } => "run_job",
            Self::RunJobs { .. } => "run_jobs",
        }
    }
}

/// Names of the RabbitMQ objects of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

impl Names {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self { namespace: namespace.into() }
    }

    /// The RabbitMQ queue that carries Conveyor queue `queue` (its lane 0).
    pub fn queue(&self, queue: &str) -> String {
        format!("{}.{queue}", self.namespace)
    }

    /// The RabbitMQ queue of lane `lane` of Conveyor queue `queue`: lane 0 is
    /// the queue's own name, as before lanes existed, the others `ns.queue.N`.
    pub fn lane(&self, queue: &str, lane: u16) -> String {
        match lane {
            0 => self.queue(queue),
            n => format!("{}.{queue}.{n}", self.namespace),
        }
    }

    /// The lanes of `queue` when there are `lanes` of them.
    pub fn lanes(&self, queue: &str, lanes: u16) -> impl Iterator<Item = String> + '_ {
        let queue = queue.to_owned();
        (0..lanes.max(1)).map(move |lane| self.lane(&queue, lane))
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let id = Uuid::nil();
        let json = serde_json::to_string(&Message::RunJob { job_id: id }).ok();
        assert_eq!(json.as_deref(), Some(r#"{"kind":"run_job","job_id":"00000000-0000-0000-0000-000000000000"}"#));
    }
}
