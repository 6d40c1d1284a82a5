-- `operator`: platform-wide views (queues across tenants, workers and their
-- hosts) for the people running Conveyor. A tenant's `admin` no longer sees them.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_check
    CHECK (scopes <@ ARRAY['jobs:read', 'jobs:write', 'admin', 'operator']::text[]);
