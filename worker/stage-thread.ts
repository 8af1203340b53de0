import { parentPort } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { prepareAndOpen } from '../model/stage-cache.ts';
import type { LoadProgress } from '../model/progress.ts';
import { openStageSession } from '../model/stage-open.ts';
import { openBatch1Graph } from '../model/batch1-graph.ts';
import { readSpans, readSpansInBackground, stageWeightSpans } from '../model/stage-prefetch.ts';
import { Stage, type KvCache } from '../model/stage.ts';
import { finishStep, greedyOnly, nextDecodeStep, type PipelineStep } from '../model/generation.ts';
import { StrataError, toErrorRecord } from '../model/errors.ts';
import type { TensorData } from '../model/tensor.ts';
import { KvStore } from './kv-store.ts';
import { pastLength, RunAhead } from './run-ahead.ts';
import { DEFAULT_CHAIN_MS, type LoadedInfo, type StepDone, type StepOutcome, type ThreadReply, type ThreadRequest } from './thread-protocol.ts';
import { activationDType } from '../model/dtype.ts';

// This thread owns the ORT session (whose run() blocks) and every session's KV cache; the main thread stays free
// for gRPC streams, keepalives and health checks.
let stage: Stage | null = null;
let kv: KvStore | null = null;
let maxBatch = 1;
/** A one-stage pipeline runs each session's next decode step ahead of its request (worker/run-ahead.ts). */
let ahead: RunAhead<StepDone> | null = null;

/** A 'steps' message: its items run as one batch (the coordinator formed it) and are answered together. */
interface Group {
  id: number;
  outcomes: StepOutcome[];
  left: number;
}

interface Pending {
  id: number;
  req: ThreadRequest;
  group?: Group;
  index?: number;
  /** The request asked for several decode steps in a row (PipelineStep.steps): the steps run so far. */
  chain?: Chain;
}

/**
 * A chained request on a one-stage pipeline: after each step the next one (the chosen token, one position on) is
 * queued like any step, so it batches with its group's other chains and a prefill that arrives meanwhile runs between
 * them. One reply carries every token, so the coordinator's and this thread's per-request work is paid once per chain.
 */
interface Chain {
  wanted: number;
  stop: number[];
  /** The generation's last request (StepRequest.final_request). */
  final: boolean;
  done: StepDone[];
  /** When its first step's run began (unix ms, as StepDone.startUnixMs): the chain's time budget counts from there. */
  started: number;
}

const pending: Pending[] = [];
let busy = false;
/** LoadRequest.chainMs: how long a chain may run before it answers (see there). */
let chainMs = DEFAULT_CHAIN_MS;

const port = parentPort!;
const reply = (msg: ThreadReply, transfer: ArrayBuffer[] = []) => {
  try {
    port.postMessage(msg, transfer);
  } catch {
    port.postMessage(msg); // buffers ORT owns cannot always be transferred: copy them
  }
};

/** Answers one request, or records one item of a group and answers the group when its last item is done. */
function settle(p: Pending, outcome: { ok: true; value: unknown } | { ok: false; error: unknown }): void {
  const g = p.group;
  if (!g) {
    if (outcome.ok) reply({ id: p.id, ok: true, value: outcome.value }, p.req.type === 'step' ? buffersOf(outcome.value) : []);
    else reply({ id: p.id, ok: false, error: toErrorRecord(outcome.error) });
    return;
  }
  g.outcomes[p.index!] = outcome.ok ? { ok: true, done: outcome.value as StepDone } : { ok: false, error: toErrorRecord(outcome.error) };
  if (--g.left === 0) reply({ id: g.id, ok: true, value: g.outcomes }, [...new Set(g.outcomes.flatMap((o) => (o.ok ? buffersOf(o.done) : [])))]);
}

function configured(): { stage: Stage; kv: KvStore } {
  if (!stage || !kv) throw new StrataError('stage_not_configured', 'this worker has no block range yet; the coordinator must Configure it first', 'failed_precondition');
  return { stage, kv };
}

/** A decode step (one row, one token, KV cache already there) can share an ORT run with other sessions' steps. */
function batchable(p: Pending): boolean {
  if (p.req.type !== 'step' || !stage?.spec.causal || !kv) return false;
  const { input } = p.req;
  return input.positionIds.dims[0] === 1 && input.positionIds.dims[1] === 1 && input.output !== 'hidden_mean' && pastLength(input) > 0 && kv.has(p.req.sessionId);
}

type StepRequest = { sessionId: string; input: PipelineStep };

