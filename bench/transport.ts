import { spawn } from 'node:child_process';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { performance } from 'node:perf_hooks';
import { StageClient } from '../transport/grpc/client.ts';
import { toWire } from '../proto/wire.ts';
import { median } from './stats.ts';

/**
 * Transport probes for one hop: a tensor sent as a real gRPC Stage call (Ping: the worker decodes, validates and
 * drops it) against the same bytes over a raw loopback TCP socket to a sink that acks once it has them all.
 */

export interface HopProbe {
  bytes: number;
  trialsMs: number[];
  medianMs: number;
}

/** `trials` Pings of a float32 tensor of `dims` to `address` (after `warmup` untimed ones). */
export async function probeGrpcHop(address: string, dims: number[], trials = 9, warmup = 2): Promise<HopProbe> {
  const n = dims.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i += 1024) data[i] = i; // real bytes, not a zero page
  const payload = toWire({ dtype: 'float32', dims, data });
  const client = new StageClient(address);
  try {
    const trialsMs: number[] = [];
    for (let i = 0; i < warmup + trials; i++) {
      const t0 = performance.now();
      const { bytes } = await client.ping(payload);
      const ms = performance.now() - t0;
      if (Number(bytes) !== n * 4) throw new Error(`ping: worker saw ${bytes} bytes, sent ${n * 4}`);
      if (i >= warmup) trialsMs.push(ms);
    }
    return { bytes: n * 4, trialsMs, medianMs: median(trialsMs) };
  } finally {
    client.close();
  }
}

/** A sink that reads `bytes` per message and answers each with one byte. Source for the child-process variant. */
const SINK_CODE = (bytes: number) => `
const net = require('node:net');
const server = net.createServer((s) => {
  s.setNoDelay(true);
  let got = 0;
  s.on('data', (d) => { got += d.length; while (got >= ${bytes}) { got -= ${bytes}; s.write(Buffer.of(1)); } });
});
server.listen(0, '127.0.0.1', () => process.stdout.write(JSON.stringify({ port: server.address().port }) + '\\n'));
process.stdin.on('end', () => process.exit(0)); process.stdin.resume();
`;

function inProcessSink(bytes: number): Promise<{ port: number; close: () => void }> {
  const server: Server = createServer((s) => {
    s.setNoDelay(true);
    let got = 0;
    s.on('data', (d) => {
      got += d.length;
      while (got >= bytes) {
        got -= bytes;
        s.write(Buffer.of(1));
      }
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ port: (server.address() as { port: number }).port, close: () => server.close() })));
}

function childSink(bytes: number): Promise<{ port: number; close: () => void }> {
  const child = spawn(process.execPath, ['-e', SINK_CODE(bytes)], { stdio: ['pipe', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`tcp sink exited (${code}) before listening`)));
    createInterface({ input: child.stdout! }).once('line', (line) => {
      resolve({ port: JSON.parse(line).port, close: () => { child.stdin!.end(); child.kill(); } });
    });
  });
}

/**
 * Sends `bytes` over loopback TCP and waits for the sink's 1-byte ack, `trials` times on one connection. `sink`:
 * 'process' = a separate node process (like a worker: two cores can work at once), 'same' = this process.
 */
export async function probeTcpHop(bytes: number, sink: 'process' | 'same' = 'process', trials = 9, warmup = 2): Promise<HopProbe> {
  const server = sink === 'process' ? await childSink(bytes) : await inProcessSink(bytes);
  const buf = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 4096) buf[i] = i & 0xff;
  const socket: Socket = await new Promise((resolve, reject) => {
    const s = connect(server.port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
  });
  socket.setNoDelay(true);
  try {
    const trialsMs: number[] = [];
    for (let i = 0; i < warmup + trials; i++) {
      const t0 = performance.now();
      await new Promise<void>((resolve) => {
        socket.once('data', () => resolve());
        socket.write(buf);
      });
      const ms = performance.now() - t0;
      if (i >= warmup) trialsMs.push(ms);
    }
    return { bytes, trialsMs, medianMs: median(trialsMs) };
  } finally {
    socket.destroy();
    server.close();
  }
}
