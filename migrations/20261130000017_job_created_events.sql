-- A job's creation is a change too: `GET /v1/events` shows jobs as they are
-- submitted (queued, or scheduled for later), not only from their first
-- update. Inserted rows are announced on `conveyor_job_changed` in the same
-- lines as updated ones (see `job_change_events`), by a statement-level
-- trigger: submissions are inserted in batches, and one notification (of
-- about 4,000 bytes) serves many of them. The lines are written out here as
-- in `conveyor_jobs_changed` rather than by a shared function: a function
-- call per row cost the drain ~5% in a short trial (two pairs of runs).
CREATE FUNCTION conveyor_jobs_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_job_changed', nextval('conveyor_job_change_seq') || E'\n' || string_agg(line, E'\n'))
    FROM (SELECT line, (sum(octet_length(line) + 1) OVER (ROWS UNBOUNDED PRECEDING) - 1) / 3900 AS chunk
          FROM (SELECT concat_ws(' ', n.id, n.status, coalesce(n.progress::text, '-'),
                                 (n.cancel_requested_at IS NOT NULL)::int, n.queue, n.type, n.tenant) AS line
                FROM created n) AS lines) AS chunked
    GROUP BY chunk;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_created AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_created();
