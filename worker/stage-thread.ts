import { parentPort } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { prepareStage } from '../model/stage-cache.ts';
import { StageSession } from '../model/executor.ts';
import { Stage } from '../model/stage.ts';
import { finishStep } from '../model/generation.ts';
import { StrataError } from '../model/errors.ts';
import type { TensorData } from '../model/tensor.ts';
import { KvStore } from './kv-store.ts';
import type { LoadedInfo, StepDone, ThreadReply, ThreadRequest } from './thread-protocol.ts';

// This thread owns the ORT session (whose run() blocks) and every session's KV cache; the main thread stays free
// for gRPC streams, keepalives and health checks.
let stage: Stage | null = null;
let kv: KvStore | null = null;
let queue: Promise<void> = Promise.resolve();

const port = parentPort!;
const reply = (msg: ThreadReply, transfer: ArrayBuffer[] = []) => {
  try {
    port.postMessage(msg, transfer);
  } catch {
    port.postMessage(msg); // buffers ORT owns cannot always be transferred: copy them
  }
};

async function handle(req: ThreadRequest): Promise<unknown> {
  switch (req.type) {
    case 'load': {
      const prepared = prepareStage(req.modelDir, req.range, { dtype: req.dtype, cacheDir: req.cacheDir, onProgress: (m) => reply({ id: -1, progress: m }) });
      const session = await StageSession.create(prepared.path, { threads: req.threads, device: req.device as never });
      if (stage) await stage.session.release();
      stage = new Stage(prepared.spec, prepared.range, session, req.dtype);
      kv = new KvStore(req.kvBudgetBytes, req.sessionTtlMs);
      const info: LoadedInfo = { fingerprint: prepared.fingerprint, paramBytes: prepared.paramBytes, provider: session.executionProvider, built: prepared.built };
      return info;
    }
    case 'step': {
      if (!stage || !kv) throw new StrataError('stage_not_configured', 'this worker has no block range yet; the coordinator must Configure it first', 'failed_precondition');
      const { input, sessionId } = req;
      const seq = input.positionIds.dims[1];
      const cache = stage.spec.causal ? kv.take(sessionId, input.attentionMask.dims[1] - seq, () => stage!.emptyCache(input.positionIds.dims[0])) : null;
      const t0 = performance.now();
      let out;
      try {
        out = await stage.step(input, cache);
      } catch (e) {
        if (cache) kv.drop(sessionId); // a failed step leaves the cache in an unknown state
        throw e;
      }
      const runMs = performance.now() - t0;
      if (cache) kv.commit(sessionId, cache);
      const done: StepDone = stage.isLast ? { result: finishStep(out, input), runMs } : { result: {}, hidden: out.hidden, runMs };
      return done;
    }
    case 'end':
      kv?.drop(req.sessionId);
      return null;
    case 'stats':
      return { sessions: kv?.sessions ?? 0, kvBytes: kv?.bytes ?? 0, expired: kv?.sweep() ?? [] };
  }
}

const buffersOf = (v: unknown): ArrayBuffer[] => {
  const done = v as StepDone | null;
  const ts = [done?.hidden, done?.result?.logits, done?.result?.hiddenMean].filter(Boolean) as TensorData[];
  return ts.map((t) => t.data.buffer as ArrayBuffer).filter((b, i, all) => all.indexOf(b) === i);
};

port.on('message', ({ id, req }: { id: number; req: ThreadRequest }) => {
  // One request at a time: KV take/commit must not interleave across a session's steps.
  queue = queue.then(async () => {
    try {
      const value = await handle(req);
      reply({ id, ok: true, value }, req.type === 'step' ? buffersOf(value) : []);
    } catch (e) {
      const err = e instanceof StrataError ? e : new StrataError('stage_internal', (e as Error).message, 'internal');
      reply({ id, ok: false, error: { code: err.code, message: err.message, kind: err.kind } });
    }
  });
});
