//! Worker processes, broken on purpose (and their health port): the real `worker` binary killed with
//! SIGKILL, stopped with SIGTERM or frozen with SIGSTOP mid-job, a reconciler
//! that lost its leadership, and a queue whose messages RabbitMQ lost, against
//! the real Postgres (a database per test) and RabbitMQ (a namespace per test).

mod deliveries;
mod frozen;
mod health;
mod helpers;
mod leadership;
mod lost_messages;
mod processes;
mod retention;
mod slots;
mod topology;
