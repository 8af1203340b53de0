import onnxProto from 'onnx-proto';
import { closeSync, existsSync, linkSync, openSync, statSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { f32ToF16 as f16Bits } from './dtype.ts';

// onnx-proto ships protobufjs-generated ONNX messages (IR 8 schema); we never hand-copy the schema.
export const { onnx } = onnxProto;
export const ElemType = onnx.TensorProto.DataType;
export type ElemTypeId = number;
type Attr = number | number[] | string | { float: number } | { floats: number[] };

/** Where initializer bytes go: a side file (external data, no 2 GB protobuf limit) or nowhere (size accounting). */
export interface WeightSink {
  /**
   * Records a tensor of `length` bytes (produced by `bytes` only if the sink stores them, whole or as consecutive
   * pieces, each written before the next is asked for); returns its place, in `location` when not the sink's own file.
   * `at`: the same bytes already lie in this file at this offset.
   */
  append(length: number, bytes: () => WeightBytes, at?: WeightFileSpan): { offset: number; length: number; location?: string };
  readonly location: string;
  close(): void;
}

/** A tensor's bytes, whole or streamed in pieces (a piece may be a view of a buffer the next piece reuses). */
export type WeightBytes = Uint8Array | Iterable<Uint8Array>;

/** Where a tensor's bytes already are, exactly as the graph needs them (a checkpoint shard, same dtype). */
export interface WeightFileSpan {
  file: string;
  offset: number;
}

/**
 * Writes weights into one external-data file. With `linkFiles`, a tensor whose bytes already lie in a checkpoint
 * shard in the graph's dtype is not copied: the shard is hard-linked into the graph's directory (once) and the
 * initializer points into it. That makes a same-dtype build read and write almost nothing (a 5 GB BioMedLM stage
 * took 30 s to copy). A hard link, not a symlink: ONNX Runtime refuses external data whose resolved path leaves the
 * model's directory. Where a link cannot be made (another filesystem), the bytes are copied as before.
 */
export class FileSink implements WeightSink {
  private fd: number;
  private offset = 0;
  /** Shard file → its link's name here, or null when it cannot be linked. */
  private readonly linked = new Map<string, string | null>();
  constructor(
    private readonly path: string,
    readonly location: string,
    private readonly linkFiles = false,
  ) {
    this.fd = openSync(path, 'w');
  }

  /** Names and sizes of the hard-linked shards (the cache entry records them, like its own files). */
  get links(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const name of this.linked.values()) if (name) out[name] = statSync(join(dirname(this.path), name)).size;
    return out;
  }

  private linkOf(file: string): string | null {
    if (!this.linked.has(file)) {
      let name: string | null = `ckpt-${this.linked.size}-${basename(file)}`;
      try {
        const to = join(dirname(this.path), name);
        if (!existsSync(to)) linkSync(file, to);
      } catch {
        name = null; // EXDEV (other filesystem), EPERM: copy instead
      }
      this.linked.set(file, name);
    }
    return this.linked.get(file)!;
  }

  append(length: number, produce: () => WeightBytes, at?: WeightFileSpan) {
    const link = at && this.linkFiles ? this.linkOf(at.file) : null;
    if (link) return { offset: at!.offset, length, location: link };
    const bytes = produce();
    // 64-byte alignment keeps each tensor friendly to mmap and SIMD loads.
    const pad = (64 - (this.offset % 64)) % 64;
    if (pad) writeSync(this.fd, new Uint8Array(pad));
    const offset = this.offset + pad;
    let written = 0;
    for (const piece of bytes instanceof Uint8Array ? [bytes] : bytes) {
      writeSync(this.fd, piece);
      written += piece.byteLength;
    }
    if (written !== length) throw new Error(`weight produced ${written} bytes, its shape needs ${length}`);
    this.offset = offset + written;
    return { offset, length: written };
  }
  close() {
    closeSync(this.fd);
  }
}

/** Counts bytes without producing or writing them: for shape/size checks of full-size graphs. */
export class CountingSink implements WeightSink {
  readonly location = 'weights.bin';
  total = 0;
  append(length: number, _bytes?: () => WeightBytes, _at?: WeightFileSpan) {
    const offset = this.total;
    this.total += length;
    return { offset, length };
  }
  close() {}
}

