// One BullMQ worker process: a no-op handler, concurrency as Conveyor's default.
const { Worker } = require('bullmq');

const concurrency = Number(process.env.WORKER_CONCURRENCY) || 16;
const worker = new Worker('bench', async () => ({ ok: true }), {
  connection: { host: '127.0.0.1', port: 6379 },
  concurrency,
});
worker.on('ready', () => process.send('ready'));
