-- Server-sent events (`GET /v1/jobs/{id}/events`, `GET /v1/events`) tell
-- clients what changed, not only which job: each notification on
-- `conveyor_job_changed` now carries every change as the trigger saw it, so
-- an API process can stream it without reading the row (and a job that went
-- from running to succeeded between two reads is still shown running first).
--
-- Payload: a first line with a number from `conveyor_job_change_seq`, then
-- one line per changed job:
--
--     <id> <status> <progress or -> <cancel requested: 0|1> <queue> <type> <tenant>
--
-- Every API replica hears the same notifications in the same (commit) order,
-- so "line n of notification s" names the same change on each of them: that
-- is the events' id, and why a client may resume on another replica. Names
-- are 1-64 of [a-zA-Z0-9_-], so a line is under 260 bytes; lines are cut
-- into notifications of about 4,000 bytes (Postgres takes up to 8,000).
CREATE SEQUENCE conveyor_job_change_seq;

CREATE OR REPLACE FUNCTION conveyor_jobs_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_job_changed', nextval('conveyor_job_change_seq') || E'\n' || string_agg(line, E'\n'))
    FROM (SELECT line, (sum(octet_length(line) + 1) OVER (ROWS UNBOUNDED PRECEDING) - 1) / 3900 AS chunk
          FROM (SELECT concat_ws(' ', n.id, n.status, coalesce(n.progress::text, '-'),
                                 (n.cancel_requested_at IS NOT NULL)::int, n.queue, n.type, n.tenant) AS line
                FROM changed_new n JOIN changed_old o ON o.id = n.id
                WHERE n.status <> o.status
                   OR n.progress IS DISTINCT FROM o.progress
                   OR n.cancel_requested_at IS DISTINCT FROM o.cancel_requested_at) AS lines) AS chunked
    GROUP BY chunk;
    RETURN NULL;
END
$$;
