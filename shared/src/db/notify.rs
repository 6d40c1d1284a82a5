//! Postgres `LISTEN`: a connection of its own (outside the pool) that hears
//! the notifications of one channel. The cancel requests of running jobs
//! ([`super::CANCEL_CHANNEL`]) and the changes to ended jobs
//! ([`super::ENDED_CHANGED_CHANNEL`]) travel this way.

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::Result;

/// A `LISTEN` on one channel.
pub struct Listener(PgListener);

/// Opens a connection with the pool's settings and listens on `channel`.
pub async fn listen(pool: &PgPool, channel: &str) -> Result<Listener> {
    listen_all(pool, &[channel]).await
}

/// Like [`listen`], on several channels at once (one connection).
pub async fn listen_all(pool: &PgPool, channels: &[&str]) -> Result<Listener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channels.iter().copied()).await?;
    Ok(Listener(listener))
}

impl Listener {
    /// The next notification's payload; `None` once the connection is lost.
    /// Whatever was notified while it was down is lost with it: callers that
    /// must not miss anything start over from what they can read.
    pub async fn recv(&mut self) -> Result<Option<String>> {
        Ok(self.recv_from().await?.map(|(_, payload)| payload))
    }

    /// Like [`Self::recv`], with the channel it came on.
    pub async fn recv_from(&mut self) -> Result<Option<(String, String)>> {
        Ok(self
            .0
            .try_recv()
            .await?
            .map(|notification| (notification.channel().to_owned(), notification.payload().to_owned())))
    }
}
