//! `echo`: returns its payload as its result, as the text it came as.

use super::{JobContext, JobError, JobKind};
use crate::job::RawJson;

pub struct Echo;

impl JobKind for Echo {
    const NAME: &'static str = "echo";
    type Payload = RawJson;
    type Output = RawJson;

    fn payload_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "description": "Any JSON object; it is the job's result.",
            "propertyNames": {"pattern": super::STORABLE_TEXT},
            "additionalProperties": {"$ref": super::JSON_SCHEMA},
        })
    }

    async fn run(payload: Self::Payload, _: JobContext) -> Result<Self::Output, JobError> {
        Ok(payload)
    }
}