const valueInfo = (name: string, elemType: ElemTypeId, dims: (number | string)[]) => ({
  name,
  type: { tensorType: { elemType, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) } } },
});

/** A small fluent layer over ONNX GraphProto: unique value names, typed attributes, inline constants, external weights. */
export class GraphBuilder {
  private nodes: object[] = [];
  private inits: object[] = [];
  private inputs: object[] = [];
  private outputs: object[] = [];
  private counter = 0;
  /** Values renamed to a graph output's name (see `output`). */
  private readonly alias = new Map<string, string>();
  readonly weightNames = new Set<string>();
  paramBytes = 0;

  constructor(private readonly sink: WeightSink) {}

  input(name: string, elemType: ElemTypeId, dims: (number | string)[]): string {
    this.inputs.push(valueInfo(name, elemType, dims));
    return name;
  }

  /** `input`, unless an input of that name is already declared: then that one. */
  inputOnce(name: string, elemType: ElemTypeId, dims: (number | string)[]): string {
    return (this.inputs as { name: string }[]).some((i) => i.name === name) ? name : this.input(name, elemType, dims);
  }

  /**
   * Declares `value` a graph output called `name`. A value some node here produces is renamed in place (later uses
   * follow the alias) rather than copied through an Identity: for KV caches that copy was a tenth of a decode step.
   */
  output(value: string, name: string, elemType: ElemTypeId, dims: (number | string)[]): void {
    const producer = (this.nodes as { output: string[] }[]).find((n) => n.output.includes(value));
    const isOutput = (this.outputs as { name: string }[]).some((o) => o.name === value);
    if (producer && !isOutput && !this.alias.has(value)) {
      producer.output = producer.output.map((o) => (o === value ? name : o));
      for (const n of this.nodes as { input: string[] }[]) n.input = n.input.map((i) => (i === value ? name : i));
      this.alias.set(value, name);
    } else {
      this.op('Identity', [value], {}, [name]);
    }
    this.outputs.push(valueInfo(name, elemType, dims));
  }

  /** Adds one node; returns its output names (fresh unless given). */
  op(opType: string, inputs: string[], attrs: Record<string, Attr> = {}, outputs: string[] | number = 1, domain = ''): string[] {
    inputs = inputs.map((i) => this.alias.get(i) ?? i);
    const outs = typeof outputs === 'number' ? Array.from({ length: outputs }, () => `${opType.toLowerCase()}_${this.counter++}`) : outputs;
    const attribute = Object.entries(attrs).map(([name, v]) => {
      const A = onnx.AttributeProto.AttributeType;
      // JS cannot tell 1 from 1.0: float attributes are passed as {float} so ORT sees the right type.
      if (typeof v === 'string') return { name, type: A.STRING, s: Buffer.from(v) };
      if (Array.isArray(v)) return { name, type: A.INTS, ints: v };
      if (typeof v === 'object' && 'float' in v) return { name, type: A.FLOAT, f: v.float };
      if (typeof v === 'object' && 'floats' in v) return { name, type: A.FLOATS, floats: v.floats };
      return { name, type: A.INT, i: v };
    });
    this.nodes.push({ opType, input: inputs, output: outs, attribute, domain, name: `${opType}_${this.nodes.length}` });
    return outs;
  }

  /**
   * An `If` whose then-branch is the nodes `build` adds (they read this graph's values from the outer scope) and whose
   * else-branch is what `orElse` builds, its constants kept inside the branch (so an else-branch of constants runs no
   * node at all). Returns the If's outputs, typed `types`. Values made inside a branch are visible only there:
   * whatever later nodes share must be made before.
   */
  ifThen(cond: string, build: () => string[], orElse: () => string[], types: ElemTypeId[]): string[] {
    const typed = (names: string[]) => names.map((name, i) => ({ name, type: { tensorType: { elemType: types[i] } } }));
    const branch = (make: () => string[], ownConstants: boolean) => {
      const [outerNodes, outerInits] = [this.nodes, this.inits];
      this.nodes = [];
      if (ownConstants) this.inits = [];
      try {
        const outs = make().map((o) => this.alias.get(o) ?? o);
        return { name: `branch_${this.counter++}`, node: this.nodes, initializer: ownConstants ? this.inits : [], output: typed(outs) };
      } finally {
        [this.nodes, this.inits] = [outerNodes, outerInits];
      }
    };
    const thenBranch = branch(build, false);
    const elseBranch = branch(orElse, true);
    const A = onnx.AttributeProto.AttributeType;
    const outs = types.map(() => `if_${this.counter++}`);
    this.nodes.push({
      opType: 'If', input: [cond], output: outs, domain: '', name: `If_${this.nodes.length}`,
      attribute: [
        { name: 'then_branch', type: A.GRAPH, g: thenBranch },
        { name: 'else_branch', type: A.GRAPH, g: elseBranch },
      ],
    });
    return outs;
  }

