-- Fencing by lease token (SPEC §3): every claim mints a fresh token, and each
-- write a worker makes about a running job (progress, lease renewal, outcome)
-- must present it. A worker whose lease expired, and whose job was rescued
-- and claimed again, holds a stale token: its writes match nothing.
-- (The attempt number alone is not enough once a shutdown hands a job back
-- without counting the interrupted attempt.)
ALTER TABLE jobs ADD COLUMN lease_token uuid;
UPDATE jobs SET lease_token = gen_random_uuid() WHERE status = 'running';

ALTER TABLE jobs DROP CONSTRAINT jobs_lease_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_lease_check CHECK (
    (status = 'running') = (lease_expires_at IS NOT NULL)
    AND (status = 'running') = (lease_token IS NOT NULL)
);

-- Reconciler (outbox): queued jobs whose publish was never confirmed, oldest
-- change first. Replaces the index on created_at: a requeued or rescued job is
-- old by creation but new to the outbox.
DROP INDEX jobs_unpublished_idx;
CREATE INDEX jobs_unpublished_idx ON jobs (updated_at) WHERE status = 'queued' AND published_at IS NULL;