async function handle(req: Exclude<ThreadRequest, { type: 'step' }>): Promise<unknown> {
  switch (req.type) {
    case 'load': {
      maxBatch = Math.max(1, req.maxBatch ?? 1);
      chainMs = req.chainMs ?? DEFAULT_CHAIN_MS;
      // The build quantizes on the threads this worker was given (its ORT threads), not on its neighbours' cores.
      const prepare = { dtype: req.dtype, device: req.device, cacheDir: req.cacheDir, rows: maxBatch, threads: req.threads, onProgress: (m: string, load?: LoadProgress) => reply({ id: -1, progress: m, load }) };
      const { prepared, opened: session } = await prepareAndOpen(req.modelDir, req.range, prepare, (p) =>
        // The stage's weights read once, in order, on a thread of their own while ORT opens them: ORT then loads (and
        // prepacks) from the page cache, and the disk works while ORT packs. A cold BioMedLM stage (5 GB) took 29.9 s
        // to create, 7.0 + 10.7 s read first. Without prepacking ORT only maps the weights, and this read makes
        // serving mean they are in memory. STRATA_PREFETCH=0: no read; =first: the whole read before ORT starts.
        openStageSession(p.path, req.dtype, { threads: req.threads, device: req.device }, prepare.onProgress, (graph) => {
          if (process.env.STRATA_PREFETCH === '0') return;
          const spans = stageWeightSpans(graph); // a graph that does not parse fails here, as in ORT
          if (process.env.STRATA_PREFETCH === 'first') return void readSpans(spans);
          return readSpansInBackground(spans);
        }));
      const batch1 = await openBatch1Graph(req.modelDir, prepared, prepare, (p, log) => openStageSession(p.path, req.dtype, { threads: req.threads, device: req.device }, log));
      if (stage) await stage.close();
      stage = new Stage(prepared.spec, prepared.range, session, activationDType(req.dtype), { kvBudgetBytes: req.kvBudgetBytes, rows: maxBatch, batch1: batch1 ?? undefined });
      kv = new KvStore(stage, req.sessionTtlMs);
      const store = kv;
      ahead = req.runAhead !== false && stage.isFirst && stage.isLast && stage.spec.causal ? new RunAhead((id, past) => store.rewind(id, past), stage.spec.maxPositions) : null;
      const info: LoadedInfo = { fingerprint: prepared.fingerprint, paramBytes: prepared.paramBytes, provider: session.executionProvider, built: prepared.built, kvSlots: stage.slots?.capacity ?? 0 };
      return info;
    }
    case 'steps':
      throw new StrataError('stage_internal', 'a steps message is split into its items on arrival', 'internal');
    case 'end':
      kv?.drop(req.sessionId);
      ahead?.forget(req.sessionId);
      return null;
    case 'stats': {
      const expired = kv?.sweep() ?? [];
      for (const id of expired) ahead?.forget(id);
      return { sessions: kv?.sessions ?? 0, kvBytes: kv?.bytes ?? 0, expired, kvSlots: kv?.capacity ?? 0, transferred: stage?.session.transferred, runAhead: ahead?.counts };
    }
  }
}

/** Runs one step alone, or several sessions' decode steps as one batched run. */
async function runSteps(steps: StepRequest[]): Promise<StepDone[]> {
  const { stage, kv } = configured();
  const caches = steps.map(({ sessionId, input }) => (stage.spec.causal ? kv.take(sessionId, pastLength(input), input.positionIds.dims[0]) : null));
  const startUnixMs = performance.timeOrigin + performance.now();
  const t0 = performance.now();
  let outs;
  try {
    // A batch of greedy steps needs only the graph's argmax from the last stage, not its logits.
    const fetch = steps.every((s) => greedyOnly(s.input)) ? 'greedy' : 'all';
    outs = steps.length === 1 ? [await stage.step(steps[0].input, caches[0], fetch)] : await stage.stepBatch(steps.map((s) => s.input), caches as KvCache[], fetch);
  } catch (e) {
    // A failed step leaves the caches in an unknown state.
    steps.forEach((s) => (kv.drop(s.sessionId), ahead?.forget(s.sessionId)));
    throw e;
  }
  const { hostToDevice, deviceToHost, kvBytes } = stage.lastTransfer;
  const timing = { runMs: performance.now() - t0, startUnixMs, batch: steps.length, transfer: { hostToDevice, deviceToHost, kvBytes } };
  return steps.map((s, i) => {
    if (caches[i]) kv.commit(s.sessionId);
    return stage.isLast ? { result: finishStep(outs[i], s.input), ...timing } : { result: {}, hidden: outs[i].hidden, ...timing };
  });
}

const buffersOf = (v: unknown): ArrayBuffer[] => {
  const done = v as StepDone | null;
  const ts = [done?.hidden, done?.result?.logits, done?.result?.hiddenMean].filter(Boolean) as TensorData[];
  return ts.map((t) => t.data.buffer as ArrayBuffer).filter((b, i, all) => all.indexOf(b) === i);
};

const sessionOf = (p: Pending) => (p.req as { sessionId?: string }).sessionId ?? '';

/**
 * Continuous batching: while a run is in progress, requests queue; the next run takes the oldest request and, when
 * it is a decode step, every other queued decode step of a different session (up to --max-batch). Sessions join
 * and leave between runs; prefill and other steps run alone, in arrival order. The items of one StepBatch message
 * run together and are never merged with other messages' steps: the coordinator splits its sessions into groups so
 * that the stages of a pipeline work on different groups at once, and merging here would undo that.
 */
