// A minimal HTTP front for BullMQ (HTTP=1): POST adds a job and answers 202
// with its id, GET answers a job's state. One Node process.
const http = require('http');
const { Queue } = require('bullmq');

const queue = new Queue('bench', { connection: { host: '127.0.0.1', port: 6379 } });
const answer = (res, status, body) => {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
};
http
  .createServer((req, res) => {
    if (req.method === 'POST') {
      let body = '';
      req.on('data', (chunk) => (body += chunk));
      req.on('end', async () => {
        const { type, payload } = JSON.parse(body);
        const job = await queue.add(type, payload);
        answer(res, 202, { id: job.id, status: 'queued' });
      });
    } else {
      const id = req.url.split('/').pop();
      queue.getJobState(id).then((status) => answer(res, 200, { id, status }));
    }
  })
  .listen(Number(process.env.PORT) || 18090, () => process.send('ready'));
