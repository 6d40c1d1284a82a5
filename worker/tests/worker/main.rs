//! Worker processes, broken on purpose: the real `worker` binary, killed with
//! SIGKILL or stopped with SIGTERM mid-job, against the real Postgres (a
//! database per test) and RabbitMQ (a namespace per test).

mod processes;
