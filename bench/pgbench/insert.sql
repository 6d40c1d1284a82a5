-- The database work of one submission: one job row inserted (and committed).
INSERT INTO jobs (id, tenant, queue, type, payload, status, priority, max_attempts, timeout_seconds, run_at)
VALUES (gen_random_uuid(), 'pgbench', 'default', 'noop', '{}', 'queued', 0, 5, 300, now());
