//! `sleep`: waits `ms` milliseconds, reporting progress and stopping early
//! when cancelled. The model of a long, cooperative job.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep_until};

use super::{FieldError, JobContext, JobError, JobKind};

pub struct Sleep;

/// One day: longer sleeps are almost certainly a unit mistake.
const MAX_MS: u64 = 86_400_000;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SleepPayload {
    /// How long to sleep, in milliseconds (at most a day).
    #[schema(maximum = 86_400_000)]
    #[serde(deserialize_with = "crate::number::whole")]
    pub ms: u64,
}

#[derive(Debug, Serialize)]
pub struct SleepOutput {
    pub slept_ms: u64,
}

impl JobKind for Sleep {
    const NAME: &'static str = "sleep";
    type Payload = SleepPayload;
    type Output = SleepOutput;

    fn validate(payload: &SleepPayload) -> Result<(), FieldError> {
        if payload.ms > MAX_MS {
            return Err(FieldError::new("ms", format!("must be at most {MAX_MS}")));
        }
        Ok(())
    }

    async fn run(payload: SleepPayload, ctx: JobContext) -> Result<SleepOutput, JobError> {
        let total = Duration::from_millis(payload.ms);
        let start = Instant::now();
        let end = start + total;
        // About twenty progress steps, but never more than four a second nor
        // less than one a ~10 ms: enough to watch, few enough writes.
        let step = (total / 20).clamp(Duration::from_millis(10), Duration::from_millis(250));
        ctx.report_progress(0);
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            tokio::select! {
                () = ctx.cancelled() => return Err(JobError::Cancelled),
                () = sleep_until((now + step).min(end)) => {}
            }
            let done = start.elapsed().as_millis() * 100 / total.as_millis().max(1);
            ctx.report_progress(u8::try_from(done.min(100)).unwrap_or(100));
        }
        ctx.report_progress(100);
        Ok(SleepOutput { slept_ms: payload.ms })
    }
}
