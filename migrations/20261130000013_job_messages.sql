-- A batch's jobs travel several to a RabbitMQ message (amqp.jobs_per_message):
-- `message_id` names the message that carries the job, the id of its first job;
-- NULL when the job has a message of its own. The reconciler counts messages,
-- not jobs, when it looks for messages RabbitMQ lost. Nullable without a
-- default: adding it rewrites nothing.
ALTER TABLE jobs ADD COLUMN message_id uuid;
