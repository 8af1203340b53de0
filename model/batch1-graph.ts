import { parseDevice, type StageSession } from './executor.ts';
import { DEFAULT_SLOT_ROWS } from './graph/slot-attention.ts';
import { holdsBatch1Graph } from './memory.ts';
import { rangeLabel } from './range.ts';
import { prepareAndOpen, type PrepareOptions, type PreparedStage } from './stage-cache.ts';

/**
 * A one-row stage graph beside the batch graph, for the runs of one row (batch-1 decode, every prefill chunk).
 *
 * A graph of R > 1 rows runs a batch of one through an `If` in every layer (model/graph/slot-attention.ts): that keeps
 * one packed copy of the weights for batch 1 and batch R, but ORT executes an If's branch as a subgraph, and that
 * cost ~70 µs a layer: a GPT-2-small int8 step took 7.8–8.1 ms in the 8-row graph against 7.0–7.3 ms in a one-row
 * graph (in process, 2026-12-06, Intel Xeon host; bench/RESULTS.md), ~1 ms on an AMD EPYC host. The cost is per
 * layer, not per weight, so it counts where layers are small: there a stage also holds a one-row session (its own
 * copy of the packed weights) and runs every one-row step in it. The two graphs compute row 0 with the same nodes,
 * so a session's tokens do not depend on which graph ran it (test/batch1-graph.test.ts). Which stages hold one
 * (STRATA_BATCH1_GRAPH): model/memory.ts, holdsBatch1Graph, the same decision the memory model counts.
 */
/**
 * Opens the one-row graph of a stage whose batch graph `main` is open, when holdsBatch1Graph says so:
 * built or taken from the stage cache like any stage graph (its own cache entry, rows 1). Its build reports text
 * only: the stage's load state stays at loading until both sessions are open. It only ever saves time, so a one-row
 * graph that cannot be built or opened (a full disk, say) is said and left out: the batch graph runs every batch.
 */
export async function openBatch1Graph(
  modelDir: string,
  main: PreparedStage,
  prepare: PrepareOptions,
  open: (p: PreparedStage, log: (m: string) => void) => Promise<StageSession>,
): Promise<StageSession | null> {
  if (!holdsBatch1Graph(main.spec, main.range, main.dtype, prepare.rows ?? DEFAULT_SLOT_ROWS, parseDevice(prepare.device).kind)) return null;
  const say = (m: string) => prepare.onProgress?.(`one-row graph for batch 1: ${m}`);
  say(`stage ${rangeLabel(main.range)} also holds a one-row graph for its runs of one row (STRATA_BATCH1_GRAPH=off: none)`);
  try {
    return (await prepareAndOpen(modelDir, main.range, { ...prepare, rows: 1, onProgress: say }, (p) => open(p, say))).opened;
  } catch (e) {
    say(`not used (${(e as Error).message.split('\n')[0]}): the ${prepare.rows ?? DEFAULT_SLOT_ROWS}-row graph runs batch 1 too`);
    return null;
  }
}
