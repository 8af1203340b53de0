import type { DType, TensorData } from './tensor.ts';
import { BYTES_PER_ELEMENT } from './tensor.ts';
import type { DeviceTensor } from './executor.ts';
import { StrataError } from './errors.ts';

export interface SlotGeometry {
  /** Global indices of the stage's layers. */
  layers: number[];
  heads: number;
  headDim: number;
  /** Positions a slot holds: the model's context (n_positions). */
  maxLen: number;
  dtype: DType;
}

type KvTensor = TensorData | DeviceTensor;

/**
 * Host slots grow their layout in steps of this many positions. Attention's cost follows the past buffer it is
 * handed, not the session's length (its masked tail is computed too; GroupQueryAttention measured 0.09 ms per node
 * for a 32-position buffer, 0.24-0.48 for 1024, at length 16), so a slot is bound as [1, H, cap, hd] with cap just
 * above the session's length.
 */
export const CAP_STEP = 64;

/** Most slots a stage keeps, whatever the budget (bookkeeping stays small; a stage batches far fewer). */
export const MAX_SLOTS = 1024;

export const slotBytes = (g: SlotGeometry): number => g.layers.length * 2 * g.heads * g.maxLen * g.headDim * BYTES_PER_ELEMENT[g.dtype];

/** How many slots fit a byte budget; a budget below one slot is a configuration error, said at configure time. */
export function slotsForBudget(g: SlotGeometry, budgetBytes: number): number {
  const n = Math.min(MAX_SLOTS, Math.floor(budgetBytes / slotBytes(g)));
  if (n < 1) {
    throw new StrataError('kv_budget_exceeded', `one KV slot of this stage (${g.layers.length} layers × ${g.maxLen} positions) needs ${slotBytes(g)} bytes, more than the budget of ${budgetBytes}; raise --kv-budget-mb`, 'resource_exhausted');
  }
  return n;
}

/**
 * A stage's KV cache: per layer, key and value buffers [slots, H, max_len, head_dim], allocated once at configure
 * time; a session holds a slot, and each step's new K/V are written into it in place.
 *
 * On the host (CPU EP; CUDA, whose onnxruntime-node binding has no device tensors) each layer is one ArrayBuffer and
 * a slot is a view at its offset (the OS maps the pages on first touch), laid out for the session's length (reserve);
 * runs read it as a zero-copy input and the runtime writes the new K/V (model/slot-run.ts). On WebGPU each (slot, layer) is a device
 * tensor: created from zeros the first time the slot is used, then replaced by each run's present output, which
 * never leaves GPU memory. Idle batch rows bind one-position scratch buffers.
 */
export class KvSlots {
  readonly capacity: number;
  readonly slotBytes: number;
  private readonly free: number[] = [];
  private readonly host: Map<number, { key: ArrayBuffer; value: ArrayBuffer }> | null;
  private readonly device = new Map<string, { key: DeviceTensor; value: DeviceTensor }>();
  private readonly scratch = new Map<string, { key: KvTensor; value: KvTensor }>();
  private readonly views = new Map<string, { key: TensorData; value: TensorData }>();
  /** Host slots: the positions each slot is laid out for ([H, cap, hd] from the slot's start), see reserve(). */
  private readonly caps: number[];

  constructor(
    readonly geometry: SlotGeometry,
    budgetBytes: number,
    readonly resident: boolean,
  ) {
    this.slotBytes = slotBytes(geometry);
    this.capacity = slotsForBudget(geometry, budgetBytes);
    for (let s = this.capacity - 1; s >= 0; s--) this.free.push(s);
    this.caps = new Array<number>(this.capacity).fill(this.firstCap);
    if (resident) {
      this.host = null;
    } else {
      const perLayer = this.capacity * this.perSlotElements * BYTES_PER_ELEMENT[geometry.dtype];
      this.host = new Map(geometry.layers.map((l) => [l, { key: new ArrayBuffer(perLayer), value: new ArrayBuffer(perLayer) }]));
    }
  }

  private get perSlotElements(): number {
    const { heads, maxLen, headDim } = this.geometry;
    return heads * maxLen * headDim;
  }

  private get firstCap(): number {
    return Math.min(CAP_STEP, this.geometry.maxLen);
  }

  get inUse(): number {
    return this.capacity - this.free.length;
  }

