-- The outbox as a table of its own: one narrow row per queued job whose
-- message RabbitMQ has not confirmed yet, written in the same statement that
-- makes the job queued and deleted once the confirm is in.
--
-- Before, the outbox was `jobs.published_at` with a partial index on it.
-- Recording a confirm then rewrote the whole job row and, because the index
-- predicate names `published_at`, could never be a HOT update: a new row
-- version and an entry in every index of `jobs`, for every job. Here it is the
-- delete of a 40-byte row (docs/BENCHMARKS.md has the figures).
CREATE TABLE outbox (
    -- No foreign key: its check would cost a lookup per job, and a row left
    -- behind by a deleted job is harmless (the sweep drops rows whose job is
    -- no longer queued).
    job_id     uuid        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- The sweep reads the oldest rows first.
CREATE INDEX outbox_created_at_idx ON outbox (created_at);

INSERT INTO outbox (job_id, created_at)
SELECT id, updated_at FROM jobs WHERE status = 'queued' AND published_at IS NULL;

DROP INDEX jobs_unpublished_idx;
ALTER TABLE jobs DROP COLUMN published_at;
