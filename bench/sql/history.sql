-- Months of history for the scale benchmarks (HISTORY=n scripts/bench):
-- :n ended jobs over the last 90 days, inserted directly (not through the
-- API), as a busy deployment accumulates them: 90% succeeded, 8% failed,
-- 2% cancelled; half of them the bench tenant's, the rest spread over 100
-- others; ids time-ordered like the API's (UUIDv7: the creation time in
-- milliseconds, then random bits); small payloads and results.
--   psql -v n=10000000 -f bench/sql/history.sql <database>
INSERT INTO jobs (id, tenant, queue, type, payload, payload_bytes, status, priority, max_attempts, attempt,
                  timeout_seconds, run_at, result, result_bytes, error, created_at, started_at, finished_at,
                  updated_at, lane)
SELECT encode(overlay(uuid_send(gen_random_uuid())
                      placing substring(int8send((extract(epoch FROM at) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
              'hex')::uuid,
       CASE WHEN g % 2 = 0 THEN 'bench' ELSE 'tenant-' || (g % 100) END,
       'default', 'echo', '{"n": 1}', 9,
       CASE WHEN g % 50 = 0 THEN 'cancelled' WHEN g % 50 < 5 THEN 'failed' ELSE 'succeeded' END,
       0, 3, 1, 300, at,
       CASE WHEN g % 50 >= 5 THEN '{"n": 1}'::jsonb END,
       CASE WHEN g % 50 >= 5 THEN 9 END,
       CASE WHEN g % 50 < 5 THEN '{"message": "boom", "kind": "permanent", "attempt": 1}'::jsonb END,
       at, at + interval '5 ms', at + interval '10 ms', at + interval '10 ms', 0
FROM (SELECT g, now() - interval '90 days' * (g::float8 / :n) AS at FROM generate_series(1, :n) AS g) AS history;
ANALYZE jobs;
