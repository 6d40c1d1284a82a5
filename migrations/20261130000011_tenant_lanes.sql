-- Fairness between tenants: every queue is carried by amqp.lanes RabbitMQ
-- queues, and each tenant's jobs go to the lane it was given on its first
-- submission (round robin, so the first `lanes` tenants never share one).
CREATE TABLE tenant_lanes (
    tenant text PRIMARY KEY,
    lane integer NOT NULL
);

-- The lane a job was published to, kept so that every republish (outbox,
-- retry, requeue, a lost message) goes to the same lane. 0: the queue's
-- first RabbitMQ queue, the one it had before lanes.
ALTER TABLE jobs ADD COLUMN lane smallint NOT NULL DEFAULT 0;
