//! `fail`: fails its first `times` attempts (every attempt when absent), for
//! exercising retries and failure handling.

use serde::{Deserialize, Serialize};

use super::{JobContext, JobError, JobKind};

pub struct Fail;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailPayload {
    #[serde(default = "default_message")]
    #[schema(pattern = "^[^\\x00]*$")]
    pub message: String,
    #[serde(default = "default_retryable")]
    pub retryable: bool,
    /// Attempts that fail before one succeeds; every attempt fails when absent.
    #[serde(default, deserialize_with = "crate::number::optional_whole")]
    #[schema(format = Int64, maximum = 4_294_967_295_u64)]
    pub times: Option<u32>,
}

fn default_message() -> String {
    "failed on purpose".to_owned()
}

const fn default_retryable() -> bool {
    true
}

#[derive(Debug, Serialize)]
pub struct FailOutput {
    /// The attempt that finally succeeded.
    pub succeeded_on_attempt: i32,
}

impl JobKind for Fail {
    const NAME: &'static str = "fail";
    type Payload = FailPayload;
    type Output = FailOutput;

    async fn run(payload: FailPayload, ctx: JobContext) -> Result<FailOutput, JobError> {
        let fails = payload.times.is_none_or(|times| i64::from(ctx.attempt) <= i64::from(times));
        match (fails, payload.retryable) {
            (false, _) => Ok(FailOutput { succeeded_on_attempt: ctx.attempt }),
            (true, true) => Err(JobError::Retryable(payload.message)),
            (true, false) => Err(JobError::Permanent(payload.message)),
        }
    }
}
