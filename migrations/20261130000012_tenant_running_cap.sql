-- tenants.max_running: a job delivered while its tenant already runs its cap
-- is parked (stays queued, without a message) instead of being handed back
-- to RabbitMQ over and over; the reconciler publishes parked jobs again as
-- the tenant's running jobs end.
ALTER TABLE jobs ADD COLUMN parked_at timestamptz;
CREATE INDEX jobs_parked_idx ON jobs (tenant, priority DESC, id) WHERE parked_at IS NOT NULL AND status = 'queued';
-- A tenant's running jobs, counted at every capped claim.
CREATE INDEX jobs_running_tenant_idx ON jobs (tenant) WHERE status = 'running';
