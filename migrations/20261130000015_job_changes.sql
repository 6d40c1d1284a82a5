-- Long-polls (`GET /v1/jobs/{id}?wait=N`) wait for the jobs they watch to
-- change. Postgres announces every change a client can see (status,
-- progress, a cancel request) on `conveyor_job_changed`, whichever process
-- made it (worker, API, reconciler, CLI, psql), and each API process wakes
-- the waiters of the ids it hears.
--
-- A statement-level trigger with transition tables: one call per statement,
-- however many rows it updated (claims and outcomes are written in batches),
-- and one notification per 200 changed ids (a payload must stay under 8,000
-- bytes). Lease renewals change none of the three columns and notify nothing.
CREATE FUNCTION conveyor_jobs_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_job_changed', string_agg(id::text, ','))
    FROM (SELECT n.id, (row_number() OVER () - 1) / 200 AS chunk
          FROM changed_new n JOIN changed_old o ON o.id = n.id
          WHERE n.status <> o.status
             OR n.progress IS DISTINCT FROM o.progress
             OR n.cancel_requested_at IS DISTINCT FROM o.cancel_requested_at) AS changed
    GROUP BY chunk;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_changed AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_changed();
