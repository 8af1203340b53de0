import type { ModelSpec } from '../model/config.ts';
import { isStrataError, StrataError } from '../model/errors.ts';
import { checkRange, rangeLabel, type BlockRange } from '../model/range.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import { parseStageDType } from '../model/dtype.ts';
import type { WireConfigureRequest, WireIdentityReply } from '../proto/messages.ts';
import { PROTOCOL_VERSION, sameModel, type WireIdentity } from '../proto/wire.ts';
import type { ClientSecurity, StageLink } from '../transport/link.ts';
import { connectStage } from '../transport/registry.ts';
import type { StageHost } from './stage-host.ts';

/** The block range a coordinator gave this worker, and the link to the stage after it (null when it ends the model). */
export interface Assignment {
  range: BlockRange;
  dtype: WeightDType;
  next: StageLink | null;
  identity: WireIdentity;
  device: string;
}

export interface AssignmentOptions {
  spec: ModelSpec;
  fingerprint: string;
  modelDir: string;
  host: StageHost;
  /** What the stage thread loads besides the range (threads, device, KV budget, ...). */
  load: { cacheDir?: string; threads?: number; device?: string; kvBudgetBytes: number; sessionTtlMs: number; maxBatch: number; runAhead?: boolean; chainMs?: number };
  security?: ClientSecurity;
  /** The worker's health: NOT_SERVING while (re)configuring, SERVING once the range is loaded and the next stage connected. */
  setServing(serving: boolean): void;
  log(obj: object, msg: string): void;
}

/**
 * A worker's stage assignment: Configure (load a block range, connect and verify the next stage) and Handshake (a
 * previous stage introducing itself). Configurations run one after another; until one completes, steps are refused.
 */
export class StageAssignment {
  current: Assignment | null = null;
  private configuring: Promise<unknown> = Promise.resolve();

  constructor(private readonly o: AssignmentOptions) {}

  identity(a: Pick<Assignment, 'range' | 'dtype'> | null = this.current): WireIdentity {
    return {
      fingerprint: this.o.fingerprint, first: a?.range.first ?? 0, last: a?.range.last ?? 0, dtype: a?.dtype ?? '',
      protocol: PROTOCOL_VERSION, blocks: this.o.spec.blocks, model_type: this.o.spec.modelType,
    };
  }

  /** The assignment, or stage_not_configured (the coordinator retries after its reconfiguration). */
  configured(): Assignment {
    if (!this.current) throw new StrataError('stage_not_configured', 'this worker has no block range yet', 'failed_precondition');
    return this.current;
  }

  /** Loads a block range (building its graph if needed) and connects to the next stage, verifying it. */
  async configure(req: WireConfigureRequest): Promise<WireIdentityReply> {
    const { fingerprint, spec } = this.o;
    if (req.fingerprint && req.fingerprint !== fingerprint) {
      throw new StrataError('checkpoint_mismatch', `this worker serves checkpoint ${fingerprint} (${this.o.modelDir}) but the coordinator expects ${req.fingerprint}; start it with the same --model`, 'failed_precondition');
    }
    const range = checkRange({ first: req.first, last: req.last }, spec.blocks);
    const dtype: WeightDType = parseStageDType(req.dtype || 'float32', 'dtype');
    const run = () => this.apply(range, dtype, req.next_address);
    const p = this.configuring.then(run, run);
    this.configuring = p.catch(() => {});
    return p;
  }

  private async apply(range: BlockRange, dtype: WeightDType, nextAddress: string): Promise<WireIdentityReply> {
    const prev = this.current;
    const same = prev && prev.range.first === range.first && prev.range.last === range.last && prev.dtype === dtype;
    // The same assignment again (a second coordinator, a recovery that kept this stage): nothing to change, and
    // steps in flight keep their connection to the next stage.
    if (same && (prev.next?.address ?? '') === nextAddress) return { identity: this.identity() };
    this.o.setServing(false);
    let device = prev?.device ?? 'cpu';
    // Until the new range is loaded and its next stage connected, steps are refused (stage_not_configured: the
    // coordinator retries them after its reconfiguration). A step accepted under the old assignment must not be
    // answered as if this stage ended the model because its next stage is not connected yet.
    prev?.next?.close();
    this.current = null;
    if (!same) device = await this.load(range, dtype);
    const assignment: Assignment = { range, dtype, next: null, identity: this.identity({ range, dtype }), device };
    if (range.last < this.o.spec.blocks) {
      if (!nextAddress) throw new StrataError('next_stage_missing', `blocks ${rangeLabel(range)} do not end the model (${this.o.spec.blocks} blocks): a next_address is required`);
      const next = connectStage(nextAddress, this.o.security);
      const theirs = await this.handshakeWhenReady(next, assignment.identity);
      if (theirs.first !== range.last) {
        next.close();
        throw new StrataError('peer_mismatch', `next stage ${nextAddress} starts at block ${theirs.first}, but this stage ends at ${range.last}`, 'failed_precondition');
      }
      assignment.next = next;
    }
    this.current = assignment;
    this.o.setServing(true);
    return { identity: this.identity() };
  }

  /** Loads the range on the stage thread; resolves with the execution provider it runs on. */
  private async load(range: BlockRange, dtype: WeightDType): Promise<string> {
    this.o.log({ range: rangeLabel(range), dtype }, 'loading stage');
    const loaded = await this.o.host.load({ modelDir: this.o.modelDir, range, dtype, ...this.o.load });
    this.o.log({ range: rangeLabel(range), paramBytes: loaded.paramBytes, provider: loaded.provider, cached: !loaded.built }, 'stage loaded');
    return loaded.provider;
  }

  /** Stages are configured in parallel: the next one may still be loading, so wait for it (not for a mismatch). */
  private async handshakeWhenReady(next: StageLink, mine: WireIdentity): Promise<WireIdentity> {
    const started = Date.now();
    for (let delay = 100; ; delay = Math.min(delay * 2, 2_000)) {
      try {
        return (await next.handshake(mine)).identity;
      } catch (e) {
        // Still loading (a stage build may take many minutes), briefly unreachable, or still holding its previous
        // range (its own Configure may not have arrived yet): wait. A next stage that stays unreachable fails this
        // configure soon, so a recovery can re-plan instead of hanging.
        const waited = Date.now() - started;
        const loading = isStrataError(e) && ((e.code === 'stage_not_configured' && waited < 30 * 60_000) || (e.kind === 'unavailable' && waited < 30_000));
        const stale = isStrataError(e) && e.code === 'peer_range_mismatch' && waited < 15_000;
        if (!loading && !stale) {
          next.close();
          throw e;
        }
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  /** The previous stage introduces itself: it must be the same checkpoint and dtype, and end where this stage starts. */
  async handshake(req: { peer: WireIdentity }): Promise<WireIdentityReply> {
    const mine = this.identity();
    if (!this.current) throw new StrataError('stage_not_configured', 'this worker has no block range yet; configure it before its predecessor', 'failed_precondition');
    const why = sameModel(req.peer, mine);
    if (why) throw new StrataError('peer_mismatch', `refusing a previous stage built from a different model (${why})`, 'failed_precondition');
    if (req.peer.last !== mine.first) throw new StrataError('peer_range_mismatch', `previous stage ends at block ${req.peer.last} but this stage starts at ${mine.first}`, 'failed_precondition');
    return { identity: mine };
  }

  close(): void {
    this.current?.next?.close();
  }
}
