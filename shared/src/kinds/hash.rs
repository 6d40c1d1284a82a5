//! `hash`: SHA-256 applied `iterations` times, the model of a CPU-bound job.
//! It runs on tokio's blocking pool so that it never stalls the async workers.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{FieldError, JobContext, JobError, JobKind};

pub struct Hash;

/// About ten seconds of one core: a cap that stops a typo from pinning a worker for hours.
const MAX_ITERATIONS: u32 = 10_000_000;

/// How often the loop looks for cancellation: rare enough to cost nothing.
const CHECK_EVERY: u32 = 4096;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HashPayload {
    #[schema(pattern = "^[^\\x00]*$")]
    pub input: String,
    /// SHA-256 applied this many times.
    #[serde(default = "one", deserialize_with = "crate::number::whole")]
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub iterations: u32,
}

const fn one() -> u32 {
    1
}

#[derive(Debug, Serialize)]
pub struct HashOutput {
    pub digest: String,
}

impl JobKind for Hash {
    const NAME: &'static str = "hash";
    type Payload = HashPayload;
    type Output = HashOutput;

    fn validate(payload: &HashPayload) -> Result<(), FieldError> {
        if !(1..=MAX_ITERATIONS).contains(&payload.iterations) {
            return Err(FieldError::new("iterations", format!("must be between 1 and {MAX_ITERATIONS}")));
        }
        Ok(())
    }

    async fn run(payload: HashPayload, ctx: JobContext) -> Result<HashOutput, JobError> {
        let work = tokio::task::spawn_blocking(move || {
            let mut digest = Sha256::digest(payload.input.as_bytes());
            for i in 1..payload.iterations {
                if i % CHECK_EVERY == 0 && ctx.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
                digest = Sha256::digest(digest);
            }
            Ok(digest)
        });
        let digest = work.await.map_err(|e| JobError::Retryable(format!("hash task failed: {e}")))??;
        Ok(HashOutput { digest: crate::hex(&digest) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_sha256_matches_the_known_vector() {
        assert_eq!(
            crate::hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