async function pump(): Promise<void> {
  if (busy) return;
  if (pending.length === 0) return runAhead();
  busy = true;
  const head = pending.shift()!;
  const group = [head];
  if (batchable(head)) {
    const sessions = new Set([sessionOf(head)]);
    for (let i = 0; i < pending.length && group.length < maxBatch; ) {
      const p = pending[i];
      if (p.group === head.group && batchable(p) && !sessions.has(sessionOf(p))) {
        sessions.add(sessionOf(p));
        group.push(...pending.splice(i, 1));
      } else i++;
    }
  }
  // Steps already run ahead are answered now; the rest run as one batch.
  const toRun = head.req.type === 'step' ? group.filter((p) => !answerAhead(p)) : group;
  try {
    if (head.req.type !== 'step') {
      settle(head, { ok: true, value: await handle(head.req) });
    } else if (toRun.length > 0) {
      const done = await runSteps(toRun.map((p) => p.req as StepRequest));
      toRun.forEach((p, i) => answer(p, done[i]));
    }
  } catch (e) {
    toRun.forEach((p) => settle(p, { ok: false, error: e }));
  } finally {
    idle();
  }
}

/** The run is over: let messages that arrived during it land in `pending` before choosing the next batch. */
function idle(): void {
  busy = false;
  setImmediate(() => void pump());
}

function answer(p: Pending, done: StepDone): void {
  const { sessionId, input } = p.req as StepRequest;
  const wanted = p.chain?.wanted ?? input.steps ?? 1;
  const stop = p.chain?.stop ?? input.stopTokens ?? [];
  const token = done.result.tokens?.length === 1 ? done.result.tokens[0] : undefined;
  const final = p.chain?.final ?? input.finalRequest === true;
  const stopped = token !== undefined && stop.includes(token);
  const complete = (p.chain?.done.length ?? 0) + 1 >= wanted; // the request's steps end with this one
  const started = p.chain?.started ?? done.startUnixMs;
  const spent = performance.timeOrigin + performance.now() - started >= chainMs; // … or its time does
  const last = stopped || complete || spent;
  // No request follows a stop token or the generation's last request: nothing to run ahead.
  ahead?.answered(sessionId, input, done.result, !(stopped || (complete && final)));
  if (wanted <= 1 || !stage?.isFirst || !stage.isLast) return settle(p, { ok: true, value: done });
  const chain = p.chain ?? { wanted, stop, final, done: [], started };
  chain.done.push(done);
  const next = token !== undefined && !last ? nextDecodeStep(input, token, stage.spec.maxPositions) : null;
  if (next) pending.push({ ...p, req: { type: 'step', sessionId, input: next }, chain });
  else settle(p, { ok: true, value: chain.done.length === 1 ? done : chained(chain.done) }); // one step: its reply as it is (logits too)
}

/** A chain's steps as one answer: every token and logprob row in order, the runs' times and transfers summed. */
function chained(done: StepDone[]): StepDone {
  const sum = (f: (d: StepDone) => number) => done.reduce((n, d) => n + f(d), 0);
  const [first] = done;
  return {
    result: { tokens: done.flatMap((d) => d.result.tokens ?? []), logprobs: first.result.logprobs && [done.flatMap((d) => d.result.logprobs?.[0] ?? [])] },
    runMs: sum((d) => d.runMs),
    startUnixMs: first.startUnixMs,
    batch: first.batch,
    transfer: first.transfer && { hostToDevice: sum((d) => d.transfer?.hostToDevice ?? 0), deviceToHost: sum((d) => d.transfer?.deviceToHost ?? 0), kvBytes: sum((d) => d.transfer?.kvBytes ?? 0) },
    ahead: first.ahead,
    steps: done.length,
  };
}

/** Answers a step from the run made ahead of it, when that run had exactly its inputs. */
function answerAhead(p: Pending): boolean {
  const { sessionId, input } = p.req as StepRequest;
  const done = ahead?.claim(sessionId, input, (length) => kv?.lengthOf(sessionId) === length);
  if (!done) return false;
  answer(p, { ...done, ahead: true });
  return true;
}

/** Nothing waits: run the predicted next steps (one batch), to be claimed when their requests arrive. */
async function runAhead(): Promise<void> {
  const steps = ahead && kv ? ahead.take(maxBatch, (id) => kv!.lengthOf(id)) : [];
  if (steps.length === 0) return;
  busy = true;
  try {
    ahead!.store(steps, await runSteps(steps));
  } catch {
    // runSteps dropped those sessions' caches: their steps, when they come, get session_unknown and are replayed.
  }
  idle();
}

port.on('message', (msg: { id: number; req: ThreadRequest }) => {
  const { req } = msg;
  if (req.type === 'steps') {
    const group: Group = { id: msg.id, outcomes: new Array(req.steps.length), left: req.steps.length };
    if (group.left === 0) return reply({ id: msg.id, ok: true, value: [] });
    req.steps.forEach((s, index) => pending.push({ id: msg.id, req: { type: 'step', sessionId: s.sessionId, input: s.input }, group, index }));
  } else {
    pending.push(msg);
  }
  void pump();
});
