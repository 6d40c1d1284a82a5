-- The jobs table: the source of truth for every job (SPEC §3). RabbitMQ only
-- carries job ids to workers; whatever a message says, this row decides.

CREATE TABLE jobs (
    -- UUIDv7, minted by the API: time-ordered, so "newest first" is `ORDER BY id DESC`
    -- and the list's keyset cursor is simply the last id seen.
    id               uuid        PRIMARY KEY,
    -- Every job belongs to a tenant; until API keys exist it is always 'default'.
    tenant           text        NOT NULL DEFAULT 'default',
    queue            text        NOT NULL,
    type             text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    status           text        NOT NULL,
    priority         smallint    NOT NULL DEFAULT 0,
    -- Number of the attempt that is running or ran last; 0 before the first claim.
    -- Every outcome write is fenced by it, so a stale worker cannot overwrite a newer attempt.
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 5,
    timeout_seconds  integer     NOT NULL DEFAULT 300,
    run_at           timestamptz NOT NULL DEFAULT now(),
    progress         smallint,
    result           jsonb,
    -- Last error: {"message", "kind", "attempt"}.
    error            jsonb,
    idempotency_key  text,
    -- X-Request-Id of the submitting request, logged by the worker that runs the job.
    request_id       text,
    -- Outbox: NULL until RabbitMQ confirmed a message for the job's current
    -- queued stint; the reconciler republishes queued jobs still unconfirmed.
    published_at     timestamptz,
    -- The worker holding the running attempt, and until when (renewed by its heartbeat).
    lease_owner      uuid,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT jobs_status_check CHECK (status IN
        ('scheduled', 'queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT jobs_priority_check CHECK (priority BETWEEN 0 AND 9),
    CONSTRAINT jobs_attempt_check CHECK (attempt >= 0 AND attempt <= max_attempts),
    CONSTRAINT jobs_max_attempts_check CHECK (max_attempts >= 1),
    CONSTRAINT jobs_timeout_check CHECK (timeout_seconds >= 1),
    CONSTRAINT jobs_progress_check CHECK (progress BETWEEN 0 AND 100),
    CONSTRAINT jobs_payload_object_check CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT jobs_idempotency_key_length_check CHECK (char_length(idempotency_key) <= 255),
    -- A running job always has a lease; no other state keeps one.
    CONSTRAINT jobs_lease_check CHECK ((status = 'running') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_finished_check CHECK
        ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);

-- GET /v1/jobs: a tenant's jobs newest first, keyset-paginated on id. The
-- `type` and `queue` filters are applied while walking this index.
CREATE INDEX jobs_tenant_id_idx ON jobs (tenant, id DESC);

-- GET /v1/jobs?status=…: the same walk restricted to one status, so that
-- listing the few failed jobs among millions of succeeded ones stays cheap.
CREATE INDEX jobs_tenant_status_id_idx ON jobs (tenant, status, id DESC);

-- Reconciler: scheduled and retrying jobs that have come due (SPEC §6).
CREATE INDEX jobs_due_idx ON jobs (run_at) WHERE status IN ('scheduled', 'retrying');

-- Reconciler: running jobs whose lease has expired (their worker died).
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE status = 'running';

-- Reconciler (outbox): queued jobs whose publish was never confirmed.
CREATE INDEX jobs_unpublished_idx ON jobs (created_at) WHERE status = 'queued' AND published_at IS NULL;

-- Idempotency-Key: one job per key and tenant.
CREATE UNIQUE INDEX jobs_idempotency_key_idx ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
