-- An ended job (succeeded, failed, cancelled) is immutable to clients (SPEC
-- §4), so API replicas keep recently read ones in memory. The only ways one
-- still changes are an operator's requeue and a prune (or a TRUNCATE by
-- hand); each notifies `conveyor_ended_changed`, and every replica empties
-- its cache on it.
--
-- Row triggers with a WHEN clause: the condition is checked without calling
-- the function, so the job path (which never updates an ended job) pays next
-- to nothing. The payload is empty on purpose: Postgres folds identical
-- notifications of one transaction into one, so pruning a million jobs sends
-- a single notification.
CREATE FUNCTION conveyor_ended_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_ended_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_ended_updated AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION conveyor_ended_changed();

CREATE TRIGGER jobs_ended_deleted AFTER DELETE ON jobs FOR EACH ROW
    WHEN (OLD.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION conveyor_ended_changed();

CREATE TRIGGER jobs_truncated AFTER TRUNCATE ON jobs FOR EACH STATEMENT
    EXECUTE FUNCTION conveyor_ended_changed();
