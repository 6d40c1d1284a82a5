-- Idempotency keys (the Idempotency-Key header): per tenant, the request a key
-- was first used with and the jobs it created, for jobs.idempotency_ttl_seconds.
-- The key's row and its jobs are written in one transaction: a submission that
-- fails leaves no row behind, so a key is never stranded, and concurrent
-- submissions with one key wait for the first to commit, then replay it.
CREATE TABLE idempotency_keys (
    tenant       text        NOT NULL,
    key          text        NOT NULL,
    -- SHA-256 of the request's fields (not of its bytes): a retry with the same
    -- key must be the same request, or it is refused (409).
    request_hash bytea       NOT NULL,
    -- What it created, in order: one job, or a batch's jobs.
    job_ids      uuid[]      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Past this, the key is free again (a new request takes it over).
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant, key),
    CONSTRAINT idempotency_keys_key_length_check CHECK (char_length(key) BETWEEN 1 AND 255),
    CONSTRAINT idempotency_keys_hash_length_check CHECK (octet_length(request_hash) = 32)
);
-- The reconciler deletes expired keys, oldest first.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);

-- The key table decides now: a job keeps the key it was made with, and an
-- expired key may be used again for a new job.
DROP INDEX jobs_idempotency_key_idx;
