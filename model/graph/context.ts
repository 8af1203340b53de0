import type { ModelSpec } from '../config.ts';
import { float32ToFloat16, storedAsFloat32, type StageDType } from '../dtype.ts';
import { ElemType, GraphBuilder, type ElemTypeId, type WeightFileSpan } from '../onnx-builder.ts';
import type { WeightRef } from '../families/family.ts';
import { IO } from './io.ts';
import type { AttentionMask } from './mask.ts';
import type { RotaryInputs } from './rotary.ts';
import type { QuantPool } from '../quant-kernels.ts';

/** float32 | float16 | int8 | int4 (int8/int4: weight-only quantized linear layers and token table, float32 activations). */
export type WeightDType = StageDType;

/** Where a stage's weights come from: a checkpoint, or synthetic values for shape checks and benches. */
export interface WeightSource {
  readFloat32(key: string, shape: number[]): Float32Array;
  /** The stored bytes and their dtype, when the source has them (a checkpoint): copied through when no conversion is needed. */
  readRaw?(key: string, shape: number[]): { dtype: string; bytes: Uint8Array };
  /** Where the stored bytes are (file, offset), when the source is files on disk: linked, not copied, when the dtype matches. */
  locate?(key: string, shape: number[]): { dtype: string; file: string; offset: number };
  /** Part of the stored bytes, from byte `from`, into `into`: lets the quantizer stream a tensor (see locate for its dtype). */
  readInto?(key: string, shape: number[], from: number, into: Uint8Array): void;
  /** Prefix of the HF keys (`transformer.`, `distilbert.`, or ''). */
  readonly prefix: string;
}

export interface StageGraphOptions {
  dtype: WeightDType;
  /**
   * Use ONNX Runtime's fused contrib kernels (com.microsoft MultiHeadAttention, SkipLayerNormalization) instead of
   * the op-by-op attention and residual+norm. Same function, checked against the same fixtures.
   */
  fused?: boolean;
  /** int8/int4 stages: quantization block size along the input features (default 32, model/quantize.ts). */
  quantBlockSize?: number;
  /** int8/int4 stages: helper threads that quantize beside the builder (model/quant-kernels.ts); one thread without. */
  quantPool?: QuantPool | null;
  /** Decoders: batch rows the graph serves at once, one KV-slot attention per row (graph/slot-attention.ts). */
  rows?: number;
  /**
   * Decoders: how a step's K/V reach the slots. In place (WebGPU, slots resident on the device): GroupQueryAttention
   * writes them into the past buffer, which is also the present output. Otherwise (host slots: CPU, CUDA) the graph
   * outputs only the new K/V and the runtime copies them into the slot: onnxruntime-node 1.30 copies every output of
   * a run into a fresh ArrayBuffer, so a whole-slot present output would cost a slot-sized copy per row and layer.
   */
  kvInPlace?: boolean;
}

/** What every graph piece of a stage builds against: the builder, the spec, dtypes, weights and shared inputs. */
export interface StageContext {
  readonly g: GraphBuilder;
  readonly spec: ModelSpec;
  readonly opts: StageGraphOptions;
  /** fp16 stage: activations and matrices in float16, norms and softmax in float32. */
  readonly half: boolean;
  /** Activation element type. */
  readonly ACT: ElemTypeId;
  readonly F32: ElemTypeId;
  /** A checkpoint weight as an initializer in the activation dtype. */
  W(ref: WeightRef): string;
  /** A checkpoint weight kept float32 (layer-norm parameters: norms are computed in fp32 even in fp16 stages). */
  W32(ref: WeightRef): string;
  /** A checkpoint weight's values as float32, read when called (the quantizer reads one tensor at a time). */
  read(ref: WeightRef): Float32Array;
  /** A checkpoint weight's stored bytes, when the source has them (the int8 quantizer reads F16 without widening it). */
  readRaw(ref: WeightRef): { dtype: string; bytes: Uint8Array } | undefined;
  /** A weight's stored dtype and a reader of its bytes in pieces, when the source is files on disk (streamed quantization). */
  stored(ref: WeightRef): { dtype: string; readInto: (from: number, into: Uint8Array) => void } | undefined;
  readonly positionIds: string;
  readonly attentionMask: string;
  /** [B, T, D] and [B, T, H, head_dim] as shape tensors. */
  readonly shapeBTD: string;
  readonly shapeBTHd: string;
}

/** A block's context: the stage's plus what every block shares (the mask; rotary tables for rotary models). */
export interface BlockContext extends StageContext {
  readonly mask: AttentionMask;
  readonly rotary: RotaryInputs | null;
}

/** Declares the inputs every stage has (position ids, attention mask) and the shapes derived from them. */
export function stageContext(g: GraphBuilder, spec: ModelSpec, source: WeightSource, opts: StageGraphOptions): StageContext {
  const half = opts.dtype === 'float16';
  const ACT = half ? ElemType.FLOAT16 : ElemType.FLOAT;
  const F32 = ElemType.FLOAT;
  const readBytes = (ref: WeightRef, keepF32 = false): Uint8Array => {
    const raw = source.readRaw?.(ref.key, ref.shape);
    if (raw && raw.dtype === (half && !keepF32 ? 'F16' : 'F32')) return raw.bytes;
    const w = raw ? storedAsFloat32(raw.bytes, raw.dtype as 'F32' | 'F16' | 'BF16') : source.readFloat32(ref.key, ref.shape);
    const out = half && !keepF32 ? float32ToFloat16(w) : w;
    return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  };
  // The stored bytes' place when they are already what the graph needs (the sink may link them instead of copying).
  const at = (ref: WeightRef, keepF32 = false) => (): WeightFileSpan | undefined => {
    const l = source.locate?.(ref.key, ref.shape);
    return l && l.dtype === (half && !keepF32 ? 'F16' : 'F32') ? l : undefined;
  };
  const positionIds = g.input(IO.positionIds, ElemType.INT64, ['batch', 'seq']);
  const attentionMask = g.input(IO.attentionMask, ElemType.INT64, ['batch', spec.causal ? 'total_seq' : 'seq']);
  const bt = g.o('Shape', [positionIds]); // [B, T]
  return {
    g, spec, opts, half, ACT, F32, positionIds, attentionMask,
    W: (ref) => g.weight(ref.key, ACT, ref.shape, () => readBytes(ref), at(ref)),
    W32: (ref) => g.weight(ref.key, F32, ref.shape, () => readBytes(ref, true), at(ref, true)),
    read: (ref) => source.readFloat32(ref.key, ref.shape),
    readRaw: (ref) => source.readRaw?.(ref.key, ref.shape),
    stored: (ref) => {
      const l = source.readInto && source.locate?.(ref.key, ref.shape);
      return l ? { dtype: l.dtype, readInto: (from, into) => source.readInto!(ref.key, ref.shape, from, into) } : undefined;
    },
    shapeBTD: g.o('Concat', [bt, g.constInt64([spec.dModel])], { axis: 0 }),
    shapeBTHd: g.o('Concat', [bt, g.constInt64([spec.heads, spec.headDim])], { axis: 0 }),
  };
}
