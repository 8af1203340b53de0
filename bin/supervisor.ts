import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { StrataError } from '../model/errors.ts';
import { fraction, type LoadProgress } from '../model/progress.ts';

const STRATA = fileURLToPath(new URL('./strata.js', import.meta.url));

export interface SupervisedWorker {
  index: number;
  address: string;
  pid: number;
  process: ChildProcess;
}

/** Why a worker process ended, and what it was doing then. */
export interface WorkerDeath {
  index: number;
  pid: number;
  code: number | null;
  signal: NodeJS.Signals | null;
  /** 'starting' (before it listened), or its stage's load phase. */
  doing: 'starting' | LoadProgress['phase'];
  progress: LoadProgress | null;
  stderr: string;
}

export interface SupervisorOptions {
  modelDir: string;
  count: number;
  /** Extra `strata worker` arguments (threads, device, TLS, ...). */
  args: string[];
  /** Restarts of one worker within `windowMs` before giving up (default STRATA_MAX_RESTARTS, else 3). */
  maxRestarts?: number;
  windowMs?: number;
  /**
   * First restart delay, doubled for each further failure in the window, at most 30 s (default 0.25 s: a worker killed
   * once should serve again as soon as it can load; one that keeps dying still backs off and then stops).
   */
  backoffMs?: number;
  /** How long a (re)started worker may take to listen (default 120 s). */
  startTimeoutMs?: number;
  log: (level: 'info' | 'warn' | 'error', obj: object, msg: string) => void;
  onLoad?: (index: number, p: LoadProgress) => void;
  /** A worker failed too often: the supervisor has stopped every worker; the caller stops too. */
  onFatal: (e: StrataError) => void;
}

interface Slot {
  index: number;
  /** Fixed once the first start listened: a restart comes back at the same address, where the coordinator looks. */
  listen: string;
  child: ChildProcess | null;
  pid: number;
  address: string;
  doing: WorkerDeath['doing'];
  progress: LoadProgress | null;
  stderr: string;
  failures: number[];
  timer: NodeJS.Timeout | null;
}

const pct = (p: LoadProgress | null) => (p ? ` (${Math.floor(100 * fraction(p))} %)` : '');

/** "killed by SIGKILL while building its stage [0, 6) (43 %)" */
export function describeDeath(d: WorkerDeath): string {
  const how = d.signal ? `killed by ${d.signal}` : `exited with code ${d.code}`;
  const range = d.progress?.range ? ` ${d.progress.range}` : '';
  const doing = {
    starting: 'while starting (before it listened)',
    idle: 'while waiting for its block range',
    building: `while building its stage${range}${pct(d.progress)}`,
    loading: `while loading its stage${range} into ONNX Runtime${pct(d.progress)}`,
    serving: `while serving its stage${range}`,
    failed: `after its stage${range} failed to load (${d.progress?.error ?? 'unknown error'})`,
  }[d.doing];
  return `${how} ${doing}`;
}

/** What to do about it. SIGKILL during a build or load is, in practice, the kernel's OOM killer. */
export function deathHint(d: WorkerDeath): string {
  const tail = d.stderr.trim().split('\n').slice(-3).join(' | ');
  if (d.signal === 'SIGKILL' && (d.doing === 'building' || d.doing === 'loading')) {
    return 'likely out of memory (the kernel\'s OOM killer sends SIGKILL; see `dmesg | grep -i oom`): use more workers (--workers), a smaller dtype (--dtype int8 or int4), or a machine with more memory';
  }
  if (d.signal === 'SIGKILL') return 'something sent it SIGKILL (the OOM killer, or a person): check `dmesg | grep -i oom` and the machine\'s free memory';
  if (d.signal) return `it was sent ${d.signal}`;
  return tail ? `its last output: ${tail}` : 'it printed nothing; run `strata worker` by hand with the same arguments to see why';
}

/**
 * Runs `strata up`'s K worker processes: starts them, follows each one's load progress (its stdout JSON lines),
 * reports a worker that exits or is killed with its code or signal and what it was doing, restarts it at the same
 * address with backoff, and after `maxRestarts` failures within the window stops everything with an error that names
 * the cause and the fix. Nothing here waits forever: every start has a timeout, every failure is counted.
 */
export class WorkerSupervisor {
  private readonly slots: Slot[];
  private stopping = false;
  private readonly maxRestarts: number;

  constructor(private readonly o: SupervisorOptions) {
    this.maxRestarts = o.maxRestarts ?? Number(process.env.STRATA_MAX_RESTARTS ?? 3);
    this.slots = Array.from({ length: o.count }, (_, index) => ({
      index, listen: '127.0.0.1:0', child: null, pid: 0, address: '', doing: 'starting' as const, progress: null, stderr: '', failures: [], timer: null,
    }));
  }

