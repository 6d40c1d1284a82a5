// BullMQ end to end, shaped like Conveyor's `bench e2e`: C submitters, two
// worker processes at concurrency 16, POLLERS pollers reading random
// submitted jobs; jobs/s from the first submission until every job has
// completed (BullMQ's defaults: completed jobs are kept, Redis as it runs).
// Submitters and pollers call Redis directly, or with HTTP=1 go through a
// minimal HTTP front (api.js), as Conveyor's clients go through its API.
const { fork } = require('child_process');
const { Queue } = require('bullmq');

const N = Number(process.env.N) || 20000;
const C = Number(process.env.C) || 64;
const POLLERS = Number(process.env.POLLERS) || 0;
const HTTP = process.env.HTTP === '1';
const front = `http://127.0.0.1:${Number(process.env.PORT) || 18090}/v1/jobs`;
const ready = (child) => new Promise((resolve) => child.on('message', (m) => m === 'ready' && resolve()));

async function main() {
  const queue = new Queue('bench', { connection: { host: '127.0.0.1', port: 6379 } });
  await queue.obliterate({ force: true });
  const children = [fork(`${__dirname}/worker.js`), fork(`${__dirname}/worker.js`)];
  if (HTTP) children.push(fork(`${__dirname}/api.js`));
  await Promise.all(children.map(ready));

  const submit = HTTP
    ? async () => {
        const res = await fetch(front, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ type: 'noop', payload: {} }),
        });
        return (await res.json()).id;
      }
    : async () => (await queue.add('noop', {})).id;
  const poll = HTTP ? async (id) => (await fetch(`${front}/${id}`)).json() : (id) => queue.getJobState(id);

  const ids = [];
  let started = 0;
  let polls = 0;
  let done = false;
  const t0 = process.hrtime.bigint();
  const submitter = async () => {
    while (started < N) {
      started++;
      ids.push(await submit());
    }
  };
  const poller = async () => {
    while (!done) {
      if (ids.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 1));
        continue;
      }
      await poll(ids[Math.floor(Math.random() * ids.length)]);
      polls++;
    }
  };
  const polling = Array.from({ length: POLLERS }, poller);
  await Promise.all(Array.from({ length: C }, submitter));
  while ((await queue.getCompletedCount()) < N) await new Promise((resolve) => setTimeout(resolve, 5));
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  done = true;
  await Promise.all(polling);
  const figures = { mode: HTTP ? 'bullmq-e2e-http' : 'bullmq-e2e', n: N, concurrency: C, pollers: POLLERS };
  figures.jobs_per_s = Math.round(N / seconds);
  figures.polls_per_s = Math.round(polls / seconds);
  console.log(JSON.stringify(figures));
  children.forEach((child) => child.kill());
  await queue.obliterate({ force: true });
  await queue.close();
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`bench-bullmq: ${e.message}`);
    process.exit(1);
  },
);
