import { loadModelSpec, type ModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import type { WireInfo } from '../proto/messages.ts';
import { fromWire, type WireIdentity } from '../proto/wire.ts';
import type { ClientSecurity, ServerSecurity, StageHandler, StageServer } from '../transport/link.ts';
import { serveStage } from '../transport/registry.ts';
import { StageAssignment } from './assignment.ts';
import { StepRelay } from './relay.ts';
import { StageHost } from './stage-host.ts';
import { StageLoadState } from './load-state.ts';
import { loadToWire } from '../proto/load-codec.ts';
import type { LoadProgress } from '../model/progress.ts';
import type { WireConfigureRequest } from '../proto/messages.ts';
import { rangeLabel } from '../model/range.ts';
import { availableMemory, checkDtypeOnDevice, checkStageFits, RUNTIME_BASE_BYTES } from '../model/memory.ts';
import { parseStageDType } from '../model/dtype.ts';
import { parseDevice } from '../model/executor.ts';

export interface WorkerOptions {
  /** Address to serve on (port 0 = any free port); a `scheme://` prefix picks the transport (default gRPC). */
  listen: string;
  modelDir: string;
  device?: string;
  threads?: number;
  cacheDir?: string;
  kvBudgetBytes?: number;
  sessionTtlMs?: number;
  /** Capacity and relative speed this worker reports to the planner. */
  memoryBytes?: number;
  /** A stage that would need more is refused before loading (default: the host's available memory at configure time). */
  memoryLimitBytes?: number;
  speed?: number;
  stepTimeoutMs?: number;
  /** Decode steps of different sessions merged into one ORT run. */
  maxBatch?: number;
  /** A one-stage pipeline's worker runs each session's next decode step before it is asked (default true). */
  runAhead?: boolean;
  /** How long a chained request may run before it is answered (LoadRequest.chainMs). */
  chainMs?: number;
  /** The transport's security material (gRPC: transport/grpc/tls.ts's loadCredentials). */
  credentials?: { server: ServerSecurity; client: ClientSecurity };
  log?: (obj: object, msg: string) => void;
  /** Every change of the stage's load progress (building, loading, serving, failed). */
  onLoad?: (p: LoadProgress) => void;
}

/**
 * One pipeline stage as a server: receives a step (token ids or hidden states), runs its blocks on the stage
 * thread, forwards the hidden states straight to the next stage and relays that stage's reply back upstream. The
 * assignment (Configure, Handshake) and the step relay are their own units; the transport serves them.
 */
export class StageWorker {
  private readonly host: StageHost;
  private readonly assignment: StageAssignment;
  private readonly relay: StepRelay;
  private readonly server: StageServer;
  private readonly listenOn: string;
  private sweepTimer: NodeJS.Timeout | null = null;
  readonly loadState: StageLoadState;
  readonly spec: ModelSpec;
  readonly fingerprint: string;
  address = '';

  constructor(private readonly opts: WorkerOptions) {
    // Fail fast (before listening) on a bad model directory, with the model layer's typed message.
    this.spec = loadModelSpec(opts.modelDir);
    const ck = Checkpoint.open(opts.modelDir);
    this.fingerprint = ck.fingerprint();
    ck.close();
    this.loadState = new StageLoadState((p) => opts.onLoad?.(p));
    this.host = new StageHost((m, load) => (load ? this.loadState.building(load) : this.log({}, m)));
    const { server, listen } = serveStage(opts.listen, this.handler(), opts.credentials?.server);
    this.server = server;
    this.listenOn = listen;
    this.assignment = new StageAssignment({
      spec: this.spec, fingerprint: this.fingerprint, modelDir: opts.modelDir, host: this.host, security: opts.credentials?.client,
      load: {
        cacheDir: opts.cacheDir, threads: opts.threads, device: opts.device,
        kvBudgetBytes: opts.kvBudgetBytes ?? 2 * 1024 ** 3, sessionTtlMs: opts.sessionTtlMs ?? 10 * 60_000, maxBatch: opts.maxBatch ?? 8,
        runAhead: opts.runAhead, chainMs: opts.chainMs,
      },
      setServing: (serving) => this.server.setServing(serving),
      log: (obj, msg) => this.log(obj, msg),
    });
    this.relay = new StepRelay({ fingerprint: this.fingerprint, host: this.host, configured: () => this.assignment.configured(), stepTimeoutMs: opts.stepTimeoutMs ?? 120_000 });
  }

  /** The Stage service's calls, as the transport delivers them. */
  private handler(): StageHandler {
    return {
      info: () => this.info(),
      configure: (req) => this.configure(req),
      handshake: (req) => this.assignment.handshake(req),
      step: (req) => this.relay.step(req),
      stepBatch: (req) => this.relay.stepBatch(req),
      subscribe: (id, sink) => this.relay.subscribe(id, sink),
      endSession: (req) => this.endSession(req.session_id),
      ping: async (req) => ({ bytes: fromWire(req.payload, 'payload')?.data.byteLength ?? 0 }),
    };
  }

  /** Configure, with its outcome recorded in the load state (serving, or failed with the reason). */
  private async configure(req: WireConfigureRequest) {
    const range = rangeLabel({ first: req.first, last: req.last });
    try {
      this.checkFits(req);
      const reply = await this.assignment.configure(req);
      this.loadState.serving(range);
      return reply;
    } catch (e) {
      this.loadState.failed(range, (e as Error).message);
      throw e;
    }
  }

  /** Before loading a new range: refuse float16 on a CPU and a stage that does not fit this worker's memory. */
  private checkFits(req: WireConfigureRequest): void {
    const dtype = parseStageDType(req.dtype || 'float32', 'dtype');
    const a = this.assignment.current;
    if (a && a.range.first === req.first && a.range.last === req.last && a.dtype === dtype) return; // already loaded
    if (req.first < 0 || req.last > this.spec.blocks || req.first >= req.last) return; // the assignment's own check answers
    checkDtypeOnDevice(dtype, parseDevice(this.opts.device).kind);
    const limit = this.opts.memoryLimitBytes ?? this.opts.memoryBytes;
    // Reconfiguring frees the old stage: count what this process holds beyond its baseline as available too.
    const available = availableMemory() + (a ? Math.max(0, process.memoryUsage.rss() - RUNTIME_BASE_BYTES) : 0);
    checkStageFits(this.spec, { first: req.first, last: req.last }, dtype, {
      kvBudgetBytes: this.opts.kvBudgetBytes ?? 2 * 1024 ** 3, rows: this.opts.maxBatch, deviceKind: parseDevice(this.opts.device).kind, limitBytes: limit ?? available,
      where: limit ? `worker ${this.address} (--memory-limit-mb)` : `worker ${this.address} (the host's available memory)`,
    });
  }

  private log(obj: object, msg: string): void {
    this.opts.log?.(obj, msg);
  }

  async listen(): Promise<string> {
    this.address = await this.server.listen(this.listenOn);
    this.sweepTimer = setInterval(() => this.host.stats().then((s) => s.expired.length && this.log({ expired: s.expired.length }, 'expired idle sessions'), () => {}), 30_000);
    this.sweepTimer.unref();
    return this.address;
  }

  identity(): WireIdentity {
    return this.assignment.identity();
  }

  private async info(): Promise<WireInfo> {
    const a = this.assignment.current;
    const stats = a ? await this.host.stats() : { sessions: 0, kvBytes: 0, kvSlots: 0 };
    return {
      identity: this.identity(), configured: !!this.assignment.current, next_address: this.assignment.current?.next?.address ?? '', pid: process.pid,
      device: this.assignment.current?.device ?? this.opts.device ?? 'cpu', memory_bytes: this.opts.memoryBytes ?? this.opts.memoryLimitBytes ?? 0, speed: this.opts.speed ?? 1,
      sessions: stats.sessions, kv_bytes: stats.kvBytes, load: loadToWire(this.loadState.current),
      run_ahead: 'runAhead' in stats ? stats.runAhead ?? null : null, kv_slots: stats.kvSlots,
    };
  }

  private async endSession(sessionId: string): Promise<object> {
    await this.host.end(sessionId);
    await this.assignment.current?.next?.endSession(sessionId).catch(() => {});
    return {};
  }

  async close(): Promise<void> {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.loadState.close();
    await this.server.close();
    this.assignment.close();
    await this.host.close();
  }
}
