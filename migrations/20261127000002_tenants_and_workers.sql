-- API keys (SPEC §4): a client authenticates as a tenant with scopes.
CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    tenant      text        NOT NULL,
    name        text,
    -- Public part of the token ("cvk_<prefix>_<secret>"), unique, for lookup;
    -- safe to show in lists and logs.
    prefix      text        NOT NULL UNIQUE,
    -- SHA-256 of the whole token. The token itself is never stored: it has 256
    -- random bits, so a fast hash is enough (no password stretching needed).
    secret_hash bytea       NOT NULL,
    scopes      text[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,

    CONSTRAINT api_keys_scopes_check CHECK (scopes <@ ARRAY['jobs:read', 'jobs:write', 'admin']::text[]),
    CONSTRAINT api_keys_hash_length_check CHECK (octet_length(secret_hash) = 32)
);

-- How many times an operator has requeued the job (`api requeue`).
ALTER TABLE jobs ADD COLUMN requeue_count integer NOT NULL DEFAULT 0;

-- Live workers (SPEC §6): each process registers at start with a fresh id and
-- heartbeats; GET /v1/workers lists those whose heartbeat is recent.
CREATE TABLE workers (
    id                uuid        PRIMARY KEY,
    host              text        NOT NULL,
    queues            text[]      NOT NULL,
    concurrency       integer     NOT NULL,
    in_flight         integer     NOT NULL DEFAULT 0,
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- api requeue --status failed|cancelled: walks the requeueable jobs in id
-- order, in batches. Partial, so the hot path (queued -> running -> succeeded)
-- never touches it; a job enters it once, when it fails or is cancelled.
CREATE INDEX jobs_requeueable_idx ON jobs (status, id) WHERE status IN ('failed', 'cancelled');

-- Cancellation of a running job is cooperative (SPEC §3): the API records the
-- request here; the worker running the job sees it and tells the handler.
ALTER TABLE jobs ADD COLUMN cancel_requested_at timestamptz;
