# Helpers sourced by the measuring scripts (bench, measure-requeue): a
# throwaway database and RabbitMQ vhost of their own, dropped at the end.
# Sourcing sets DATABASE_URL and AMQP_URL for the binaries they start.

psql_admin() { psql -q -h 127.0.0.1 -U postgres -d postgres "$@"; }

# scratch_stack NAME: database NAME and vhost NAME, both empty.
scratch_stack() {
  drop_scratch_stack "$1"
  rabbitmqctl -q add_vhost "$1" >/dev/null
  rabbitmqctl -q set_permissions -p "$1" guest '.*' '.*' '.*' >/dev/null
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$1"
  export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$1"
}

# drop_scratch_stack NAME: the database and the vhost, with every queue and
# exchange in it. Best effort: it also runs on the way out of a failed run.
drop_scratch_stack() {
  psql_admin -c "DROP DATABASE IF EXISTS $1" >/dev/null 2>&1 || true
  rabbitmqctl -q delete_vhost "$1" >/dev/null 2>&1 || true
}
