// BullMQ side of longjob's throughput benchmark (same shape as `longjob-bench throughput`):
// bulk-add N no-op jobs, then one worker of concurrency C whose processor calls
// `updateProgress` P times per job; prints one JSON line.
//
//   node bench.mjs --redis-url redis://127.0.0.1:6379 --jobs 20000 --concurrency 50 --progress 10
//
// `process_per_s` is N over the time from the worker's start until all N jobs completed;
// `enqueue_per_s` is N over the time to add them (addBulk in batches of 1000). BullMQ runs with
// its defaults (completed jobs are kept, as it does unless told otherwise). The queue has a
// name of its own and is obliterated afterwards.
import { Queue, Worker } from 'bullmq';

function parse(argv) {
  const args = { redisUrl: process.env.REDIS_URL || 'redis://127.0.0.1:6379', jobs: 20000, concurrency: 50, progress: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    switch (flag) {
      case '--redis-url': args.redisUrl = value; break;
      case '--jobs': args.jobs = Number.parseInt(value, 10); break;
      case '--concurrency': args.concurrency = Number.parseInt(value, 10); break;
      case '--progress': args.progress = Number.parseInt(value, 10); break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  for (const k of ['jobs', 'concurrency', 'progress']) {
    if (!Number.isFinite(args[k]) || args[k] < 0) throw new Error(`bad --${k}`);
  }
  return args;
}

function connection(url) {
  const u = new URL(url);
  return {
    host: u.hostname || '127.0.0.1',
    port: Number(u.port || 6379),
    password: u.password ? decodeURIComponent(u.password) : undefined,
    db: u.pathname && u.pathname.length > 1 ? Number(u.pathname.slice(1)) : 0,
    maxRetriesPerRequest: null,
  };
}

async function main() {
  const args = parse(process.argv.slice(2));
  const conn = connection(args.redisUrl);
  const name = `lj-bench-bullmq-${process.pid}-${Date.now()}`;
  const queue = new Queue(name, { connection: conn });
  await queue.waitUntilReady();

  const enqueueStarted = performance.now();
  for (let start = 0; start < args.jobs; start += 1000) {
    const batch = [];
    for (let i = start; i < Math.min(args.jobs, start + 1000); i++) {
      batch.push({ name: 'noop', data: { i } });
    }
    await queue.addBulk(batch);
  }
  const enqueueS = (performance.now() - enqueueStarted) / 1000;

  const progress = args.progress;
  let completed = 0;
  let failed = 0;
  let done;
  const allDone = new Promise((resolve) => { done = resolve; });
  const started = performance.now();
  const worker = new Worker(
    name,
    async (job) => {
      for (let i = 1; i <= progress; i++) {
        await job.updateProgress(Math.round((i * 100) / progress));
      }
      return null;
    },
    { connection: conn, concurrency: args.concurrency },
  );
  worker.on('completed', () => {
    completed += 1;
    if (completed + failed >= args.jobs) done();
  });
  worker.on('failed', () => {
    failed += 1;
    if (completed + failed >= args.jobs) done();
  });
  if (args.jobs === 0) done();
  await allDone;
  const processS = (performance.now() - started) / 1000;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  console.log(JSON.stringify({
    system: 'bullmq',
    backend: 'redis',
    jobs: args.jobs,
    concurrency: args.concurrency,
    progress: args.progress,
    enqueue_per_s: Math.round(args.jobs / enqueueS),
    process_per_s: Math.round(args.jobs / processS),
    failed,
  }));
}

main().catch((e) => {
  console.error(`error: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
