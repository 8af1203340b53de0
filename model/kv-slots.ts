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
 * time; a session holds a slot and attention writes each new token's K/V into it in place.
 *
 * On the host (CPU EP; CUDA, whose onnxruntime-node binding has no device tensors) each layer is one ArrayBuffer and
 * a slot is a view at its offset (the OS maps the pages on first touch). On WebGPU each (slot, layer) is a device
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

  constructor(
    readonly geometry: SlotGeometry,
    budgetBytes: number,
    readonly resident: boolean,
  ) {
    this.slotBytes = slotBytes(geometry);
    this.capacity = slotsForBudget(geometry, budgetBytes);
    for (let s = this.capacity - 1; s >= 0; s--) this.free.push(s);
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

  get inUse(): number {
    return this.capacity - this.free.length;
  }

  /** A free slot (lowest number first, so a freed slot is the next one taken), or null when every slot is held. */
  acquire(): number | null {
    return this.free.pop() ?? null;
  }

  release(slot: number): void {
    if (slot < 0 || slot >= this.capacity || this.free.includes(slot)) return;
    this.free.push(slot);
    this.free.sort((a, b) => b - a);
  }

  private view(buffer: ArrayBuffer, slot: number): TensorData {
    const { heads, maxLen, headDim, dtype } = this.geometry;
    const n = this.perSlotElements;
    const offset = slot * n * BYTES_PER_ELEMENT[dtype];
    return { dtype, dims: [1, heads, maxLen, headDim], data: dtype === 'float16' ? new Uint16Array(buffer, offset, n) : new Float32Array(buffer, offset, n) };
  }

  private zeros(positions: number): TensorData {
    const { heads, headDim, dtype } = this.geometry;
    const n = heads * positions * headDim;
    return { dtype, dims: [1, heads, positions, headDim], data: dtype === 'float16' ? new Uint16Array(n) : new Float32Array(n) };
  }

  /** What a run reads as past (and, on the host, writes as present) for `slot` at `layer`. */
  slot(layer: number, slot: number): { key: KvTensor; value: KvTensor } {
    if (this.host) {
      // The same view objects every run: the executor keeps one ORT tensor per view (no per-run wrapping).
      const k = `${layer}:${slot}`;
      let v = this.views.get(k);
      if (!v) {
        const b = this.host.get(layer)!;
        this.views.set(k, (v = { key: this.view(b.key, slot), value: this.view(b.value, slot) }));
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
