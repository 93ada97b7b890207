// A BullMQ worker for no-op jobs, one Node process, concurrency 5 (the seed's default):
// node worker.js REDIS_URL [CONCURRENCY]. Runs until SIGTERM.
const { Worker } = require('bullmq');

const url = new URL(process.argv[2]);
const concurrency = Number(process.argv[3] || 5);
const worker = new Worker('bench', async () => {}, {
  connection: { host: url.hostname, port: Number(url.port || 6379), maxRetriesPerRequest: null },
  concurrency,
});
worker.on('error', (err) => console.error(err));
process.on('SIGTERM', async () => { await worker.close(); process.exit(0); });
