// Browser test of the demo page (/demo of the reference server) in headless Chromium.
//
// Drives Debian's Chromium (/usr/bin/chromium, or CHROMIUM_PATH) through playwright-core: starts a
// download job from the form, waits for the bar to reach 100 %, clicks the download link and checks the
// file is a zip archive with one entry per available file. Three times by choice: with every transport
// (WebSocket), with WebSocket disabled (?transports=sse,poll: SSE) and with SSE disabled too
// (?transports=poll); and twice by failure: a WebSocket that cannot connect (the page falls back to SSE),
// then an event stream that fails too (to polling).
//
// Needs a running server: BASE_URL (default http://127.0.0.1:3000). scripts/suites/browser.sh builds and
// starts one, installs Chromium and the npm dependencies, and runs this file with `node --test`.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const BASE_URL = (process.env.BASE_URL ?? "http://127.0.0.1:3000").replace(/\/+$/, "");
const CHROMIUM_PATH = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const JOB_TIMEOUT_MS = Number(process.env.JOB_TIMEOUT_MS ?? 60_000);
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let context;
let userDataDir;

before(async () => {
  // A missing server or browser is a failure with a clear message, never a skip.
  try {
    const res = await fetch(`${BASE_URL}/health`);
    assert.ok(res.ok, `GET ${BASE_URL}/health answered ${res.status}`);
  } catch (e) {
    throw new Error(`no longjob server answers at ${BASE_URL} (set BASE_URL, or run scripts/suites/browser.sh): ${e.message}`);
  }
  try {
    await fs.access(CHROMIUM_PATH);
  } catch {
    throw new Error(`no Chromium at ${CHROMIUM_PATH} (apt-get install chromium, or set CHROMIUM_PATH)`);
  }
  userDataDir = await fs.mkdtemp(path.join(os.tmpdir(), "longjob-chromium-"));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: CHROMIUM_ARGS,
    acceptDownloads: true,
  });
});

after(async () => {
  await context?.close();
  if (userDataDir) await fs.rm(userDataDir, { recursive: true, force: true });
});

/** Random distinct ids: `available` multiples of 7 and one that is not (unavailable in mock mode). */
function pickIds(available = 3) {
  const ids = new Set();
  while (ids.size < available) ids.add(7 * (2000 + Math.floor(Math.random() * 10000)));
  const ok = [...ids];
  return { ok, all: [...ok, 7 * (2000 + Math.floor(Math.random() * 10000)) + 3] };
}

/** Number of entries of a zip archive, read from its end-of-central-directory record. */
function zipEntries(buf) {
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 22 - 65535); i--) {
    if (buf.readUInt32LE(i) === 0x06054b50) return buf.readUInt16LE(i + 10);
  }
  throw new Error("no end-of-central-directory record: not a zip archive");
}

// Transports that exist but fail, installed before the page's own script runs: the page must notice
// and fall back by itself (unlike ?transports=, which skips a transport from the start).
function breakWebSocket() {
  const Real = window.WebSocket;
  // Port 9 on loopback: nothing listens, the connection is refused and the socket closes unopened.
  window.WebSocket = class extends Real {
    constructor(_url, protocols) {
      super("ws://127.0.0.1:9/", protocols);
    }
  };
}
function breakEventSource() {
  const Real = window.EventSource;
  // A 404 with a JSON body: the browser fails the stream and closes it.
  window.EventSource = class extends Real {
    constructor(_url, init) {
      super("/v1/download/no-such-stream", init);
    }
  };
}

