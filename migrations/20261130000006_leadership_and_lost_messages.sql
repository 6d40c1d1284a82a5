-- Leadership that lapses when its holder stalls (SPEC §10 "leadership").
--
-- Before, the active reconciler was whoever held a session advisory lock. A
-- session lock lives as long as its connection, and a frozen process (SIGSTOP,
-- a paused VM, a swap storm) keeps its connections open: the lock was never
-- given up and every reconciler duty stopped for every tenant. A row with an
-- expiry, renewed by the holder as it works, lapses on its own when the holder
-- stops making progress, whatever happens to its sockets.
CREATE TABLE leaders (
    -- What the leadership is for; 'reconciler' is the only one today.
    name       text        PRIMARY KEY,
    -- The worker process holding it (its fresh-per-start id).
    holder     uuid        NOT NULL,
    -- The fencing token: grows by one every time the leadership changes hands
    -- or lapses, never repeats for a name. Every statement a leader makes
    -- presents it, so a holder that stalled past its expiry and woke up again
    -- changes nothing (the same idea as a job's lease token).
    term       bigint      NOT NULL,
    elected_at timestamptz NOT NULL,
    -- Renewed by the holder at every step of its work; once past, anyone may
    -- take over. Compared with the database's clock only, never a process's.
    expires_at timestamptz NOT NULL
);

-- Messages a worker holds, by queue: delivered by RabbitMQ, not yet acknowledged
-- (prefetched, waiting for a free slot or for their claim). Reported with each
-- heartbeat, e.g. {"default": 3}. The reconciler needs it to tell a queued job
-- whose message sits in a worker's prefetch from one whose message was lost.
ALTER TABLE workers ADD COLUMN held jsonb NOT NULL DEFAULT '{}';

-- Reconciler (lost messages): per queue, how many jobs are queued and which
-- have waited longest. Partial, so only queued jobs are in it: a job enters
-- when it is queued (one index insert) and leaves when it is claimed (the claim
-- already writes a new row version, status being indexed elsewhere).
CREATE INDEX jobs_queued_idx ON jobs (queue, updated_at) WHERE status = 'queued';
