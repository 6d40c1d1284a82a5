//! A queue RabbitMQ already has with other arguments (left by an older
//! version) cannot be consumed; the worker says what to do about it rather
//! than "reconnecting" forever.

use shared::queue::{Held, QueueError, Subscription};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::Harness;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_queue_declared_with_other_arguments_is_named_with_the_way_out(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let h = Harness::new(connect).await;
    h.amqp.declare_plain("default").await;
    let queues = vec!["default".to_owned()];
    let opened = Subscription::open(&h.settings.amqp, &queues, 1, "test-topology", &Held::new(&queues)).await;
    match opened {
        Err(e @ QueueError::Incompatible { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&format!("{}.default", h.amqp.name)), "{message}");
            assert!(message.contains("delete_queue") && message.contains("queue-version"), "{message}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("RabbitMQ accepted a declaration that differs from the queue's"),
    }
    h.close().await;
}
