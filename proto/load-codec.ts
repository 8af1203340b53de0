import type { LoadPhase, LoadProgress } from '../model/progress.ts';
import type { WireLoadState } from './messages.ts';

/** LoadProgress <-> InfoReply.load (eta null <-> -1; an absent field from an older worker reads as null). */
export const loadToWire = (p: LoadProgress): WireLoadState => ({
  phase: p.phase, range: p.range, done_bytes: Math.round(p.doneBytes), total_bytes: Math.round(p.totalBytes), tensors: p.tensors,
  tensors_total: p.tensorsTotal, elapsed_ms: p.elapsedMs, bytes_per_sec: p.bytesPerSec, eta_ms: p.etaMs ?? -1, cached: !!p.cached, error: p.error ?? '',
});

export function loadFromWire(w: WireLoadState | null | undefined): LoadProgress | null {
  if (!w || !w.phase) return null;
  return {
    phase: w.phase as LoadPhase, range: w.range, doneBytes: Number(w.done_bytes), totalBytes: Number(w.total_bytes), tensors: w.tensors,
    tensorsTotal: w.tensors_total, elapsedMs: w.elapsed_ms, bytesPerSec: w.bytes_per_sec, etaMs: w.eta_ms < 0 ? null : w.eta_ms,
    ...(w.cached ? { cached: true } : {}), ...(w.error ? { error: w.error } : {}),
  };
}
