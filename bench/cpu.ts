import { readdirSync, readFileSync } from 'node:fs';

/**
 * CPU time per thread from /proc (Linux): how a run's CPU splits between a process's event loop (its main thread:
 * gRPC, protobuf, scheduling) and its other threads (the stage thread and ORT's pool, plus V8 and libuv helpers).
 * On a host with as many cores as stages this tells whether the pipeline could go faster at all: CPU seconds over
 * cores is a lower bound on wall time.
 */
export interface CpuSplit {
  pid: number;
  /** Main thread CPU ms in the window. */
  eventLoopMs: number;
  /** Every other thread's CPU ms in the window. */
  otherMs: number;
}

/** USER_HZ: /proc reports CPU time in these ticks; 100 on every Linux ABI Node runs on. */
const MS_PER_TICK = 10;

/** Thread id → CPU ms so far; null where /proc is not available. */
export function threadCpu(pid: number): Map<number, number> | null {
  try {
    const out = new Map<number, number>();
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      // Fields after the parenthesised command name (which may contain spaces): utime and stime are 14th and 15th.
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(Number(tid), (Number(f[11]) + Number(f[12])) * MS_PER_TICK);
    }
    return out;
  } catch {
    return null;
  }
}

export function cpuBetween(pid: number, before: Map<number, number> | null, after: Map<number, number> | null): CpuSplit | null {
  if (!before || !after) return null;
  let eventLoopMs = 0;
  let otherMs = 0;
  for (const [tid, ms] of after) {
    const used = ms - (before.get(tid) ?? 0);
    if (tid === pid) eventLoopMs += used;
    else otherMs += used;
  }
  return { pid, eventLoopMs, otherMs };
}

/** Samples several processes at once; `done()` gives each one's split since. */
export function cpuWindow(pids: number[]): { done(): (CpuSplit | null)[] } {
  const before = pids.map(threadCpu);
  return { done: () => pids.map((pid, i) => cpuBetween(pid, before[i], threadCpu(pid))) };
}

/** A byte figure of /proc/PID/status (VmRSS now, VmHWM the peak); NaN where /proc or the process is gone. */
export function procStatusBytes(pid: number, field: 'VmRSS' | 'VmHWM'): number {
  try {
    const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : NaN;
  } catch {
    return NaN;
  }
}