async function runJobThroughPage(query, expectedTransport, ...initScripts) {
  const page = await context.newPage();
  for (const script of initScripts) await page.addInitScript(script);
  const consoleErrors = [];
  page.on("pageerror", e => consoleErrors.push(String(e)));
  try {
    await page.goto(`${BASE_URL}/demo${query}`);
    const { ok, all } = pickIds(3);
    await page.getByTestId("file-ids").fill(all.join(", "));

    const initiated = page.waitForResponse(r => r.url().endsWith("/v1/download/initiate") && r.request().method() === "POST");
    await page.getByTestId("submit").click();
    const res = await initiated;
    assert.equal(res.status(), 202, `initiate answered ${res.status()}: ${await res.text()}`);
    const { jobId } = await res.json();
    assert.match(jobId, /^[0-9a-f-]{36}$/);

    const card = page.locator(`[data-testid="job-card"][data-job-id="${jobId}"]`);
    await card.waitFor({ timeout: 10_000 });

    // The bar reaches 100 % and the job completes.
    await card.locator('[data-testid="job-bar"][aria-valuenow="100"]').waitFor({ timeout: JOB_TIMEOUT_MS });
    await page.waitForFunction(
      el => el.dataset.status === "completed",
      await card.elementHandle(),
      { timeout: JOB_TIMEOUT_MS },
    );
    assert.equal(await card.getByTestId("job-percentage").textContent(), "100 %");
    assert.equal(await card.getByTestId("job-files").textContent(), `${all.length} / ${all.length}`);
    assert.equal(await card.getByTestId("job-status").textContent(), "completed");
    assert.equal(await card.getAttribute("data-transport"), expectedTransport,
      `the card followed the job by ${await card.getAttribute("data-transport")}, expected ${expectedTransport}`);
    assert.equal(await card.getByTestId("job-transport").getAttribute("data-transport"), expectedTransport);

    // The download link appears and gives a zip with one entry per available file.
    const link = card.getByTestId("job-download");
    await link.waitFor({ state: "visible", timeout: 10_000 });
    const [download] = await Promise.all([page.waitForEvent("download", { timeout: 15_000 }), link.click()]);
    const file = await download.path();
    assert.ok(file, `download failed: ${await download.failure()}`);
    const bytes = await fs.readFile(file);
    assert.ok(bytes.length > 0, "downloaded file is empty");
    assert.equal(bytes.subarray(0, 2).toString("latin1"), "PK", "downloaded file is not a zip archive");
    assert.equal(zipEntries(bytes), ok.length, "one zip entry per available file");
    assert.match(download.suggestedFilename(), /\.zip$/);

    assert.deepEqual(consoleErrors, [], "no uncaught error in the page");
  } finally {
    await page.close();
  }
}

test("demo: a job followed by WebSocket reaches 100 % and downloads a zip", async () => {
  await runJobThroughPage("", "ws");
});

test("demo: with WebSocket disabled it follows by SSE", async () => {
  await runJobThroughPage("?transports=sse,poll", "sse");
});

test("demo: with WebSocket and SSE disabled it polls", async () => {
  await runJobThroughPage("?transports=poll", "poll");
});

test("demo: a WebSocket that cannot connect falls back to SSE", async () => {
  await runJobThroughPage("", "sse", breakWebSocket);
});

test("demo: with WebSocket and SSE both failing it falls back to polling", async () => {
  await runJobThroughPage("", "poll", breakWebSocket, breakEventSource);
});

test("demo: invalid ids are refused in the form without a request", async () => {
  const page = await context.newPage();
  try {
    await page.goto(`${BASE_URL}/demo`);
    let requested = false;
    page.on("request", r => { if (r.url().endsWith("/v1/download/initiate")) requested = true; });
    await page.getByTestId("file-ids").fill("70000, abc, 12");
    await page.getByTestId("submit").click();
    await page.getByTestId("form-error").filter({ hasText: "abc" }).waitFor({ timeout: 5_000 });
    assert.equal(requested, false);

    // The random button fills in ids that parse.
    await page.getByTestId("random-ids").click();
    const ids = (await page.getByTestId("file-ids").inputValue()).split(/[\s,]+/).filter(Boolean).map(Number);
    assert.ok(ids.length >= 2, `random ids: ${ids}`);
    assert.ok(ids.some(n => n % 7 === 0) && ids.some(n => n % 7 !== 0), `random ids mix available and not: ${ids}`);
  } finally {
    await page.close();
  }
});