  /** A free slot (lowest number first, so a freed slot is the next one taken), or null when every slot is held. */
  acquire(): number | null {
    return this.free.pop() ?? null;
  }

  release(slot: number): void {
    if (slot < 0 || slot >= this.capacity || this.free.includes(slot)) return;
    this.caps[slot] = this.firstCap;
    this.free.push(slot);
    this.free.sort((a, b) => b - a);
  }

  /** `slot`'s region of a layer buffer, `positions` per head: [1, H, positions, hd] from the region's start. */
  private view(buffer: ArrayBuffer, slot: number, positions = this.geometry.maxLen): TensorData {
    const { heads, headDim, dtype } = this.geometry;
    const n = heads * positions * headDim;
    const offset = slot * this.perSlotElements * BYTES_PER_ELEMENT[dtype];
    return { dtype, dims: [1, heads, positions, headDim], data: dtype === 'float16' ? new Uint16Array(buffer, offset, n) : new Float32Array(buffer, offset, n) };
  }

  /**
   * Host slots: lays `slot` out for at least `positions` (its past plus the run's new tokens), in CAP_STEP steps.
   * Each head's rows move apart in place, last head first (a head's new place never overlaps a later head's), so
   * growing costs one pass over the slot per CAP_STEP tokens.
   */
  reserve(slot: number, positions: number): void {
    const cap = this.caps[slot];
    if (!this.host || positions <= cap) return;
    const next = Math.min(this.geometry.maxLen, Math.ceil(positions / CAP_STEP) * CAP_STEP);
    const { heads, headDim } = this.geometry;
    for (const b of this.host.values()) {
      for (const buffer of [b.key, b.value]) {
        const data = this.view(buffer, slot).data;
        for (let h = heads - 1; h > 0; h--) data.copyWithin(h * next * headDim, h * cap * headDim, (h + 1) * cap * headDim);
      }
    }
    this.caps[slot] = next;
  }

  private zeros(positions: number): TensorData {
    const { heads, headDim, dtype } = this.geometry;
    const n = heads * positions * headDim;
    return { dtype, dims: [1, heads, positions, headDim], data: dtype === 'float16' ? new Uint16Array(n) : new Float32Array(n) };
  }

  /** What a run reads as past for `slot` at `layer` (on WebGPU also what the run's present replaces). */
  slot(layer: number, slot: number): { key: KvTensor; value: KvTensor } {
    if (this.host) {
      // The same view objects every run while the slot's layout holds: the executor keeps one ORT tensor per view.
      const k = `${layer}:${slot}`;
      const cap = this.caps[slot];
      let v = this.views.get(k);
      if (!v || v.key.dims[2] !== cap) {
        const b = this.host.get(layer)!;
        this.views.set(k, (v = { key: this.view(b.key, slot, cap), value: this.view(b.value, slot, cap) }));
      }
      return v;
    }
    // First use of this slot on the device: zeros go up once; from then on the slot lives in GPU memory.
    return this.device.get(`${layer}:${slot}`) ?? { key: this.zeros(this.geometry.maxLen), value: this.zeros(this.geometry.maxLen) };
  }

  /** An idle row's one-position scratch buffers (per layer and row: GQA writes its dummy token there). */
  idle(layer: number, row: number): { key: KvTensor; value: KvTensor } {
    const k = `${layer}:${row}`;
    let s = this.scratch.get(k);
    if (!s) this.scratch.set(k, (s = { key: this.zeros(1), value: this.zeros(1) }));
    return s;
  }

  /** WebGPU: the run's present tensors become the slot's (or the scratch's); the replaced ones are freed. */
  storeDevice(layer: number, target: { slot: number } | { row: number }, key: DeviceTensor, value: DeviceTensor): void {
    const map = 'slot' in target ? this.device : this.scratch;
    const k = `${layer}:${'slot' in target ? target.slot : target.row}`;
    const old = map.get(k);
    map.set(k, { key, value });
    for (const t of [old?.key, old?.value]) if (t && 'ort' in t && t !== key && t !== value) t.ort.dispose();
  }

  /** Frees every device buffer (stage reconfigured or closed). */
  dispose(): void {
    for (const m of [this.device, this.scratch]) {
      for (const { key, value } of m.values()) for (const t of [key, value]) if ('ort' in t) t.ort.dispose();
      m.clear();
    }
  }
}
