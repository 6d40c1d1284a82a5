//! The worker's health port: alive while the process lives, ready only while
//! Postgres answers and its consumers are up.

use std::time::Duration;

use serde_json::Value;
use shared::testing::Proxy;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::Harness;

/// A port nobody listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("an ephemeral port");
    listener.local_addr().expect("its address").port()
}

async fn probe(port: u16, path: &str) -> Option<(u16, Value)> {
    let answer = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.ok()?;
    let status = answer.status().as_u16();
    Some((status, answer.json().await.ok()?))
}

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn readyz_says_rabbitmq_is_down_while_the_connection_is_cut_and_recovers(
    _: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let port = free_port();
    let h = Harness::with(connect, |s| {
        s.amqp.url = proxy.url_for(&s.amqp.url);
        s.worker.http_port = port;
    })
    .await;
    let (stop, worker) = h.spawn_in_process(2);
    let ready = |postgres: &'static str, rabbitmq: &'static str, status: u16| async move {
        probe(port, "/readyz")
            .await
            .is_some_and(|(code, body)| code == status && body["postgres"] == postgres && body["rabbitmq"] == rabbitmq)
    };
    h.wait(Duration::from_secs(10), "ready", async || ready("up", "up", 200).await).await;
    assert_eq!(probe(port, "/healthz").await.map(|(code, _)| code), Some(200));

    proxy.cut();
    h.wait(Duration::from_secs(10), "503 naming RabbitMQ", async || ready("up", "down", 503).await).await;
    assert_eq!(probe(port, "/healthz").await.map(|(code, _)| code), Some(200), "alive all along");

    proxy.restore();
    h.wait(Duration::from_secs(20), "ready again", async || ready("up", "up", 200).await).await;

    stop.cancel();
    worker.await.expect("joined").expect("clean stop");
    assert!(probe(port, "/healthz").await.is_none(), "the port closes with the worker");
    h.close().await;
}
