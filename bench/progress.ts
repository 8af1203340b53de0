import cliProgress from 'cli-progress';

/** Progress on stderr: phase lines always (unless quiet), a bar when stderr is a terminal. */
export interface Progress {
  phase(msg: string): void;
  bar(label: string, total: number, unit?: string): { update(done: number): void; increment(n?: number): void; stop(): void };
}

export function createProgress(opts: { quiet?: boolean } = {}): Progress {
  const t0 = Date.now();
  const stamp = () => `[bench ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s]`;
  const tty = process.stderr.isTTY === true;
  return {
    phase(msg) {
      if (!opts.quiet) process.stderr.write(`${stamp()} ${msg}\n`);
    },
    bar(label, total, unit = '') {
      if (opts.quiet || !tty || total <= 0) return { update() {}, increment() {}, stop() {} };
      const bar = new cliProgress.SingleBar(
        { format: `  ${label} [{bar}] {percentage}% {value}/{total}${unit ? ` ${unit}` : ''} {duration_formatted}`, stream: process.stderr, hideCursor: true, clearOnComplete: true, etaBuffer: 50 },
        cliProgress.Presets.shades_classic,
      );
      bar.start(total, 0);
      let done = 0;
      return {
        update: (d) => bar.update((done = Math.min(d, total))),
        increment: (n = 1) => bar.update((done = Math.min(done + n, total))),
        stop: () => bar.stop(),
      };
    },
  };
}

export const silentProgress: Progress = { phase() {}, bar: () => ({ update() {}, increment() {}, stop() {} }) };
