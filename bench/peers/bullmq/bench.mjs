// BullMQ peer of longjob-bench.
//
//   REDIS_URL=redis://127.0.0.1:6379 node bench.mjs --jobs N --concurrency C --progress P
//   (or --redis-url URL; also --timeout S, default 600)
//
// Bulk-adds N no-op jobs (addBulk in chunks of 1000) to a fresh queue, then starts one Worker of
// concurrency C whose processor calls job.updateProgress P times; process_per_s is N over the time
// from the worker's start until all N jobs completed. Prints one JSON line on stdout, removes the
// queue's keys at the end. Failures print {"system":"bullmq","error":"..."} and exit 1.
import { readFileSync } from 'node:fs';
import { Queue, Worker } from 'bullmq';

const SYSTEM = 'bullmq';

function parseArgs(argv) {
  const args = { jobs: 20000, concurrency: 50, progress: 0, timeout: 600, redisUrl: undefined };
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i];
    if (flag === '--redis-url') { args.redisUrl = argv[i + 1]; continue; }
    const value = Number(argv[i + 1]);
    if (!Number.isFinite(value)) throw new Error(`${flag} needs a number`);
    switch (flag) {
      case '--jobs': args.jobs = value; break;
      case '--concurrency': args.concurrency = Math.max(1, value); break;
      case '--progress': args.progress = value; break;
      case '--timeout': args.timeout = value; break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  return args;
}

// ioredis options from a redis:// URL (BullMQ takes ioredis options as `connection`).
function connectionFromUrl(raw) {
  const url = new URL(raw);
  const db = url.pathname && url.pathname.length > 1 ? Number(url.pathname.slice(1)) : 0;
  return {
    host: url.hostname || '127.0.0.1',
    port: url.port ? Number(url.port) : 6379,
    username: url.username ? decodeURIComponent(url.username) : undefined,
    password: url.password ? decodeURIComponent(url.password) : undefined,
    db,
    tls: url.protocol === 'rediss:' ? {} : undefined,
    // Required by BullMQ workers (blocking commands).
    maxRetriesPerRequest: null,
  };
}

function versionOf(pkg) {
  try {
    const url = new URL(`./node_modules/${pkg}/package.json`, import.meta.url);
    return JSON.parse(readFileSync(url, 'utf8')).version;
  } catch {
    return undefined;
  }
}

function fail(e) {
  console.log(JSON.stringify({ system: SYSTEM, backend: 'redis', error: String(e && e.message ? e.message : e) }));
  process.exit(1);
}

// Rejects after `ms` with `message` unless `promise` settles first.
function within(promise, ms, message) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(message)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  // Whatever hangs (an unreachable Redis retries forever in ioredis), the run ends.
  setTimeout(() => fail(`gave up after ${args.timeout + 60}s`), (args.timeout + 60) * 1000).unref();
  const url = args.redisUrl || process.env.REDIS_URL || 'redis://127.0.0.1:6379';
  const connection = connectionFromUrl(url);
  const name = `bench-${process.pid}-${Date.now()}`;
  const queue = new Queue(name, { connection });
  queue.on('error', () => {});
  try {
    await within(queue.waitUntilReady(), 10000, `cannot reach Redis at ${url} within 10s`);
  } catch (e) {
    fail(e);
  }
  let worker;
  try {
    const enqueueStarted = performance.now();
    for (let i = 0; i < args.jobs; i += 1000) {
      const chunk = [];
      for (let j = i; j < Math.min(args.jobs, i + 1000); j++) {
        chunk.push({ name: 'noop', data: { i: j } });
      }
      await queue.addBulk(chunk);
    }
    const enqueueS = (performance.now() - enqueueStarted) / 1000;

    const P = args.progress;
    let completed = 0;
    let failed = 0;
    let resolveDone;
    const done = new Promise((resolve) => { resolveDone = resolve; });
    if (args.jobs === 0) resolveDone();
    const started = performance.now();
    worker = new Worker(
      name,
      async (job) => {
        for (let i = 1; i <= P; i++) await job.updateProgress(Math.round((i * 100) / P));
        return null;
      },
      { connection, concurrency: args.concurrency, autorun: false },
    );
    worker.on('completed', () => {
      completed += 1;
      if (completed + failed >= args.jobs) resolveDone();
    });
    worker.on('failed', () => {
      failed += 1;
      if (completed + failed >= args.jobs) resolveDone();
    });
    worker.on('error', (e) => process.stderr.write(`bullmq worker error: ${e}\n`));
    worker.run().catch((e) => process.stderr.write(`bullmq worker stopped: ${e}\n`));
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`timed out after ${args.timeout}s with ${completed}/${args.jobs} completed`)),
        args.timeout * 1000,
      );
    });
    await Promise.race([done, timeout]);
    clearTimeout(timer);
    const processS = (performance.now() - started) / 1000;
    if (failed > 0) throw new Error(`${failed} of ${args.jobs} jobs failed`);
    console.log(JSON.stringify({
      system: SYSTEM,
      backend: 'redis',
      version: versionOf('bullmq'),
      jobs: args.jobs,
      concurrency: args.concurrency,
      progress: P,
      enqueue_per_s: Math.round(args.jobs / enqueueS),
      process_per_s: Math.round(args.jobs / processS),
    }));
  } finally {
    if (worker) await worker.close(true).catch(() => {});
    await queue.obliterate({ force: true }).catch((e) => process.stderr.write(`obliterate: ${e}\n`));
    await queue.close().catch(() => {});
  }
}

main().then(() => process.exit(0), fail);
