//! `noop`: succeeds at once. The cheapest job there is, for benchmarks.

use serde::Deserialize;

use super::{JobContext, JobError, JobKind};

pub struct Noop;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoopPayload {}

impl JobKind for Noop {
    const NAME: &'static str = "noop";
    type Payload = NoopPayload;
    type Output = ();

    async fn run(_: NoopPayload, _: JobContext) -> Result<(), JobError> {
        Ok(())
    }
}
