import type { StageLink } from '../transport/link.ts';

/**
 * Each stage's health as last seen: polled from every stage (grpc.health.v1 on the gRPC transport) so /health and
 * /v1/pipeline tell the truth. A (re)configuration starts a new set, all healthy; a fault marks every stage down
 * until recovery configures a new one. An answer about an older set of stages is ignored.
 */
export class HealthMonitor {
  private healthy: boolean[] = [];
  private links: StageLink[] = [];
  private timer: NodeJS.Timeout | null = null;

  /** A freshly configured set of stages: all healthy. */
  reset(links: StageLink[]): void {
    this.links = links;
    this.healthy = links.map(() => true);
  }

  /** The pipeline lost a stage: none counts as healthy until it is re-planned. */
  markAllDown(): void {
    this.healthy = this.healthy.map(() => false);
  }

  isHealthy(stage: number): boolean {
    return this.healthy[stage] ?? false;
  }

  get allHealthy(): boolean {
    return this.healthy.length > 0 && this.healthy.every(Boolean);
  }

  /** Polls every `intervalMs`; `beforePoll` runs first each time (the pipeline grows back to full size there). */
  start(intervalMs: number, beforePoll: () => void): void {
    this.timer = setInterval(() => {
      beforePoll();
      const links = this.links;
      const seen = (i: number, ok: boolean) => links === this.links && (this.healthy[i] = ok);
      links.forEach((c, i) => c.checkHealth(Math.min(intervalMs, 2_000)).then((s) => seen(i, s === 'SERVING'), () => seen(i, false)));
    }, intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }
}
