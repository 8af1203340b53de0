import type { ModelSpec } from '../model/config.ts';
import { StrataError } from '../model/errors.ts';
import { rangeLabel, type BlockRange } from '../model/range.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import type { WireInfo } from '../proto/messages.ts';
import { PROTOCOL_VERSION } from '../proto/wire.ts';
import type { ClientSecurity, StageLink } from '../transport/link.ts';
import { connectStage } from '../transport/registry.ts';
import { planPartition } from './planner.ts';

/** A configured pipeline: one worker per stage, in order, each with its block range. */
export interface StageSet {
  addresses: string[];
  links: StageLink[];
  infos: WireInfo[];
  ranges: BlockRange[];
}

export const NO_STAGES: StageSet = { addresses: [], links: [], infos: [], ranges: [] };

export interface ConfigureOptions {
  spec: ModelSpec;
  /** The checkpoint the coordinator serves: every worker must report the same. */
  fingerprint: string;
  dtype?: WeightDType;
  credentials?: ClientSecurity;
  log?: (obj: object, msg: string) => void;
}

/**
 * Connects to the workers at `addresses`, checks each speaks this protocol and serves this checkpoint, plans their
 * block ranges (unless `fixedRanges` gives them) and configures every worker with its range and next hop at once:
 * each stage handshakes its successor as soon as that one is ready. On failure every link it opened is closed.
 */
export async function configureStages(addresses: string[], o: ConfigureOptions, fixedRanges?: BlockRange[]): Promise<StageSet> {
  const { spec, fingerprint } = o;
  const links = addresses.map((a) => connectStage(a, o.credentials));
  try {
    const infos = await Promise.all(links.map((c) => c.info(30_000)));
    infos.forEach((info, i) => {
      if (info.identity.protocol !== PROTOCOL_VERSION) {
        throw new StrataError('protocol_mismatch', `worker ${addresses[i]} speaks stage protocol ${info.identity.protocol}, this coordinator ${PROTOCOL_VERSION}; run the same strata version everywhere`, 'failed_precondition');
      }
      if (info.identity.fingerprint !== fingerprint || info.identity.blocks !== spec.blocks) {
        throw new StrataError('checkpoint_mismatch', `worker ${addresses[i]} serves checkpoint ${info.identity.fingerprint} (${info.identity.blocks} blocks), the coordinator's model is ${fingerprint} (${spec.blocks} blocks); start every worker with the same --model`, 'failed_precondition');
      }
    });
    const dtype = o.dtype ?? 'float32';
    const ranges = fixedRanges ?? planPartition(spec, infos.map((info, i) => ({ id: addresses[i], memoryBytes: info.memory_bytes || Infinity, speed: info.speed || 1 })), { dtype }).stages.map((s) => s.range);
    if (ranges.length !== links.length) {
      throw new StrataError('plan_unusable', `the plan uses ${ranges.length} of ${links.length} workers; give every worker enough memory`, 'failed_precondition');
    }
    // All stages build/load at once; each waits for its successor before handshaking.
    await Promise.all(
      links.map((c, i) => {
        o.log?.({ stage: i, blocks: rangeLabel(ranges[i]), address: addresses[i] }, 'configuring stage');
        return c.configure({ first: ranges[i].first, last: ranges[i].last, dtype, next_address: addresses[i + 1] ?? '', fingerprint });
      }),
    );
    // Once loaded, each stage reports its KV slots (the coordinator admits no more sessions than the fewest).
    const loaded = await Promise.all(links.map((c) => c.info(30_000)));
    return { addresses, links, infos: loaded, ranges };
  } catch (e) {
    links.forEach((c) => c.close());
    throw e;
  }
}

/** True when the worker at `address` answers within 2 s. */
export async function answers(address: string, credentials?: ClientSecurity): Promise<boolean> {
  const c = connectStage(address, credentials);
  try {
    await c.info(2_000);
    return true;
  } catch {
    return false;
  } finally {
    c.close();
  }
}
