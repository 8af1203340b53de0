import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeSyntheticModel } from '../model/synthetic.ts';
import { freePort, startPrivateRedis, type PrivateRedis } from './helpers/redis.ts';

// `strata up` supervises its worker processes: real processes, a real SIGKILL while a worker builds its stage.
// The model is synthetic and big enough (≈40 MB) that the build takes a moment to catch.

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
let redis: PrivateRedis;
let root: string;
let model: string;

before(async () => {
  redis = await startPrivateRedis();
  root = mkdtempSync(join(tmpdir(), 'strata-supervisor-'));
  model = join(root, 'model');
  writeSyntheticModel(model, { family: 'gpt2', blocks: 4, dModel: 384, heads: 6, vocab: 8000, maxPositions: 128 });
});

after(async () => {
  await redis?.stop();
  rmSync(root, { recursive: true, force: true });
});

/** `strata up` on the synthetic model with a fresh cache; its stderr collected, lines matched as they come. */
function startUp(env: Record<string, string>, port: number) {
  const child = spawn(process.execPath, [STRATA, 'up', '--model', model, '--workers', '2', '--port', String(port), '--redis', redis.url, '--threads', '1'], {
    stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, STRATA_CACHE_DIR: mkdtempSync(join(root, 'cache-')), ...env },
  });
  let err = '';
  const waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
  child.stderr!.on('data', (d) => {
    err += d;
    for (const w of [...waiters]) {
      const m = err.match(w.re);
      if (m) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  const waitFor = (re: RegExp, ms = 90_000) =>
    new Promise<RegExpMatchArray>((resolve, reject) => {
      const m = err.match(re);
      if (m) return resolve(m);
      const timer = setTimeout(() => reject(new Error(`no ${re} within ${ms} ms; stderr:\n${err.slice(-3000)}`)), ms);
      waiters.push({ re, resolve: (x) => (clearTimeout(timer), resolve(x)) });
    });
  return { child, waitFor, stderr: () => err };
}

/** The pid of `up`'s first worker process (its children are the workers, in start order). */
function firstWorkerPid(up: ChildProcess): number {
  const pids = execFileSync('pgrep', ['-P', String(up.pid), '-f', 'strata.js worker'], { encoding: 'utf8' }).trim().split('\n').map(Number);
  return Math.min(...pids);
}

/** /health polled until it answers 200, or the last answer once `ms` have passed. */
async function waitForHealthy(port: number, ms: number): Promise<Response> {
  const deadline = Date.now() + ms;
  for (;;) {
    const res = await fetch(`http://127.0.0.1:${port}/health`);
    if (res.status === 200 || Date.now() > deadline) return res;
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function stopUp(up: ChildProcess): Promise<void> {
  if (up.exitCode !== null || up.signalCode !== null) return;
  const exited = new Promise((r) => up.once('exit', r));
  up.kill('SIGTERM');
  await exited;
}

test('a worker killed with SIGKILL while building its stage is reported with its signal and phase, restarted at its address, and the pipeline serves', { timeout: 180_000 }, async () => {
  const port = await freePort();
  const up = startUp({}, port);
  try {
    await up.waitFor(/"stage":"worker 0","phase":"building"/);
    const pid = firstWorkerPid(up.child);
    process.kill(pid, 'SIGKILL');
    const [report] = await up.waitFor(new RegExp(`worker 0 \\(pid ${pid}\\) killed by SIGKILL while (building|loading) its stage \\[0, \\d\\)[^"]*likely out of memory[^"]*--dtype int8`));
    assert.ok(report);
    const [, address] = await up.waitFor(/restarting worker 0 at (\S+) in/);
    await up.waitFor(new RegExp(`worker 0 restarted \\(pid \\d+\\) at ${address.replace(/\./g, '\\.')}`));
    await up.waitFor(/coordinator API listening/);
    // The API listens while the workers load (/health answers 503 naming the loading stage): wait for serving.
    const health = await waitForHealthy(port, 90_000);
    assert.equal(health.status, 200, await health.clone().text());
    const pipeline = (await (await fetch(`http://127.0.0.1:${port}/v1/pipeline`)).json()) as { stages: { address: string; pid: number }[] };
    assert.equal(pipeline.stages[0].address, address, 'the restarted worker serves at its old address');
    assert.notEqual(pipeline.stages[0].pid, pid);
    const res = await fetch(`http://127.0.0.1:${port}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: [1, 2, 3], max_tokens: 3, temperature: 0 }) });
    assert.equal(res.status, 200, await res.clone().text());
  } finally {
    await stopUp(up.child);
  }
});

test('a worker that dies more often than it may be restarted stops `strata up` with the cause and the fix', { timeout: 120_000 }, async () => {
  const up = startUp({ STRATA_MAX_RESTARTS: '0' }, await freePort());
  try {
    await up.waitFor(/"stage":"worker 0","phase":"building"/);
    const exited = new Promise<number | null>((r) => up.child.once('exit', (code) => r(code)));
    const workers = execFileSync('pgrep', ['-P', String(up.child.pid), '-f', 'strata.js worker'], { encoding: 'utf8' }).trim().split('\n').map(Number);
    assert.equal(workers.length, 2);
    process.kill(firstWorkerPid(up.child), 'SIGKILL');
    assert.equal(await exited, 2);
    assert.match(up.stderr(), /strata: worker 0 failed 1 times in \d+ min; the last time it was killed by SIGKILL while (building|loading) its stage .*To fix: likely out of memory.*\[worker_failed\]/);
    // Every worker was stopped with it: nothing is left behind.
    for (const pid of workers) assert.throws(() => process.kill(pid, 0), /ESRCH/, `worker ${pid} is still running`);
  } finally {
    await stopUp(up.child);
  }
});