  /** Single-output shorthand. */
  o(opType: string, inputs: string[], attrs: Record<string, Attr> = {}, domain = ''): string {
    return this.op(opType, inputs, attrs, 1, domain)[0];
  }

  /** Small inline constant (shapes, scalars, axes). */
  constInt64(values: number[], dims: number[] = [values.length]): string {
    const name = `const_${this.counter++}`;
    this.inits.push({ name, dims, dataType: ElemType.INT64, int64Data: values });
    return name;
  }

  /** Small inline int32 or bool constant. */
  constInt32(values: number[], dims: number[] = [values.length], elemType: ElemTypeId = ElemType.INT32): string {
    const name = `const_${this.counter++}`;
    this.inits.push({ name, dims, dataType: elemType, int32Data: values });
    return name;
  }

  constScalar(value: number, elemType: ElemTypeId): string {
    const name = `const_${this.counter++}`;
    if (elemType === ElemType.FLOAT16) {
      this.inits.push({ name, dims: [], dataType: elemType, int32Data: [f16Bits(value)] });
    } else {
      this.inits.push({ name, dims: [], dataType: elemType, floatData: [value] });
    }
    return name;
  }

  /** A weight tensor, stored as external data. Reusing a name returns the existing initializer (tied weights). */
  weight(name: string, elemType: ElemTypeId, dims: number[], bytes: () => WeightBytes, at?: () => WeightFileSpan | undefined): string {
    if (this.weightNames.has(name)) return name;
    const size = elemType === ElemType.FLOAT16 ? 2 : elemType === ElemType.INT64 ? 8 : elemType === ElemType.UINT8 || elemType === ElemType.INT8 ? 1 : 4;
    const { offset, length, location } = this.sink.append(dims.reduce((a, b) => a * b, size), bytes, at?.());
    this.paramBytes += length;
    this.weightNames.add(name);
    this.inits.push({
      name, dims, dataType: elemType, dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: location ?? this.sink.location },
        { key: 'offset', value: String(offset) },
        { key: 'length', value: String(length) },
      ],
    });
    return name;
  }

  /**
   * A second initializer over the bytes of weight `of` (same external-data span, other dims): the quantized token
   * table is [V, D·bits/8] for GatherBlockQuantized and [V, D/block, block·bits/8] for MatMulNBits (tied LM head).
   */
  weightView(name: string, of: string, dims: number[]): string {
    if (this.weightNames.has(name)) return name;
    const base = (this.inits as { name: string; dataType: number; externalData?: object[] }[]).find((i) => i.name === of);
    if (!base?.externalData) throw new Error(`weightView: ${of} is not an external weight`);
    this.weightNames.add(name);
    this.inits.push({ ...base, name, dims });
    return name;
  }

  /** Serialises the model; the caller closes the sink. */
  encode(graphName: string, opsets: Record<string, number>, metadata: Record<string, string>): Uint8Array {
    const model = onnx.ModelProto.create({
      irVersion: 8,
      producerName: 'strata',
      opsetImport: Object.entries(opsets).map(([domain, version]) => ({ domain, version })),
      metadataProps: Object.entries(metadata).map(([key, value]) => ({ key, value })),
      graph: { name: graphName, node: this.nodes, initializer: this.inits, input: this.inputs, output: this.outputs },
    });
    return onnx.ModelProto.encode(model).finish();
  }
}
