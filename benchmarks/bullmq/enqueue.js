// Fill the BullMQ queue `bench` with N no-op jobs: node enqueue.js REDIS_URL N
const { Queue } = require('bullmq');

async function main() {
  const url = new URL(process.argv[2]);
  const total = Number(process.argv[3]);
  const queue = new Queue('bench', { connection: { host: url.hostname, port: Number(url.port || 6379) } });
  for (let done = 0; done < total; done += 1000) {
    const n = Math.min(1000, total - done);
    await queue.addBulk(Array.from({ length: n }, (_, i) => ({ name: 'noop', data: { i: done + i } })));
  }
  await queue.close();
}

main().catch((err) => { console.error(err); process.exit(1); });
