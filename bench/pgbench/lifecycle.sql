-- The database work of one job's life, each step its own transaction as in
-- Conveyor: insert (submit), claim (queued -> running), finish (-> succeeded).
-- Run with -M prepared so that :id travels as a typed parameter.
INSERT INTO jobs (id, tenant, queue, type, payload, status, priority, max_attempts, timeout_seconds, run_at)
VALUES (gen_random_uuid(), 'pgbench', 'default', 'noop', '{}', 'queued', 0, 5, 300, now())
RETURNING id \gset
UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(), updated_at = now(),
                lease_owner = gen_random_uuid(), lease_token = gen_random_uuid(),
                lease_expires_at = now() + interval '30 seconds'
WHERE id = :id AND status = 'queued';
UPDATE jobs SET status = 'succeeded', result = 'null', finished_at = now(), updated_at = now(),
                lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
WHERE id = :id AND status = 'running';
