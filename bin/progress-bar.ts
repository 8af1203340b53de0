import cliProgress from 'cli-progress';
import { formatProgress, fraction, type LoadProgress } from '../model/progress.ts';

/** Shows stages' load progress: live bars when stderr is a terminal, else plain log lines (phase changes, then every `everyMs`). */
export interface LoadDisplay {
  update(key: string, p: LoadProgress): void;
  stop(): void;
}

export function createLoadDisplay(log: (obj: object, msg: string) => void, opts: { tty?: boolean; everyMs?: number } = {}): LoadDisplay {
  const tty = opts.tty ?? process.stderr.isTTY === true;
  const everyMs = opts.everyMs ?? 5_000;
  const last = new Map<string, { phase: string; at: number }>();
  let multi: cliProgress.MultiBar | null = null;
  const bars = new Map<string, cliProgress.SingleBar>();
  const active = (p: { phase: string }) => p.phase === 'building' || p.phase === 'loading';
  return {
    update(key, p) {
      const prev = last.get(key);
      const now = Date.now();
      const changed = !prev || prev.phase !== p.phase;
      if (tty && active(p)) {
        multi ??= new cliProgress.MultiBar({ format: '  {key} [{bar}] {line}', stream: process.stderr, hideCursor: true, clearOnComplete: false, autopadding: true }, cliProgress.Presets.shades_classic);
        let bar = bars.get(key);
        if (!bar) bars.set(key, (bar = multi.create(100, 0, { key, line: '' })));
        bar.update(Math.floor(100 * fraction(p)), { key, line: formatProgress(p) });
        last.set(key, { phase: p.phase, at: now });
        return;
      }
      if (!changed && !(active(p) && now - prev.at >= everyMs)) return;
      last.set(key, { phase: p.phase, at: now });
      bars.get(key)?.update(100, { key, line: formatProgress(p) });
      if (multi) multi.log(`${key}: ${formatProgress(p)}\n`);
      else log({ stage: key, phase: p.phase, done_bytes: p.doneBytes, total_bytes: p.totalBytes, bytes_per_sec: Math.round(p.bytesPerSec), eta_ms: p.etaMs === null ? null : Math.round(p.etaMs) }, `${key}: ${formatProgress(p)}`);
      if (multi && [...last.values()].every((s) => !active(s))) this.stop();
    },
    stop() {
      multi?.stop();
      multi = null;
      bars.clear();
    },
  };
}
