-- no-transaction
-- Retention (`api prune`, `retention.*`) deletes ended jobs by how long ago
-- they ended, a status at a time, oldest first: this index walks exactly
-- those, however many younger or kept ones the table holds. Only ended jobs
-- are in it, so the job path pays one entry per outcome and nothing per
-- submission. Built concurrently (outside a transaction): on a table of
-- months of history a plain build would block submissions while it runs.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_ended_idx ON jobs (status, finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
