import { spawn, type ChildProcess } from 'node:child_process';
import { createConnection, createServer } from 'node:net';

/**
 * Redis for tests: `REDIS_URL` when set and it answers, else a private `redis-server` on a free loopback port.
 * Never skips: without either it throws, so a CI run without Redis fails loudly instead of passing empty.
 */

/** True when a RESP `PING` to `url` gets `+PONG` within `timeoutMs` (a raw socket: no client retry noise). */
export function redisAnswers(url: string, timeoutMs = 1000): Promise<boolean> {
  const u = new URL(url);
  return new Promise((resolve) => {
    const sock = createConnection({ host: u.hostname || '127.0.0.1', port: Number(u.port || 6379) });
    let buf = '';
    const done = (ok: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.on('connect', () => sock.write(u.password ? `AUTH ${decodeURIComponent(u.password)}\r\nPING\r\n` : 'PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString();
      if (buf.includes('+PONG')) done(true);
      else if (buf.startsWith('-')) done(false);
    });
    sock.on('error', () => done(false));
  });
}

/** A port nothing listens on right now (the OS picks it; closed again before returning). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}

export interface PrivateRedis {
  url: string;
  port: number;
  /** Kills the server and waits for it to exit. */
  stop(): Promise<void>;
}

const children = new Set<ChildProcess>();
// A crashed or interrupted test run must not leave redis-server processes behind.
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

/** Starts `redis-server` on a free loopback port with persistence off; throws when it is not installed or never answers. */
export async function startPrivateRedis(): Promise<PrivateRedis> {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  children.add(child);
  let spawnError: Error | undefined;
  child.on('error', (e) => (spawnError = e));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const url = `redis://127.0.0.1:${port}`;
  const deadline = Date.now() + 10_000;
  while (!(await redisAnswers(url, 500))) {
    if (spawnError || child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      children.delete(child);
      throw new Error(
        `tests need Redis: REDIS_URL is unset or does not answer, and redis-server could not be started on port ${port}` +
          ` (${spawnError?.message ?? `exit code ${child.exitCode}`}). Install redis-server or set REDIS_URL.`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url,
    port,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
      children.delete(child);
    },
  };
}

/** `REDIS_URL` when it answers, else a private server (stop it in `after`). */
export async function redisUrlForTests(): Promise<{ url: string; stop: () => Promise<void> }> {
  const env = process.env.REDIS_URL;
  if (env && (await redisAnswers(env))) return { url: env, stop: async () => {} };
  const own = await startPrivateRedis();
  return { url: own.url, stop: own.stop };
}

/** A queue name no other test file or run uses, so files can share one Redis. */
export const uniqueQueueName = (tag: string): string => `strata-test-${tag}-${process.pid}-${Date.now().toString(36)}`;
