-- The W3C `traceparent` of the request that submitted the job (the API's span
-- for it), so that the worker's span for the job is its child however the job
-- reaches the worker: first publish, retry, rescue or republish. Nullable
-- without a default: adding it rewrites nothing.
ALTER TABLE jobs ADD COLUMN traceparent text;
