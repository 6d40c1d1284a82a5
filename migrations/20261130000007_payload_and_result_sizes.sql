-- The size of a job's payload and result as JSON text, written with them.
-- A list page leaves out large payloads and results (a client GETs the job
-- for them): these let the list decide without reading, let alone detoasting,
-- the values it leaves out. NULL for jobs written before this migration: the
-- list then measures the value itself.
ALTER TABLE jobs ADD COLUMN payload_bytes integer, ADD COLUMN result_bytes integer;
