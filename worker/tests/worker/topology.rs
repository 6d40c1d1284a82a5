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

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn a_password_in_the_broker_url_stays_out_of_the_logs(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    // Nothing listens on port 1: every connection attempt fails and is logged.
    let h = Harness::with(connect, |s| s.amqp.url = "amqp://guest:s3cr3t-mq@127.0.0.1:1/%2f".to_owned()).await;
    let (_worker, logs) = h.spawn_logged(1);
    logs.wait_for(std::time::Duration::from_secs(20), 0, "lost RabbitMQ").await;
    let lines = logs.messages_since(0).join("\n");
    let raw = logs.raw_since(0);
    assert!(!raw.contains("s3cr3t-mq"), "the password was logged: {raw}");
    assert!(!lines.is_empty());
    h.close().await;
}
