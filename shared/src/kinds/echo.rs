//! `echo`: returns its payload as its result.

use serde_json::{Map, Value};

use super::{JobContext, JobError, JobKind};

pub struct Echo;

impl JobKind for Echo {
    const NAME: &'static str = "echo";
    type Payload = Map<String, Value>;
    type Output = Map<String, Value>;

    async fn run(payload: Self::Payload, _: JobContext) -> Result<Self::Output, JobError> {
        Ok(payload)
    }
}
