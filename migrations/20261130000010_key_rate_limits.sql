-- A key's own rate limit (`api keys create --rate-limit N --burst M`). NULL:
-- the key draws from its tenant's bucket at rate_limit.tenant_*.
ALTER TABLE api_keys
    ADD COLUMN rate_per_second integer CHECK (rate_per_second > 0),
    ADD COLUMN rate_burst integer CHECK (rate_burst > 0),
    ADD CONSTRAINT api_keys_rate_whole CHECK ((rate_per_second IS NULL) = (rate_burst IS NULL));
