import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/**
 * Prometheus metrics, named after vLLM's (`vllm:time_to_first_token_seconds` → `strata_time_to_first_token_seconds`)
 * so existing dashboards translate. One registry per process (not prom-client's global one, so embedding strata in
 * another service does not clash); every part of the coordinator records into it, `GET /metrics` renders it.
 */
export const registry = new Registry();

let processMetrics = false;
/**
 * Node's own process metrics (CPU, memory, GC, event-loop lag) in the registry, for the process that serves
 * /metrics. Not on import: every `strata` command loads this module, and prom-client's event-loop-lag monitor wakes
 * its process every 10 ms: an idle worker's main thread woke 100 times a second for it, and the worker used 2.8 % of
 * a core instead of 1.3 % (2026-12-04). Workers serve no /metrics, so they never start it.
 */
export function collectProcessMetrics(): void {
  if (processMetrics) return;
  processMetrics = true;
  collectDefaultMetrics({ register: registry, prefix: 'strata_' });
}

// Latency buckets as vLLM uses them: from sub-10 ms decode steps up to multi-minute requests.
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
const TPOT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5];
const E2E_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480];

export const requestsWaiting = new Gauge({ name: 'strata_requests_waiting', help: 'Requests queued and not started (BullMQ wait + prioritized + delayed).', registers: [registry] });
export const requestsRunning = new Gauge({ name: 'strata_requests_running', help: 'Requests being processed (BullMQ active).', registers: [registry] });
export const queueDepth = new Gauge({ name: 'strata_queue_depth', help: 'Jobs in the request queue by BullMQ state.', labelNames: ['state'], registers: [registry] });
export const redisUp = new Gauge({ name: 'strata_redis_up', help: '1 when the queue\'s Redis answered the last scrape.', registers: [registry] });

/** The served pipeline's KV-slot admission (coordinator/session-gate.ts), read at each scrape; unset: none served yet. */
let kvSlotsSource: (() => { capacity: number | null; waiting: number }) | null = null;
export function watchKvSlots(source: typeof kvSlotsSource): void {
  kvSlotsSource = source;
}
export const requestsWaitingForSlot = new Gauge({
  name: 'strata_requests_waiting_for_kv_slot', help: 'Requests taken from the queue that wait at the coordinator because every KV slot of the pipeline is held.', registers: [registry],
  collect() {
    this.set(kvSlotsSource?.().waiting ?? 0);
  },
});
export const kvSlotCapacity = new Gauge({
  name: 'strata_kv_slots', help: 'Sessions the pipeline admits at once: the fewest KV slots any stage holds (absent: no limit).', registers: [registry],
  collect() {
    const capacity = kvSlotsSource?.().capacity;
    if (capacity == null) this.reset();
    else this.set(capacity);
  },
});

export const timeToFirstToken = new Histogram({
  name: 'strata_time_to_first_token_seconds', help: 'Enqueue to first generated token.', buckets: TTFT_BUCKETS, registers: [registry],
});
export const timePerOutputToken = new Histogram({
  name: 'strata_time_per_output_token_seconds', help: 'Interval between consecutive generated tokens of one sequence.', buckets: TPOT_BUCKETS, registers: [registry],
});
export const e2eLatency = new Histogram({
  name: 'strata_e2e_request_latency_seconds', help: 'Enqueue to result, queue time included.', labelNames: ['kind'], buckets: E2E_BUCKETS, registers: [registry],
});
export const promptTokens = new Counter({ name: 'strata_prompt_tokens_total', help: 'Prompt (input) tokens processed.', registers: [registry] });
export const generationTokens = new Counter({ name: 'strata_generation_tokens_total', help: 'Tokens generated.', registers: [registry] });
export const requestSuccess = new Counter({
  name: 'strata_request_success_total', help: 'Finished requests (per choice for completions) by finish reason.', labelNames: ['finish_reason'], registers: [registry],
});
export const requestFailure = new Counter({
  name: 'strata_request_failure_total', help: 'Failed job attempts by error code.', labelNames: ['code'], registers: [registry],
});
export const stageForward = new Histogram({
  name: 'strata_stage_forward_seconds', help: 'Time of one forward pass of one pipeline stage.', labelNames: ['stage'], buckets: TPOT_BUCKETS, registers: [registry],
});

export const stageHostDeviceBytes = new Counter({
  name: 'strata_stage_host_device_bytes_total', help: 'Bytes moved between host and device memory by stage runs (0 on the CPU EP), by direction; kv = of those, KV cache.',
  labelNames: ['stage', 'direction'], registers: [registry],
});

/** Host↔device traffic of one stage run, as its timing reports it. */
export function observeStageTransfer(stage: number | string, t: { host_to_device_bytes?: number; device_to_host_bytes?: number; kv_host_bytes?: number }): void {
  const s = String(stage);
  stageHostDeviceBytes.inc({ stage: s, direction: 'to_device' }, t.host_to_device_bytes ?? 0);
  stageHostDeviceBytes.inc({ stage: s, direction: 'to_host' }, t.device_to_host_bytes ?? 0);
  stageHostDeviceBytes.inc({ stage: s, direction: 'kv' }, t.kv_host_bytes ?? 0);
}

export const stageSteps = new Counter({
  name: 'strata_stage_steps_total', help: 'Steps run by each pipeline stage; ahead="true": answered from a run the worker made before the request arrived (run-ahead).',
  labelNames: ['stage', 'ahead'], registers: [registry],
});

/**
 * For the pipeline (local or remote) to call after each stage forward: `seconds` for `steps` steps (a chained
 * request's runs, summed), the first of them made ahead of its request when `ahead`. Each step is observed once, at
 * their mean, so the histogram counts steps whether or not they were chained.
 */
export function observeStageForward(stage: number | string, seconds: number, steps = 1, ahead = false): void {
  const s = String(stage);
  for (let i = 0; i < steps; i++) stageForward.observe({ stage: s }, seconds / steps);
  const early = ahead ? 1 : 0;
  if (early) stageSteps.inc({ stage: s, ahead: 'true' }, early);
  if (steps > early) stageSteps.inc({ stage: s, ahead: 'false' }, steps - early);
}

/** What `/metrics` reads from the queue at scrape time (all of it from Redis, so it can fail). */
export interface QueueMetricsSource {
  counts(): Promise<Record<string, number>>;
  /** BullMQ's own exposition (`Queue.exportPrometheusMetrics`), appended verbatim. */
  prometheus?(): Promise<string>;
}

/**
 * The Prometheus text for `GET /metrics`. Queue gauges are refreshed from Redis first; when Redis does not answer
 * the process metrics are still served (with `strata_redis_up 0`) — a scrape must not fail with the queue.
 */
export async function renderMetrics(source?: QueueMetricsSource): Promise<string> {
  let extra = '';
  if (source) {
    try {
      const c = await source.counts();
      for (const [state, n] of Object.entries(c)) queueDepth.set({ state }, n);
      requestsWaiting.set((c.waiting ?? c.wait ?? 0) + (c.prioritized ?? 0) + (c.delayed ?? 0));
      requestsRunning.set(c.active ?? 0);
      if (source.prometheus) extra = (await source.prometheus()).trim() + '\n';
      redisUp.set(1);
    } catch {
      redisUp.set(0);
    }
  }
  return (await registry.metrics()) + extra;
}

export const metricsContentType = registry.contentType;