  /** Starts every worker; resolves when all listen (a worker that dies meanwhile is restarted like any other). */
  start(): Promise<SupervisedWorker[]> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const fatal = this.o.onFatal;
      // Until all listen, a fatal failure rejects start() (after that it goes to onFatal).
      (this.o as { onFatal: (e: StrataError) => void }).onFatal = (e) => {
        if (!settled) {
          settled = true;
          reject(e);
        } else fatal(e);
      };
      const listened = () => {
        if (!settled && this.slots.every((s) => s.address && s.child)) {
          settled = true;
          resolve(this.workers);
        }
      };
      for (const slot of this.slots) this.spawn(slot, listened);
    });
  }

  get workers(): SupervisedWorker[] {
    return this.slots.map((s) => ({ index: s.index, address: s.address, pid: s.pid, process: s.child! }));
  }

  private spawn(slot: Slot, listened: () => void): void {
    const child = spawn(process.execPath, [STRATA, 'worker', '--listen', slot.listen, '--model', this.o.modelDir, ...this.o.args], { stdio: ['ignore', 'pipe', 'pipe'] });
    slot.child = child;
    slot.pid = child.pid ?? 0;
    slot.doing = 'starting';
    slot.progress = null;
    slot.stderr = '';
    child.stderr!.on('data', (d) => (slot.stderr = (slot.stderr + d).slice(-4000)));
    const startTimer = setTimeout(() => {
      this.o.log('error', { worker: slot.index, pid: slot.pid }, `worker ${slot.index} did not listen within ${(this.o.startTimeoutMs ?? 120_000) / 1000} s: killing it`);
      child.kill('SIGKILL');
    }, this.o.startTimeoutMs ?? 120_000);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      let msg: { event?: string; address?: string } & Partial<LoadProgress>;
      try {
        msg = JSON.parse(line);
      } catch {
        return; // not a machine line
      }
      if (msg.event === 'listening' && msg.address) {
        clearTimeout(startTimer);
        slot.address = msg.address;
        slot.listen = msg.address;
        slot.doing = 'idle';
        listened();
      } else if (msg.event === 'load' && msg.phase) {
        const { event: _e, ...p } = msg;
        slot.progress = p as LoadProgress;
        slot.doing = p.phase!;
        this.o.onLoad?.(slot.index, slot.progress);
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(startTimer);
      if (slot.child !== child) return;
      slot.child = null;
      if (this.stopping) return;
      this.died(slot, { index: slot.index, pid: slot.pid, code, signal, doing: slot.doing, progress: slot.progress, stderr: slot.stderr }, listened);
    });
  }

  private died(slot: Slot, d: WorkerDeath, listened: () => void): void {
    const now = Date.now();
    const windowMs = this.o.windowMs ?? 10 * 60_000;
    slot.failures = [...slot.failures.filter((t) => now - t < windowMs), now];
    const cause = describeDeath(d);
    const hint = deathHint(d);
    this.o.log('error', { worker: slot.index, pid: d.pid, code: d.code, signal: d.signal, doing: d.doing, failures: slot.failures.length }, `worker ${slot.index} (pid ${d.pid}) ${cause}: ${hint}`);
    if (slot.failures.length > this.maxRestarts) {
      const e = new StrataError(
        'worker_failed',
        `worker ${slot.index} failed ${slot.failures.length} times in ${Math.round(windowMs / 60_000)} min; the last time it was ${cause}. To fix: ${hint}`,
        'unavailable',
      );
      void this.stop().then(() => this.o.onFatal(e));
      return;
    }
    const delay = Math.min(30_000, (this.o.backoffMs ?? 250) * 2 ** (slot.failures.length - 1));
    this.o.log('warn', { worker: slot.index, delay_ms: delay, address: slot.listen }, `restarting worker ${slot.index} at ${slot.listen} in ${(delay / 1000).toFixed(delay < 1000 ? 2 : 1)} s (restart ${slot.failures.length} of at most ${this.maxRestarts})`);
    slot.address = '';
    slot.timer = setTimeout(() => {
      slot.timer = null;
      if (this.stopping) return;
      this.spawn(slot, () => {
        this.o.log('info', { worker: slot.index, pid: slot.pid, address: slot.address }, `worker ${slot.index} restarted (pid ${slot.pid}) at ${slot.address}`);
        listened();
      });
    }, delay);
  }

  /** Stops every worker (SIGTERM, then SIGKILL after 5 s) and every pending restart. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(
      this.slots.map((s) => {
        if (s.timer) clearTimeout(s.timer);
        const child = s.child;
        if (!child || child.exitCode !== null || child.signalCode !== null) return undefined;
        return new Promise<void>((resolve) => {
          child.once('exit', () => resolve());
          child.kill('SIGTERM');
          setTimeout(() => child.kill('SIGKILL'), 5_000).unref();
        });
      }),
    );
  }
}
