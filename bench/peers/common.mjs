// Shared by the Node peers on PostgreSQL (graphile-worker, pg-boss): arguments, the wait for
// completion (with stall and timeout detection) and the JSON line.
import { readFileSync } from 'node:fs';

export function parseArgs(argv, defaults = {}) {
  const args = { jobs: 20000, concurrency: 50, progress: 0, timeout: 900, stall: 60, mode: 'default', ...defaults };
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i];
    const raw = argv[i + 1];
    if (raw === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--mode') { args.mode = raw; continue; }
    if (flag === '--database-url') { process.env.DATABASE_URL = raw; continue; }
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`${flag} needs a number`);
    switch (flag) {
      case '--jobs': args.jobs = value; break;
      case '--concurrency': args.concurrency = Math.max(1, value); break;
      case '--progress': args.progress = value; break;
      case '--timeout': args.timeout = value; break;
      case '--stall': args.stall = value; break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  return args;
}

export function versionOf(dir, pkg) {
  try {
    return JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, dir), 'utf8')).version;
  } catch {
    return undefined;
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Polls `done()` (the number of completed jobs) every 25 ms until it reaches `target`; throws on
// a stall (no change for args.stall seconds), a timeout, or a worker error reported by `failed()`.
export async function waitForDone({ target, done, args, failed = () => undefined }) {
  const started = performance.now();
  let last = -1;
  let lastMove = performance.now();
  for (;;) {
    const count = await done();
    if (count >= target) return (performance.now() - started) / 1000;
    const now = performance.now();
    if (count !== last) { last = count; lastMove = now; }
    const error = failed();
    if (error) throw new Error(`${error} at ${count}/${target} jobs done`);
    if (now - lastMove > args.stall * 1000) throw new Error(`stalled for ${args.stall}s at ${count}/${target} jobs done`);
    if (now - started > args.timeout * 1000) throw new Error(`timed out after ${args.timeout}s at ${count}/${target} jobs done`);
    await sleep(25);
  }
}

export function figures({ system, mode, version, args, enqueueS, processS }) {
  return {
    system,
    backend: 'postgres',
    mode,
    version,
    jobs: args.jobs,
    concurrency: args.concurrency,
    progress: args.progress,
    enqueue_per_s: Math.round(args.jobs / enqueueS),
    process_per_s: Math.round(args.jobs / processS),
  };
}

// Runs `main` and prints its JSON line, or a failure line; exits 0 or 1.
export function runMain(system, backend, main) {
  let args = {};
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.log(JSON.stringify({ system, backend, error: String(e.message || e) }));
    process.exit(2);
  }
  // Whatever hangs, the run ends with a failure line.
  setTimeout(() => {
    console.log(JSON.stringify({
      system, backend, mode: args.mode, jobs: args.jobs, concurrency: args.concurrency,
      progress: args.progress, error: `gave up after ${args.timeout + 60}s`,
    }));
    process.exit(1);
  }, (args.timeout + 60) * 1000).unref();
  main(args).then(
    (line) => {
      console.log(JSON.stringify(line));
      process.exit(0);
    },
    (e) => {
      console.log(JSON.stringify({
        system, backend, mode: args.mode, jobs: args.jobs, concurrency: args.concurrency,
        progress: args.progress, error: String(e && e.message ? e.message : e),
      }));
      process.exit(1);
    },
  );
}
